"""The matrix multiply of the ``"cpu"`` backend: BLAS, with minimask's own
choice of threads.

NumPy's ``@`` calls the OpenBLAS inside NumPy, whose worker threads spin for
a while after every multiply, waiting for the next one (OpenBLAS's
``THREAD_TIMEOUT``, read once when the library loads). Between two
multiplies minimask runs its Numba kernels on all cores, and on a 2-core
machine the spinning thread takes a core from them; NumPy's copy has loaded
long before minimask runs, so its timeout cannot be changed.

SciPy (a dependency) ships a second copy of OpenBLAS, which nothing loads
until ``scipy.linalg`` is used. When that copy is not loaded yet, this
module loads it with ``OPENBLAS_THREAD_TIMEOUT=4`` in the environment (its
threads go to sleep at once) and restores the environment right after.
Every call then sets the number of OpenBLAS threads for the calling thread
only (``openblas_set_num_threads_local``): one thread when the multiply is
small, Numba's thread count otherwise (``minimask._threads.gemm_threads``).
OpenBLAS picks its kernels (AVX2, AVX-512, ...) for the CPU at load, unless
``OPENBLAS_CORETYPE`` says otherwise - a user's setting, left as it is
(``info()`` reports the kernels in use).

The one effect outside minimask: SciPy's own linear algebra, used later in
the same process, runs on the same copy, so with threads that sleep at
once. ``MINIMASK_BLAS=numpy`` turns all of this off (NumPy's ``@``
everywhere); when SciPy's copy cannot be found (another BLAS vendor,
another platform) the same happens.
"""
from __future__ import annotations

import ctypes
import glob
import os

import numpy as np

from minimask import _threads

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112

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
    """Load SciPy's OpenBLAS as described in the module docstring; returns the
    state dict (``lib`` None when NumPy's ``@`` is to be used)."""
    state = {"lib": None, "path": None, "coretype": None, "why": ""}
    if os.environ.get("MINIMASK_BLAS", "").lower() == "numpy":
        state["why"] = "MINIMASK_BLAS=numpy"
        return state
    path = _scipy_openblas_path()
    if path is None:
        state["why"] = "SciPy's OpenBLAS not found"
        return state
    try:
        with open("/proc/self/maps") as f:
            already = os.path.basename(path) in f.read()
    except OSError:                 # not Linux: assume someone may have loaded it
        already = True
    changes = {}
    if not already and "OPENBLAS_THREAD_TIMEOUT" not in os.environ:
        changes["OPENBLAS_THREAD_TIMEOUT"] = "4"
    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        state["why"] = f"could not load {path}: {exc}"
        return state
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        sgemm, dgemm = lib.scipy_cblas_sgemm, lib.scipy_cblas_dgemm
        set_local = lib.openblas_set_num_threads_local
        corename = lib.scipy_openblas_get_corename
    except AttributeError as exc:
        state["why"] = f"{path} lacks a symbol: {exc}"
        return state
    i, p = ctypes.c_int, ctypes.c_void_p
    for fn, real in ((sgemm, ctypes.c_float), (dgemm, ctypes.c_double)):
        fn.argtypes = [i, i, i, i, i, i, real, p, i, p, i, real, p, i]
        fn.restype = None
    set_local.argtypes, set_local.restype = [i], i
    corename.restype = ctypes.c_char_p
    state.update(lib=lib, path=path, sgemm=sgemm, dgemm=dgemm, set_local=set_local,
                 coretype=corename().decode(), why="loaded" if not already else
                 "already loaded by someone else: its thread timeout as it was")
    return state


def info() -> dict:
    """What the ``"cpu"`` GEMM runs on: ``{"blas": "scipy-openblas" or
    "numpy", "path", "coretype", "why"}``."""
    global _state
    if _state is None:
        _state = _load()
    return {"blas": "scipy-openblas" if _state["lib"] is not None else "numpy",
            "path": _state["path"], "coretype": _state["coretype"], "why": _state["why"]}


def gemm(a, b, trans_a=False, trans_b=False, out=None, accumulate=False):
    """``op(a) @ op(b)`` on the host, into ``out`` when given (``out +=`` when
    ``accumulate``). a and b are 2-D float32 or float64 arrays of one dtype
    whose last axis is contiguous (row-major views with any row stride);
    the caller checks shapes. Threads: ``_threads.gemm_threads`` of the
    multiply's FLOPs."""
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
    threads = _threads.gemm_threads(2.0 * M * N * K)
    previous = _state["set_local"](threads)
    try:
        fn(_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS, _TRANS if trans_b else _NO_TRANS,
           M, N, K, 1.0, a.ctypes.data, a.strides[0] // item, b.ctypes.data,
           b.strides[0] // item, 1.0 if accumulate else 0.0, out.ctypes.data,
           out.strides[0] // item)
    finally:
        _state["set_local"](previous)
    return out
