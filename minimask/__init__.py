"""minimask: RetinaMask from scratch in NumPy, with hand-written backward
passes and Numba CPU / CUDA kernels.

>>> import minimask
>>> minimask.get_backend()
'cpu'
"""
from minimask.backend import BACKENDS, get_backend, set_backend, using_backend

__version__ = "0.1.0"
__all__ = ["BACKENDS", "get_backend", "set_backend", "using_backend", "__version__"]
