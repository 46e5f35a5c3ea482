"""minimask: RetinaMask from scratch in NumPy, with hand-written backward
passes and Numba CPU / CUDA kernels.

>>> import minimask
>>> minimask.get_backend()
'cpu'
"""
import os

# Numba's parallel kernels run on OpenMP threads that, by default, spin for a
# while after each parallel loop waiting for more work. Between two kernels
# the GEMM runs on OpenBLAS's own threads, and on a 2-core laptop the spinning
# OpenMP threads steal its cores: a training step of the tiny model at
# 128x128 took 1.21 s that way and 0.078 s with passive waiting (measured on
# the 2-core CI machine). Must be set before OpenMP starts; a user's own
# setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")


def _keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks for reuse.

    A training step allocates and frees the same large arrays (im2col
    columns, activations: up to tens of MB) every time. By default glibc
    hands blocks above its mmap threshold back to the kernel on free and
    asks for fresh ones on the next malloc, so every step pays for page
    faults and for the kernel zeroing pages (and, with NumPy's huge-page
    advice, compacting memory). Raising the mmap threshold to its maximum
    (32 MB) and the trim threshold to 1 GB keeps those blocks in the heap:
    on the tiny model this cut a step's page faults from ~4500 to ~150 and
    its system time from 0.05 s to under 0.01 s. Linux/glibc only; set
    ``MINIMASK_MALLOPT=0`` to leave malloc alone. Returns whether it applied.
    """
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


MALLOC_TUNED = _keep_freed_memory()

from minimask.backend import BACKENDS, get_backend, set_backend, using_backend  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BACKENDS", "get_backend", "set_backend", "using_backend", "__version__"]
