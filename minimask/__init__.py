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

from minimask.backend import BACKENDS, get_backend, set_backend, using_backend  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BACKENDS", "get_backend", "set_backend", "using_backend", "__version__"]
