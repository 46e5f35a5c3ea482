"""Which implementation the layer functions run on.

Three backends compute the same functions:

=========  =============================================  =====================
name       what                                           used for
=========  =============================================  =====================
"numpy"    plain NumPy, written to be read next to the     notebooks, and the
           equations                                      reference in tests
"cpu"      Numba ``njit(parallel=True, cache=True)``       training on a laptop
           kernels                                        (the default)
"cuda"     ``numba.cuda`` kernels on device arrays         an NVIDIA GPU
=========  =============================================  =====================

The choice is process-wide state, read by every layer function when it is
called (not when it is imported), so switching is cheap::

    import minimask
    minimask.set_backend("numpy")
    with minimask.using_backend("cpu"):
        ...                         # back to "numpy" afterwards
"""
from __future__ import annotations

import contextlib
import os

BACKENDS = ("numpy", "cpu", "cuda")

# MINIMASK_BACKEND lets a reader run a whole notebook or script on another
# backend without editing it.
_current = os.environ.get("MINIMASK_BACKEND", "cpu")
if _current not in BACKENDS:
    raise ValueError(f"MINIMASK_BACKEND must be one of {BACKENDS}, got {_current!r}")


def get_backend() -> str:
    """The name of the backend layer functions run on now."""
    return _current


def set_backend(name: str) -> None:
    """Make every layer function run on ``name`` ("numpy", "cpu" or "cuda")."""
    global _current
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "cuda":
        from minimask import _cuda
        _cuda.require_cuda()
    _current = name


@contextlib.contextmanager
def using_backend(name: str):
    """Run the body of a ``with`` block on backend ``name``, then restore."""
    previous = get_backend()
    set_backend(name)
    try:
        yield name
    finally:
        set_backend(previous)
