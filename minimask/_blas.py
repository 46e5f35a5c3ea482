"""The matrix multiply of the ``"cpu"`` backend: BLAS, on minimask's threads.

Which BLAS. SciPy (a dependency) ships its own OpenBLAS, with a C interface
(``scipy_cblas_sgemm``) that takes row strides and transpose flags, so a
multiply needs no copies; this module calls it through ctypes. NumPy's
``@`` is the fallback (``MINIMASK_BLAS=numpy``, or when SciPy's copy cannot
be found: another BLAS vendor, another platform). OpenBLAS picks its
kernels (AVX2, AVX-512, ...) for the CPU when it loads, unless
``OPENBLAS_CORETYPE`` says otherwise - a user's setting, left as it is
(``info()`` reports the kernels in use).

Which threads. OpenBLAS's own worker threads spin for a while after every
multiply that used them, waiting for the next (its ``THREAD_TIMEOUT``, read
once when the library loads; ``import numba`` already loads SciPy's copy,
so minimask cannot set it), and on a 2-core machine a spinning thread takes
a core from the Numba kernel or the multiply that runs next. So minimask
asks OpenBLAS for one thread per call, always, and runs a large multiply
as shares of the output's columns (or rows) on its own threads, which
sleep on a queue when idle (``minimask._threads.run_shares``; ctypes
releases the GIL during the call, so the shares run at once). How many:
``minimask._threads.gemm_threads`` of the multiply's FLOPs.

One thread per call, and where it is set. In SciPy's OpenBLAS (a pthreads
build) ``openblas_set_num_threads_local`` is not thread-local: it sets the
process-wide count. So it is set to 1 once per multiply, on the calling
thread, before any share starts, and put back after the last share ends
(``_one_openblas_thread``) - never inside a share. Setting it inside each
share and restoring it there raced: one thread put the count back to 2
while another was about to call, that call ran on two OpenBLAS threads,
and OpenBLAS's two-thread sgemm rounds differently from its one-thread
sgemm (a few ulp), so a training run's weights depended on thread timing
(found by ``tests/test_faults.py``: a resumed run differed, 1 run in 5).

Nothing here changes the process between multiplies: no environment
variable, and OpenBLAS's thread count for other callers (SciPy's linear
algebra) is what it was. minimask's multiplies are not meant to be called
from two Python threads at once (the model is not thread-safe either).
"""
from __future__ import annotations

import ctypes
import glob
import os

import numpy as np
from numba import njit

from minimask import _threads

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
GEMM_PIECES = 4          # pieces of a large multiply, whatever the thread count

_state: dict | None = None


def _scipy_openblas_path():
    import importlib.util
    spec = importlib.util.find_spec("scipy")
    if spec is None or not spec.submodule_search_locations:
        return None
    site = os.path.dirname(list(spec.submodule_search_locations)[0])
    found = sorted(glob.glob(os.path.join(site, "scipy.libs", "libscipy_openblas*.so*")))
    return found[0] if found else None


def _load():
    """Find SciPy's OpenBLAS and its functions; returns the state dict
    (``lib`` None when NumPy's ``@`` is to be used)."""
    state = {"lib": None, "path": None, "coretype": None, "why": ""}
    if os.environ.get("MINIMASK_BLAS", "").lower() == "numpy":
        state["why"] = "MINIMASK_BLAS=numpy"
        return state
    path = _scipy_openblas_path()
    if path is None:
        state["why"] = "SciPy's OpenBLAS not found"
        return state
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        state["why"] = f"could not load {path}: {exc}"
        return state
    try:
        sgemm, dgemm = lib.scipy_cblas_sgemm, lib.scipy_cblas_dgemm
        set_local = lib.openblas_set_num_threads_local
        corename = lib.scipy_openblas_get_corename
    except AttributeError as exc:
        state["why"] = f"{path} lacks a symbol: {exc}"
        return state
    i, p = ctypes.c_int, ctypes.c_void_p
    pointers = {}
    for name, fn, real in (("sgemm", sgemm, ctypes.c_float), ("dgemm", dgemm, ctypes.c_double)):
        fn.argtypes = [i, i, i, i, i, i, real, p, i, p, i, real, p, i]
        fn.restype = None
        # the same function as a ctypes function pointer, which compiled
        # code can call (``_gemm_loop``); kept alive in the state
        proto = ctypes.CFUNCTYPE(None, i, i, i, i, i, i, real, p, i, p, i, real, p, i)
        pointers[name] = proto(ctypes.cast(fn, ctypes.c_void_p).value)
    set_local.argtypes, set_local.restype = [i], i
    corename.restype = ctypes.c_char_p
    state.update(lib=lib, path=path, sgemm=sgemm, dgemm=dgemm, set_local=set_local,
                 sgemm_ptr=pointers["sgemm"], dgemm_ptr=pointers["dgemm"],
                 coretype=corename().decode(), why="loaded")
    return state


