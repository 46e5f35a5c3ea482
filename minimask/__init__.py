"""minimask: RetinaMask from scratch in NumPy, with hand-written backward
passes and Numba CPU / CUDA kernels.

>>> import minimask
>>> minimask.get_backend()
'cpu'
"""
# Importing minimask changes nothing outside it: no environment variables,
# no malloc settings. What a process that minimask owns should set (passive
# OpenMP waiting, glibc keeping freed memory) is applied by
# ``configure_process()``, which the command line, ``train`` and the
# data-parallel workers call first; a script may call it too (minimask/_process.py).
from minimask._process import configure_process  # noqa: E402

# whether configure_process() tuned glibc's malloc in this process
MALLOC_TUNED = False

from minimask.backend import BACKENDS, get_backend, set_backend, using_backend  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BACKENDS", "configure_process", "get_backend", "set_backend", "using_backend",
           "__version__"]
