"""Threads that never hurt: a kernel runs in parallel only when its work is
large enough to pay for it.

A parallel loop costs something before it does any work: waking the other
threads, handing out the iterations, waiting at the end for the slowest
thread. On an idle machine that is a few microseconds; with another process
busy on the same cores a woken thread may wait for the scheduler before it
runs, and the whole loop waits with it. A kernel whose work takes less
than that is faster on one thread, and a model step is made of many such
kernels (the tiny preset's maps at 8 x 8 to 64 x 64, batch 2-4).

So every parallel kernel of the ``"cpu"`` backend is compiled twice, with
``parallel=True`` and without (``prange`` is then an ordinary ``range``: the
same loop body, the same arithmetic in the same order per element), and each
call picks one by the size of its work:

* Numba kernels (``parallel_kernel``): the work is the number of elements of
  the array arguments (inputs and outputs) unless the kernel gives its own
  measure; below ``KERNEL_SERIAL_ELEMENTS`` the serial version runs.
* BLAS multiplies (``gemm_threads``): the work is ``2 M N K`` FLOPs; below
  ``GEMM_SERIAL_FLOPS`` one thread, else the multiply is cut into pieces
  that minimask's own threads claim (``run_shares``; OpenBLAS itself always
  runs on one thread per call, see ``minimask._blas``).

"More than one thread" means ``threads_now()``: Numba's thread count, less
the cores that other processes keep busy right now (``free_cores``, from
Linux's count of runnable tasks). Beside one busy process on a 2-core
machine every kernel runs serially, as it should: a second thread would
share a core with that process. With one thread (``numba.set_num_threads(1)``,
``NUMBA_NUM_THREADS=1``) the serial versions always run. The thresholds were measured with
``benchmarks/bench_threads.py`` (1 against 2 threads per layer and size, idle
and with one busy process); ``set_thresholds`` changes them (the benchmark
and the tests use it), no user needs to.
"""
from __future__ import annotations

import functools
import os
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit

# From benchmarks/bench_threads.py on the idle 2-core machine (19:48 UTC,
# float32, fwd + bwd, medians of 9). Element-wise kernels are memory-bound:
# at 1M elements of arguments two threads still lost (ReLU on 2 x 64 x 64 x
# 64: 0.112 ms on 1 thread, 0.165 on 2; GroupNorm 0.208 / 0.232) and at 4M
# they won (ReLU 2 x 64 x 128 x 128: 0.75 / 0.48 ms; GroupNorm 1.14 / 0.69).
# Kernels with more arithmetic per element say so with their own work
# measure (the focal loss: 64 per logit). A multiply paid for a second
# thread from about 4e7 FLOPs (64 x 576 x 512: 0.385 ms on 1 thread, 0.270
# on 2) and not at 1e7 (64 x 576 x 128: 0.102 / 0.121 ms).
KERNEL_SERIAL_ELEMENTS = 1 << 21
GEMM_SERIAL_FLOPS = 2.0e7


def set_thresholds(kernel_elements=None, gemm_flops=None):
    """Set the thresholds (None keeps one); returns the old pair."""
    global KERNEL_SERIAL_ELEMENTS, GEMM_SERIAL_FLOPS
    old = (KERNEL_SERIAL_ELEMENTS, GEMM_SERIAL_FLOPS)
    if kernel_elements is not None:
        KERNEL_SERIAL_ELEMENTS = kernel_elements
    if gemm_flops is not None:
        GEMM_SERIAL_FLOPS = gemm_flops
    return old


def gemm_threads(flops: float) -> int:
    """Threads for a multiply of ``flops`` floating-point operations: one
    below ``GEMM_SERIAL_FLOPS``, else ``threads_now()``."""
    if flops < GEMM_SERIAL_FLOPS:
        return 1
    return threads_now()


# ----------------------------------------------------------------------
# Cores that other processes are using
# ----------------------------------------------------------------------
#
# On a machine where another process keeps a core busy, a second thread of
# ours shares that core with it: a parallel loop then waits at its end for a
# thread running at half speed (or not yet scheduled), and is slower than
# the same loop on one thread. OpenMP's answer is "dynamic adjustment of the
# number of threads" (OMP_DYNAMIC; GNU's runtime reads the load average);
# minimask does the same with Linux's instantaneous count of runnable tasks
# (the fourth field of /proc/loadavg, "running/total"): the cores we may
# use are those of our CPU set minus the other runnable tasks (the least of
# the last LOAD_READINGS readings: a task runnable at one reading only does
# not count). It is read at most every LOAD_RECHECK_S seconds, less our own
# running threads (from /proc/self/task: a pool thread finishing its piece
# is not another process's load); reading both costs ~50 us. Where they
# cannot be read (not Linux) every thread is used.

