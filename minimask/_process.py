"""Settings for a whole process, applied only by code that owns the process.

``import minimask`` changes nothing outside minimask: a notebook or a script
that imports it keeps its environment and its malloc. The entry points that
own their process - the command line (``python -m minimask``), ``train``
and the data-parallel workers - call ``configure_process()`` first thing; a
script that wants the same settings calls it before anything else runs.

What it sets, and why:

- ``OMP_WAIT_POLICY=passive`` (unless already set). Numba's parallel kernels
  run on OpenMP threads that, by default, spin for a while after each
  parallel loop waiting for more work. Between two kernels the GEMM runs on
  other threads (minimask's own, ``minimask._blas``; OpenBLAS's before
  that), and on a 2-core machine the spinning OpenMP threads steal their
  cores: a training step of the tiny model at 128x128
  took 1.21 s that way and 0.078 s with passive waiting (2-core CI
  machine). The OpenMP runtime reads the variable once, when it starts, so
  this only helps before the first parallel kernel has run. In a process
  where another library (torch, for one) has already loaded the OpenMP
  runtime, it is too late: Numba's OpenMP layer would bind to that runtime,
  spinning as it was told at its start (tiny step on 2 threads: 1.43 s
  instead of 0.059 s, ``benchmarks/bench_import_order.py``, load 3.5).
  There ``configure_process`` asks Numba for its ``workqueue`` threading
  layer instead, whose threads sleep on a condition variable between
  kernels (0.081 s a step with torch loaded first) - unless the user chose
  a layer (``NUMBA_THREADING_LAYER``) or Numba has already started its
  threads. The workqueue layer runs one
  parallel kernel at a time: call minimask's kernels from one Python
  thread (the model is not thread-safe anyway).
- glibc's malloc keeps freed blocks (``MINIMASK_MALLOPT=0`` to leave it
  alone). A training step allocates and frees the same large arrays (im2col
  columns, activations: up to tens of MB) every time. By default glibc gives
  blocks above its mmap threshold back to the kernel on free and asks for
  fresh ones on the next malloc, so every step pays for page faults and the
  kernel zeroing pages. Raising the mmap threshold to its maximum (32 MB) and
  the trim threshold to 1 GB keeps them in the heap: on the tiny model a
  step's page faults went from ~4500 to ~150 and its system time from
  0.05 s to under 0.01 s. Linux/glibc only.
"""
from __future__ import annotations

import os
import sys

_applied: dict | None = None


def _openmp_started() -> bool:
    """Whether an OpenMP runtime is already loaded in this process (by Numba's
    OpenMP layer or by another library), so that it has read its settings."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:                 # not Linux: judge by the usual suspects
        return "torch" in sys.modules
    return any(name in maps for name in ("libgomp", "libiomp", "libomp."))


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks for reuse (see the module
    docstring); returns whether it applied."""
    if os.environ.get("MINIMASK_MALLOPT", "1") == "0":
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)) and \
            bool(libc.mallopt(M_TRIM_THRESHOLD, 1024 * 1024 * 1024))
    except (OSError, AttributeError):       # not glibc (macOS, Windows, musl)
        return False


def _avoid_spinning_openmp() -> str | None:
    """Choose Numba's workqueue threading layer if the user has not chosen
    one and Numba has not started its threads yet; returns the layer chosen
    (None when it was not ours to choose)."""
    if os.environ.get("NUMBA_THREADING_LAYER"):
        return None
    from numba.core import config
    from numba.np.ufunc import parallel
    if getattr(parallel, "_is_initialized", True) or str(config.THREADING_LAYER) != "default":
        return None
    config.THREADING_LAYER = "workqueue"
    return "workqueue"


def configure_process() -> dict:
    """Apply minimask's process-wide settings (idempotent; call it before
    minimask runs its first kernel) and return what was done::

        {"omp_wait_policy": "passive" (or the user's value),
         "omp_already_started": bool,  # an OpenMP runtime was loaded before the call
         "numba_threading_layer": "workqueue" or None (left to Numba / the user),
         "malloc_tuned": bool}

    Also sets ``minimask.MALLOC_TUNED``."""
    global _applied
    if _applied is None:
        started = _openmp_started()
        os.environ.setdefault("OMP_WAIT_POLICY", "passive")
        layer = _avoid_spinning_openmp() if started else None
        _applied = {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                    "omp_already_started": started,
                    "numba_threading_layer": layer,
                    "malloc_tuned": keep_freed_memory()}
        import minimask
        minimask.MALLOC_TUNED = _applied["malloc_tuned"]
    return dict(_applied)
