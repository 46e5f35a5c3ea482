"""Parameters, modules, and the SGD optimiser.

Deliberately small: a ``Parameter`` is a value with a gradient next to it,
a ``Module`` is something that owns parameters (directly or through child
modules), and the optimiser walks them. There is no autograd here - every
module writes its own backward from the layer functions' ``*_backward``.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile

import numpy as np


class Parameter:
    """A trainable array and the gradient that backward accumulates into it."""

    def __init__(self, value):
        value = np.asarray(value)
        if value.dtype not in (np.float32, np.float64):
            raise ValueError(f"a Parameter must be float32 or float64, got {value.dtype}")
        self.value = value
        self.grad = np.zeros_like(value)

    @property
    def shape(self):
        return self.value.shape

    def zero_grad(self) -> None:
        self.grad[...] = 0

    def __repr__(self) -> str:
        return f"Parameter(shape={self.value.shape}, dtype={self.value.dtype})"


class Module:
    """Base class: finds its parameters and child modules by attribute.

    Attributes that are a ``Parameter``, a ``Module``, or a list/tuple of
    modules are registered by name, so ``named_parameters`` gives dotted
    names such as ``"fpn.lateral3.weight"`` (or ``"heads.0.weight"`` for a
    list) that are stable across runs - the keys of ``state_dict``.
    """

    def named_parameters(self, prefix: str = ""):
        for name, value in vars(self).items():
            full = f"{prefix}{name}"
            if isinstance(value, Parameter):
                yield full, value
            elif isinstance(value, Module):
                yield from value.named_parameters(full + ".")
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Module):
                        yield from item.named_parameters(f"{full}.{i}.")
                    elif isinstance(item, Parameter):
                        yield f"{full}.{i}", item

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.zero_grad()

    def num_parameters(self) -> int:
        return sum(p.value.size for p in self.parameters())

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameter values by dotted name (copies)."""
        return {name: p.value.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, np.ndarray], strict: bool = True) -> None:
        """Copy values into the parameters, refusing missing, extra or
        mis-shaped entries with a message that names them."""
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise ValueError("state dict does not match the module: "
                             f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        for name, p in own.items():
            if name not in state:
                continue
            value = np.asarray(state[name])
            if value.shape != p.value.shape:
                raise ValueError(f"state dict entry {name!r} has shape {value.shape}, "
                                 f"the module expects {p.value.shape}")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"state dict entry {name!r} contains NaN or infinity")
            p.value[...] = value.astype(p.value.dtype, copy=False)

    def save(self, path, metadata: dict | None = None) -> None:
        """Write the parameters to ``path`` as ``.npz``, atomically."""
        save_npz(path, self.state_dict(), metadata)

    def load(self, path, strict: bool = True) -> dict:
        """Load parameters written by ``save``; returns its metadata."""
        state, metadata = load_npz(path)
        self.load_state_dict(state, strict=strict)
        return metadata


_METADATA_KEY = "__metadata__"


def save_npz(path, arrays: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Save arrays (and a JSON-able ``metadata`` dict) to ``path``.

    The file is written next to its destination and renamed over it, so a
    crash or Ctrl-C mid-write leaves the previous file intact, never half of
    a new one.
    """
    path = os.fspath(path)
    if _METADATA_KEY in arrays:
        raise ValueError(f"{_METADATA_KEY!r} is reserved for the metadata")
    payload = dict(arrays)
    payload[_METADATA_KEY] = np.frombuffer(json.dumps(metadata or {}).encode(), dtype=np.uint8)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a checkpoint is an ordinary file
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):   # a full disk says only "No space left on device"
            raise OSError(e.errno, f"cannot write {path!r}: {e.strerror or e}") from None
        raise


def load_npz(path) -> tuple[dict[str, np.ndarray], dict]:
    """Load ``(arrays, metadata)`` saved by ``save_npz``, without pickle.

    A missing, truncated or otherwise unreadable file raises ``ValueError``
    saying which file and why. So does an array that is not floating point
    (minimask saves only float32/float64 arrays; integers in their place
    mean the values were rounded on the way) and an array whose header
    declares more data than its file holds (checked before anything is
    allocated).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"weights file {path!r} is a directory, not a .npz file (give the "
                         f"checkpoint inside it, e.g. {os.path.join(path, 'checkpoint.npz')!r})")
    if not os.path.isfile(path):
        raise ValueError(f"weights file {path!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"weights file {path!r} is not a readable .npz file (not a zip archive)")
    try:
        _check_npz_headers(path)
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise ValueError(f"weights file {path!r} is not a readable .npz file ({e})") from None
    metadata = {}
    if _METADATA_KEY in arrays:
        try:
            metadata = json.loads(arrays.pop(_METADATA_KEY).tobytes().decode())
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"weights file {path!r} has corrupt metadata "
                             f"({type(e).__name__}: {str(e)[:80]})") from None
    for name, value in arrays.items():
        if value.dtype.kind != "f":
            raise ValueError(f"weights file {path!r}: array {name!r} is {value.dtype}, not "
                             f"floating point; minimask saves float32/float64 arrays, and "
                             f"loading these would use values rounded to integers")
    return arrays, metadata


def _check_npz_headers(path) -> None:
    """Read each member's ``.npy`` header and compare the bytes its shape
    and dtype declare with the bytes the member holds, so that a header
    claiming 10^12 elements is refused instead of allocated."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"array {info.filename[:-4]!r} has an unknown .npy "
                                     f"version {version}")
                header_bytes = f.tell()
            if dtype.hasobject:
                raise ValueError(f"array {info.filename[:-4]!r} holds Python objects, which "
                                 f"are never loaded (no pickle)")
            declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
            held = info.file_size - header_bytes
            if declared != held:
                raise ValueError(f"array {info.filename[:-4]!r} declares shape {shape} "
                                 f"{dtype} ({declared} bytes) but holds {held} bytes")


class SGD:
    """Stochastic gradient descent with momentum and weight decay.

    For each parameter ``w`` with gradient ``g`` (PyTorch's formulation)::

        g = g + weight_decay * w
        v = momentum * v + g
        w = w - lr * v
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
        self.params = list(params)
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.velocity = [np.zeros_like(p.value) for p in self.params]

    def step(self) -> None:
        for p, v in zip(self.params, self.velocity):
            g = p.grad
            if self.weight_decay:
                g = g + self.weight_decay * p.value
            v *= self.momentum
            v += g
            p.value -= self.lr * v

    def zero_grad(self) -> None:
        for p in self.params:
            p.zero_grad()

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"velocity.{i}": v.copy() for i, v in enumerate(self.velocity)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for i, v in enumerate(self.velocity):
            key = f"velocity.{i}"
            if key not in state or state[key].shape != v.shape:
                raise ValueError(f"optimiser state {key!r} is missing or has the wrong shape")
            v[...] = state[key]
