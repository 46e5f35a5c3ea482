"""Input checks shared by every public function.

A layer kernel that gets a wrong shape either crashes far from the cause or,
worse, returns wrong numbers. These helpers turn that into a ``ValueError``
that names the argument, what it got and what was expected.
"""
from __future__ import annotations

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def is_device_array(a) -> bool:
    """True for arrays that live on a GPU (Numba device arrays, CuPy, ...),
    and for the CUDA simulator's stand-ins, which have ``copy_to_host`` but
    no ``__cuda_array_interface__``."""
    if isinstance(a, np.ndarray):
        return False
    return hasattr(a, "__cuda_array_interface__") or hasattr(a, "copy_to_host")


def _shape_text(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_float_array(name: str, a, ndim: int | None = None, what: str | None = None,
                      finite: bool = False):
    """Return ``a`` as a float32/float64 array (host or device), or raise.

    ``ndim`` is the expected number of dimensions and ``what`` the layout in
    words (e.g. ``"(N, C, H, W)"``), used in the message. Lists are turned into
    arrays; integer and other dtypes are refused rather than silently cast, so
    that float64 gradient checks stay float64. ``finite=True`` also refuses NaN
    and infinity (host arrays only: checking a device array would copy it).
    """
    if a is None:
        raise ValueError(f"{name} must be an array, got None")
    if not is_device_array(a):
        a = np.asarray(a)
    if a.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got dtype {a.dtype}")
    if ndim is not None and len(a.shape) != ndim:
        layout = f" {what}" if what else ""
        raise ValueError(f"{name} must have {ndim} dimensions{layout}, "
                         f"got shape {_shape_text(a.shape)}")
    if finite and isinstance(a, np.ndarray) and not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def check_same_shape(name: str, a, ref_name: str, ref) -> None:
    """Raise unless ``a`` and ``ref`` have the same shape."""
    if tuple(a.shape) != tuple(ref.shape):
        raise ValueError(f"{name} must have the shape of {ref_name} "
                         f"{_shape_text(ref.shape)}, got {_shape_text(a.shape)}")


def check_same_dtype(name: str, a, ref_name: str, ref) -> None:
    """Raise unless ``a`` has the dtype of ``ref`` (no silent up/down-casting)."""
    if a.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), "
                         f"got {a.dtype}")


def check_positive_int(name: str, value) -> int:
    """Return ``value`` as an int, or raise unless it is an integer >= 1."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_nonnegative_int(name: str, value) -> int:
    """Return ``value`` as an int, or raise unless it is an integer >= 0."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def pair(name: str, value, check=check_positive_int) -> tuple[int, int]:
    """Turn an int or a pair of ints into ``(h, w)``, checking each."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        return check(name, value[0]), check(name, value[1])
    v = check(name, value)
    return v, v