LOAD_RECHECK_S = 0.05
LOAD_READINGS = 3
_load = {"aware": os.environ.get("MINIMASK_LOAD_AWARE", "1").strip() != "0",
         "checked": -1.0, "free": None, "readings": []}


def set_load_aware(flag: bool) -> bool:
    """Turn the load check on or off (``MINIMASK_LOAD_AWARE=0`` starts it
    off); returns the previous setting. Off, ``threads_now()`` is Numba's
    thread count (the benchmark's forced columns and the tests use this)."""
    old = _load["aware"]
    _load["aware"] = bool(flag)
    _load["checked"] = -1.0
    _load["readings"] = []
    return old


def _our_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _other_running_tasks():
    """Runnable tasks on the machine now that are not threads of this
    process (Linux), None where unknown. Our own threads are left out: a
    pool thread still finishing its piece, or an OpenMP thread on its way
    to sleep, is not another process's load."""
    try:
        with open("/proc/loadavg") as f:
            total = int(f.read().split()[3].split("/")[0])
        ours = 0
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    stat = f.read()
            except OSError:                  # the thread ended meanwhile
                continue
            if stat[stat.rindex(")") + 2] == "R":
                ours += 1
        return max(0, total - ours)
    except (OSError, ValueError, IndexError):
        return None


def free_cores():
    """Cores of our CPU set not taken by other processes' runnable tasks, or
    None when unknown. The count is the smallest of the last
    ``LOAD_READINGS`` readings: a busy process is runnable in every one of
    them, while a kernel thread or a short job that happens to run at one
    reading does not cost us a thread for the next 50 ms."""
    now = time.monotonic()
    if now - _load["checked"] >= LOAD_RECHECK_S:
        _load["checked"] = now
        others = _other_running_tasks()
        readings = _load["readings"]
        readings.append(others)
        del readings[:-LOAD_READINGS]
        known = [r for r in readings if r is not None]
        _load["free"] = max(1, _our_cores() - min(known)) if known else None
    return _load["free"]


def threads_now() -> int:
    """The threads a parallel kernel or a split multiply may use now:
    Numba's thread count, less the cores other processes keep busy (when
    the load check is on)."""
    n = numba.get_num_threads()
    if n <= 1 or not _load["aware"]:
        return n
    free = free_cores()
    return n if free is None else max(1, min(n, free))


def fixed_pieces(least: int) -> int:
    """How many pieces to cut a large multiply into: at least ``least``, and
    at least Numba's thread count, so every thread can have one - but never
    the load check's count of the moment (``threads_now``): the pieces
    decide the rounding, and a result must not depend on the machine's
    load."""
    return max(least, numba.get_num_threads())


def array_elements(args) -> int:
    """The default work measure: elements of the array arguments."""
    total = 0
    for a in args:
        if isinstance(a, np.ndarray):
            total += a.size
    return total


def use_parallel(work: int) -> bool:
    """The rule: parallel when the work is at least ``KERNEL_SERIAL_ELEMENTS``
    and there is more than one thread to use now (``threads_now``)."""
    return work >= KERNEL_SERIAL_ELEMENTS and threads_now() > 1


