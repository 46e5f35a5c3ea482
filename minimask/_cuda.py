"""Glue shared by the ``"cuda"`` backend of every layer.

Kernels live in their layer's module, next to the NumPy reference and the
Numba CPU kernel; this file holds only what all of them need:

* ``cuda`` - ``numba.cuda``, imported lazily so that ``import minimask``
  works where numba-cuda is missing;
* ``THREADS_PER_BLOCK`` and ``blocks_for`` - a 1-D launch of one thread per
  output element, with a ceil-div grid (every kernel guards ``i < n``);
  256 threads on a GPU, 32 in the simulator;
* ``to_device`` / ``to_output`` - host arrays are copied over and results
  copied back, device arrays stay on the device, so a chain of layers on
  device arrays never touches the host;
* ``compile_for_both`` - a helper written once in plain Python, compiled as
  an inlined ``njit`` function for the CPU and as a ``cuda.jit`` device
  function for the GPU (the MiniTorch trick).

To run the CUDA kernels without a GPU, set ``NUMBA_ENABLE_CUDASIM=1`` before
Numba is imported: the Numba CUDA simulator then runs each thread as Python.
It is slow, so keep sizes tiny there.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from minimask._checks import is_device_array

import numba as _numba

# Under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1) every thread of a block
# runs as a Python thread, so the same kernels are launched with 32-thread
# blocks there (and the GEMM with smaller tiles, see layers/gemm.py): every
# block-size-dependent loop and tree reduction is written for any power of
# two, and small blocks make tiny tests cross block boundaries more often.
# A GPU gets 256.
SIMULATED = bool(_numba.config.ENABLE_CUDASIM)
THREADS_PER_BLOCK = 32 if SIMULATED else 256

try:  # numba-cuda is optional: "numpy" and "cpu" work without it
    from numba import cuda
except ImportError:  # pragma: no cover - exercised only without numba-cuda
    cuda = None


def cuda_available() -> bool:
    """True when kernels can run: a GPU with a driver, or the simulator."""
    if cuda is None:
        return False
    try:
        return bool(cuda.is_available())
    except Exception:  # a broken driver counts as no GPU
        return False


def require_cuda() -> None:
    if not cuda_available():
        raise RuntimeError(
            "the 'cuda' backend needs numba-cuda and an NVIDIA GPU with a driver "
            "(or NUMBA_ENABLE_CUDASIM=1 for the slow CUDA simulator); "
            "use set_backend('cpu') on this machine")


def blocks_for(n: int, threads: int = THREADS_PER_BLOCK) -> int:
    """Number of blocks so that ``blocks * threads >= n`` (at least one)."""
    return max(1, math.ceil(n / threads))


def launch_config(n: int) -> tuple[int, int]:
    """``(blocks, threads)`` for one thread per element of ``n``: blocks of
    THREADS_PER_BLOCK, or for small ``n`` a single block of the smallest
    power of two >= 32 that covers it (the simulator runs every thread, idle
    ones included, as a Python thread, so small launches keep it quick)."""
    threads = 32
    while threads < n and threads < THREADS_PER_BLOCK:
        threads *= 2
    return blocks_for(n, threads), threads


def to_host(a):
    """A NumPy array of ``a``, copying it back if it lives on the device."""
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def to_device(a):
    """Return ``a`` as a device array (copying host arrays over)."""
    require_cuda()
    if is_device_array(a):
        return a if hasattr(a, "copy_to_host") else cuda.as_cuda_array(a)
    return cuda.to_device(np.ascontiguousarray(a))


def to_output(d_out, like):
    """Return a kernel's result as the caller gave its input: a host input
    gets a host array back, a device input a device array."""
    return d_out if is_device_array(like) else d_out.copy_to_host()


def device_zeros(shape, dtype):
    """A zero-filled device array (Numba has no ``cuda.zeros``)."""
    require_cuda()
    d = cuda.device_array(shape, dtype=dtype)
    if d.size:
        _fill_zero[blocks_for(d.size), THREADS_PER_BLOCK](d.reshape(d.size))
    return d


def compile_for_both(pyfunc):
    """Compile a scalar helper for both targets.

    Returns ``(cpu_version, cuda_version)``: ``njit(inline="always")`` and
    ``cuda.jit(device=True)`` builds of the same Python source, so the
    arithmetic (a bilinear weight, an index) is written exactly once. Where
    numba-cuda is missing the CUDA version is ``None``.
    """
    cpu_version = njit(inline="always", cache=True)(pyfunc)
    cuda_version = cuda.jit(device=True)(pyfunc) if cuda is not None else None
    return cpu_version, cuda_version


def _nchw_of(t, C, H, W):
    """The (n, c, h, w) of flat index ``t`` in a C-contiguous (N, C, H, W)
    array: what a one-thread-per-element kernel needs first."""
    w = t % W
    h = (t // W) % H
    c = (t // (W * H)) % C
    n = t // (W * H * C)
    return n, c, h, w


nchw_of_cpu, nchw_of_cuda = compile_for_both(_nchw_of)


def device_sum(d, squares=False):
    """The float64 sum of the elements of device array ``d`` (of their
    squares with ``squares=True``), as a 1-element device array: one thread
    per element, a shared-memory tree per block, one atomic add per block."""
    require_cuda()
    total = device_zeros(1, np.float64)
    n = d.size
    if n:
        _sum_into[blocks_for(n), THREADS_PER_BLOCK](d.reshape(n), bool(squares), total)
    return total


if cuda is not None:
    from numba import float64 as _float64

    @cuda.jit
    def _fill_zero(flat):
        i = cuda.grid(1)
        if i < flat.size:
            flat[i] = 0

    @cuda.jit
    def _sum_into(flat, squares, total):
        partial = cuda.shared.array(THREADS_PER_BLOCK, _float64)
        i = cuda.grid(1)
        tid = cuda.threadIdx.x
        v = 0.0
        if i < flat.size:
            v = flat[i]
            if squares:
                v = v * v
        partial[tid] = v
        cuda.syncthreads()
        step = THREADS_PER_BLOCK // 2
        while step > 0:         # every thread reaches every barrier
            if tid < step:
                partial[tid] += partial[tid + step]
            cuda.syncthreads()
            step //= 2
        if tid == 0:
            cuda.atomic.add(total, 0, partial[0])
