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

Backends as objects
-------------------
Behind each name stands one ``Backend`` object (MiniTorch calls the idea a
``TensorBackend``). It knows two things:

* how to hold arrays on its device: ``asarray`` (bring an array over,
  copying only if it lives elsewhere), ``to_host``, ``output`` (hand a
  result back the way the caller gave its input), ``zeros`` / ``empty``,
  and a reduction to one host number (``total``);
* which kernels it runs: a table from operation name (``"relu_forward"``,
  ``"conv.im2col"``, ...) to a function. Each layer module registers its
  NumPy reference, its Numba kernel and its CUDA kernel under the same name
  with ``NUMPY``, ``CPU`` and ``CUDA``; the public ``*_forward`` looks the
  operation up on ``current_backend()`` and keeps that backend in its cache,
  so ``*_backward`` runs where its forward ran whatever the setting is then.

``get_backend()`` still returns the name, as it always has; ``current_backend()``
returns the object.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np

BACKENDS = ("numpy", "cpu", "cuda")


class Backend:
    """One device's arrays and the kernels that run on them.

    Subclasses say how arrays are held (``asarray``, ``to_host``, ``zeros``,
    ...); layer modules fill the kernel table with ``register``.
    """

    name = ""
    on_device = False   # True when arrays live in GPU memory

    def __init__(self):
        self._ops = {}

    def __repr__(self):
        return f"<minimask backend {self.name!r}>"

    # -- kernels -------------------------------------------------------------

    def register(self, op: str, fn=None):
        """Make ``fn`` this backend's implementation of ``op``; usable as a
        decorator (``@CPU.register("relu_forward")``). Returns ``fn``."""
        if fn is None:
            return lambda f: self.register(op, f)
        self._ops[op] = fn
        return fn

    def op(self, op: str):
        """The implementation of ``op`` on this backend."""
        try:
            return self._ops[op]
        except KeyError:
            raise NotImplementedError(f"the {self.name!r} backend has no implementation of "
                                      f"{op!r}") from None

    def has(self, op: str) -> bool:
        return op in self._ops

    # -- arrays (host backends; CudaBackend overrides) -----------------------

    def is_native(self, a) -> bool:
        """True when ``a`` is an array this backend computes on as it is."""
        return isinstance(a, np.ndarray)

    def asarray(self, a, dtype=None):
        """``a`` as an array of this backend, copied over only if it lives
        elsewhere (None passes through)."""
        if a is None:
            return None
        a = _host(a)
        return a if dtype is None else a.astype(dtype, copy=False)

    def to_host(self, a):
        """A NumPy array with the values of ``a``."""
        return _host(a)

    def output(self, a, like=None):
        """A result returned to a caller whose input was ``like``: host
        backends always return host arrays."""
        return a

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def empty(self, shape, dtype):
        return np.empty(shape, dtype=dtype)

    def total(self, a) -> float:
        """The float64 sum of every element of ``a``, as a host number."""
        return float(np.sum(a, dtype=np.float64))


def _host(a):
    if a is None or isinstance(a, np.ndarray):
        return a
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    if hasattr(a, "__cuda_array_interface__"):
        from numba import cuda
        return cuda.as_cuda_array(a).copy_to_host()
    return np.asarray(a)


class NumpyBackend(Backend):
    """Plain NumPy on the host: the reference the other two are tested against."""

    name = "numpy"


class CpuBackend(Backend):
    """Numba ``njit`` kernels on host (NumPy) arrays."""

    name = "cpu"


class CudaBackend(Backend):
    """``numba.cuda`` kernels on device arrays.

    Host inputs are copied over, and a function given a host input returns
    host results (``output``); a caller that passes device arrays gets device
    arrays, so a chain of layers never touches the host. Every copy in either
    direction goes through ``asarray`` / ``to_host`` / ``output``, which keep
    a count (``copies``) that tests read to prove what crosses PCIe.
    """

    name = "cuda"
    on_device = True

    def __init__(self):
        super().__init__()
        self.copies = []          # (direction, nbytes, shape) while counting
        self.counting = False

    def _record(self, direction, a):
        if self.counting:
            self.copies.append((direction, int(a.nbytes), tuple(a.shape)))

    def is_native(self, a) -> bool:
        from minimask._checks import is_device_array
        return is_device_array(a)

    def asarray(self, a, dtype=None):
        if a is None:
            return None
        from minimask import _cuda
        if self.is_native(a):
            d = _cuda.to_device(a)
            if dtype is not None and d.dtype != np.dtype(dtype):
                raise ValueError(f"expected a device array of dtype {np.dtype(dtype)}, "
                                 f"got {d.dtype} (no silent cast on the device)")
            return d
        a = np.ascontiguousarray(a, dtype=dtype)
        self._record("to_device", a)
        return _cuda.to_device(a)

    def to_host(self, a):
        if a is None or isinstance(a, np.ndarray):
            return a
        host = _host(a)
        self._record("to_host", host)
        return host

    def output(self, a, like=None):
        """Device for a device ``like`` (or none given), host for a host one."""
        if a is None or like is None or self.is_native(like):
            return a
        return self.to_host(a)

    def zeros(self, shape, dtype):
        from minimask import _cuda
        return _cuda.device_zeros(shape, dtype)

    def empty(self, shape, dtype):
        from minimask._cuda import cuda
        return cuda.device_array(shape, dtype=dtype)

    def total(self, a) -> float:
        from minimask import _cuda
        return float(self.to_host(_cuda.device_sum(self.asarray(a)))[0])

    @contextlib.contextmanager
    def counting_copies(self):
        """Record every host<->device copy made through this backend inside
        the ``with`` block; yields the list of ``(direction, nbytes, shape)``."""
        self.copies = []
        self.counting = True
        try:
            yield self.copies
        finally:
            self.counting = False


NUMPY = NumpyBackend()
CPU = CpuBackend()
CUDA = CudaBackend()
_OBJECTS = {"numpy": NUMPY, "cpu": CPU, "cuda": CUDA}

# MINIMASK_BACKEND lets a reader run a whole notebook or script on another
# backend without editing it.
_current = os.environ.get("MINIMASK_BACKEND", "cpu")
if _current not in BACKENDS:
    raise ValueError(f"MINIMASK_BACKEND must be one of {BACKENDS}, got {_current!r}")


def get_backend() -> str:
    """The name of the backend layer functions run on now."""
    return _current


def current_backend() -> Backend:
    """The backend object layer functions run on now."""
    return _OBJECTS[_current]


def backend_object(name: str) -> Backend:
    """The backend object called ``name``."""
    if name not in _OBJECTS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return _OBJECTS[name]


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