class ParallelKernel:
    """A Numba kernel compiled twice, called through the rule. ``.parallel``
    and ``.serial`` are the two dispatchers (tests call them directly).

    ``reduces=True`` marks a kernel that sums across its parallel loop (a
    loss): its parallel and serial versions add in different orders, so it
    picks by work size and Numba's thread count only, never by the machine's
    load - a run's numbers must not depend on what else the machine does
    (resumed training is checked bit for bit)."""

    def __init__(self, fn, work, options, reduces=False):
        self.reduces = bool(reduces)
        # __name__, __doc__, __module__, __qualname__ and __wrapped__ of the
        # Python function: inspect.getsource(kernel) shows its source.
        functools.update_wrapper(self, fn)
        self.py_func = fn
        self.work = work
        self.parallel = njit(parallel=True, cache=True, **options)(fn)
        # A copy of the function under another name: Numba's on-disk cache
        # is keyed by the qualified name, so the two versions do not share
        # (and overwrite) one cache entry.
        serial = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                    fn.__defaults__, fn.__closure__)
        serial.__qualname__ = fn.__qualname__ + "_serial"
        serial.__module__ = fn.__module__
        serial.__doc__ = fn.__doc__
        self.serial = njit(cache=True, **options)(serial)

    def picks_parallel(self, *args) -> bool:
        work = self.work(*args) if self.work is not None else array_elements(args)
        if self.reduces:
            return work >= KERNEL_SERIAL_ELEMENTS and numba.get_num_threads() > 1
        return use_parallel(work)

    def __call__(self, *args):
        if self.picks_parallel(*args):
            return self.parallel(*args)
        return self.serial(*args)

    def __repr__(self):
        return f"<ParallelKernel {self.py_func.__module__}.{self.__name__}>"


def parallel_kernel(fn=None, *, work=None, reduces=False, **options):
    """Decorator: ``@parallel_kernel`` in place of
    ``@njit(parallel=True, cache=True)``. ``work(*args)`` may give the
    kernel's own work measure (in elements); ``reduces=True`` for a kernel
    that sums across its loop (``ParallelKernel``)."""
    if fn is None:
        return lambda f: ParallelKernel(f, work, options, reduces)
    return ParallelKernel(fn, work, options, reduces)


# ----------------------------------------------------------------------
# minimask's own threads for BLAS work
# ----------------------------------------------------------------------
#
# OpenBLAS's worker threads spin for a while after each multiply (its
# THREAD_TIMEOUT, read when the library loads - and ``import numba`` loads
# SciPy's copy, long before minimask could set it), and a spinning thread
# takes a core from whatever runs next. So minimask never asks OpenBLAS for
# more than one thread: it splits a multiply (or a batch of them) into
# shares and runs them on these threads, which sleep on a queue when idle.
# BLAS calls through ctypes release the GIL, so the shares run at once.

_POOL = {"pid": None, "workers": 0, "executor": None}
_POOL_LOCK = threading.Lock()


def _executor(workers):
    """A pool of at least ``workers`` threads, created lazily in this
    process (a pool inherited through fork has no threads behind it)."""
    with _POOL_LOCK:
        if _POOL["pid"] != os.getpid() or _POOL["workers"] < workers:
            if _POOL["pid"] == os.getpid() and _POOL["executor"] is not None:
                _POOL["executor"].shutdown(wait=False)     # its threads end when idle
            _POOL.update(pid=os.getpid(), workers=workers,
                         executor=ThreadPoolExecutor(workers, thread_name_prefix="minimask"))
        return _POOL["executor"]


def run_shares(share, n_items, threads, pieces=None):
    """``share(lo, hi)`` over all of ``range(n_items)``, in ``pieces``
    contiguous pieces (default: one per thread) taken one at a time by this
    thread and ``threads - 1`` pool threads; returns when all are done. The
    pieces are the same whatever ``threads`` is (one thread runs them one
    after another), so a result cannot depend on the thread count.

    Pieces are claimed, not assigned: a thread that comes late (on a busy
    machine a woken thread may wait for the scheduler) finds them taken by
    the others, and this thread never waits for a piece that nobody has
    started. So more threads are never much slower than one: at worst this
    thread does every piece itself."""
    threads = max(1, min(threads, n_items))
    pieces = max(threads, min(pieces or threads, n_items))
    bounds = [n_items * i // pieces for i in range(pieces + 1)]
    if threads == 1:                        # the same pieces, one after another
        for i in range(pieces):
            share(bounds[i], bounds[i + 1])
        return
    claims = iter(range(pieces))            # next() on it is atomic under the GIL
    state = {"left": pieces, "error": None}
    lock = threading.Lock()
    finished = threading.Event()

    def work():
        for i in claims:
            try:
                share(bounds[i], bounds[i + 1])
            except BaseException as exc:    # re-raised on the calling thread
                state["error"] = exc
            finally:
                with lock:
                    state["left"] -= 1
                    if state["left"] == 0:
                        finished.set()

    pool = _executor(threads - 1)
    for _ in range(threads - 1):
        pool.submit(work)
    work()
    finished.wait()
    if state["error"] is not None:
        raise state["error"]