def info() -> dict:
    """What the ``"cpu"`` GEMM runs on: ``{"blas": "scipy-openblas" or
    "numpy", "path", "coretype", "why"}``."""
    global _state
    if _state is None:
        _state = _load()
    return {"blas": "scipy-openblas" if _state["lib"] is not None else "numpy",
            "path": _state["path"], "coretype": _state["coretype"], "why": _state["why"]}


class _one_openblas_thread:
    """OpenBLAS at one thread for the calls made inside (from any thread),
    the previous count restored on leaving. Enter it on the calling thread
    only: the count is process-wide (see the module docstring)."""

    __slots__ = ("set_threads", "previous")

    def __init__(self, state):
        self.set_threads = state["set_local"]

    def __enter__(self):
        self.previous = self.set_threads(1)

    def __exit__(self, *exc):
        if self.previous != 1:
            self.set_threads(self.previous)


def gemm(a, b, trans_a=False, trans_b=False, out=None, accumulate=False, threads=None):
    """``op(a) @ op(b)`` on the host, into ``out`` when given (``out +=`` when
    ``accumulate``). a and b are 2-D float32 or float64 arrays of one dtype
    whose last axis is contiguous (row-major views with any row stride);
    the caller checks shapes. Threads: ``threads`` when given, else
    ``_threads.gemm_threads`` of the multiply's FLOPs; with more than one,
    the columns of ``out`` (or its rows, when it has more rows) are split
    between minimask's threads (``_threads.run_shares``), each share one
    OpenBLAS call on one OpenBLAS thread."""
    global _state
    if _state is None:
        _state = _load()
    M, K = (a.shape[1], a.shape[0]) if trans_a else a.shape
    N = b.shape[0] if trans_b else b.shape[1]
    if out is None:
        out = np.empty((M, N), dtype=a.dtype)
        accumulate = False
    lib = _state["lib"]
    usable = (lib is not None and a.dtype == b.dtype == out.dtype
              and a.dtype in (np.float32, np.float64) and M and N and K
              and all(m.strides[1] == m.itemsize and m.strides[0] >= m.shape[1] * m.itemsize
                      for m in (a, b, out)))
    if not usable:
        result = (a.T if trans_a else a) @ (b.T if trans_b else b)
        if accumulate:
            out += result
        else:
            out[...] = result
        return out
    fn = _state["sgemm"] if a.dtype == np.float32 else _state["dgemm"]
    item = a.itemsize
    beta = 1.0 if accumulate else 0.0
    ta, tb = (_TRANS if trans_a else _NO_TRANS), (_TRANS if trans_b else _NO_TRANS)
    lda, ldb, ldc = a.strides[0] // item, b.strides[0] // item, out.strides[0] // item
    pa, pb, pc = a.ctypes.data, b.ctypes.data, out.ctypes.data
    # Output columns per share (or rows, when there are more rows): whole
    # cache lines of out, so two threads never write one line.
    by_cols = N >= M
    unit = max(1, 64 // item)

    def share(lo, hi):
        # A share of out: rows (or columns) lo*unit .. hi*unit.
        r0, r1 = lo * unit, min(hi * unit, N if by_cols else M)
        if r1 <= r0:
            return
        if by_cols:     # out[:, r0:r1] = op(a) @ op(b)[:, r0:r1]
            off_b = (r0 * ldb if trans_b else r0) * item
            fn(_ROW_MAJOR, ta, tb, M, r1 - r0, K, 1.0, pa, lda, pb + off_b, ldb, beta,
               pc + r0 * item, ldc)
        else:           # out[r0:r1] = op(a)[r0:r1] @ op(b)
            off_a = (r0 if trans_a else r0 * lda) * item
            fn(_ROW_MAJOR, ta, tb, r1 - r0, N, K, 1.0, pa + off_a, lda, pb, ldb, beta,
               pc + r0 * ldc * item, ldc)

    flops = 2.0 * M * N * K
    if threads is None:
        threads = _threads.gemm_threads(flops)
    # A large multiply is always cut into the same GEMM_PIECES pieces, however
    # many threads take them: OpenBLAS may round a block of columns
    # differently from the whole, and a result must not depend on the
    # thread count the load check gives (resumed training is compared bit for
    # bit). Small multiplies are one call. Several pieces per thread also let
    # a late thread's piece go to another.
    pieces = _threads.fixed_pieces(GEMM_PIECES) if (
        flops >= _threads.GEMM_SERIAL_FLOPS or threads > 1) else 1
    with _one_openblas_thread(_state):
        _threads.run_shares(share, -(-(N if by_cols else M) // unit), threads, pieces=pieces)
    return out


@njit(nogil=True, cache=True)
def _gemm_loop(fn, ta, tb, M, N, K, alpha, pa, sa, lda, pb, sb, ldb, beta, pc, sc, ldc, lo, hi):
    """``fn`` (a CBLAS gemm, passed as a function pointer) for the multiplies
    ``lo .. hi`` of a batch whose k-th matrices start at ``pa + k sa`` (bytes),
    ``pb + k sb`` and ``pc + k sc``. Compiled, without the GIL: a ctypes call
    from Python costs about 1.5 us of argument conversion, and a Winograd
    layer makes 48 of them (35 against 7 us a batch of 16 small ones)."""
    for k in range(lo, hi):
        fn(101, ta, tb, M, N, K, alpha, pa + k * sa, lda, pb + k * sb, ldb, beta,
           pc + k * sc, ldc)


def gemm_batch(a, b, out, trans_a=False, trans_b=False, threads=None):
    """``out[k] = op(a[k]) @ op(b[k])`` for every k: 3-D arrays, each ``[k]``
    a matrix as ``gemm`` takes it (any stride between the k).

    The k are split into contiguous shares, one per thread (``threads``, or
    ``_threads.gemm_threads`` of the whole batch's FLOPs), and each multiply
    runs whole on one OpenBLAS thread, so no thread waits on another inside
    one. The checks and pointers are worked out once for the batch, and the
    multiplies of a share are called from compiled code (``_gemm_loop``)."""
    global _state
    if _state is None:
        _state = _load()
    B = a.shape[0]
    M, K = (a.shape[2], a.shape[1]) if trans_a else a.shape[1:]
    N = b.shape[1] if trans_b else b.shape[2]
    if threads is None:
        threads = _threads.gemm_threads(2.0 * M * N * K * B)
    usable = (_state["lib"] is not None and a.dtype == b.dtype == out.dtype
              and a.dtype in (np.float32, np.float64) and M and N and K
              and all(m.strides[2] == m.itemsize and m.strides[1] >= m.shape[2] * m.itemsize
                      for m in (a, b, out)))
    if not usable:
        def share(lo, hi):
            for k in range(lo, hi):
                gemm(a[k], b[k], trans_a, trans_b, out=out[k], threads=1)
        if _state["lib"] is None:
            _threads.run_shares(share, B, threads, pieces=B if threads > 1 else None)
        else:
            with _one_openblas_thread(_state):
                _threads.run_shares(share, B, threads, pieces=B if threads > 1 else None)
        return out
    single = a.dtype == np.float32
    fn = _state["sgemm_ptr"] if single else _state["dgemm_ptr"]
    one, zero = (np.float32(1), np.float32(0)) if single else (np.float64(1), np.float64(0))
    item = a.itemsize
    ta, tb = (_TRANS if trans_a else _NO_TRANS), (_TRANS if trans_b else _NO_TRANS)
    lda, ldb, ldc = a.strides[1] // item, b.strides[1] // item, out.strides[1] // item
    pa, pb, pc = a.ctypes.data, b.ctypes.data, out.ctypes.data
    sa, sb, sc = a.strides[0], b.strides[0], out.strides[0]

    def share(lo, hi):
        _gemm_loop(fn, ta, tb, M, N, K, one, pa, sa, lda, pb, sb, ldb, zero, pc, sc, ldc, lo, hi)

    with _one_openblas_thread(_state):
        _threads.run_shares(share, B, threads, pieces=B if threads > 1 else None)
    return out
