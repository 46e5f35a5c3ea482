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
    """A trainable array and the gradient that backward accumulates into it.

    ``frozen`` marks a parameter the optimiser must leave alone (a pretrained
    stage kept fixed, as torchvision's ``trainable_layers``): it is still
    saved and loaded, but training does not update it or count it in the
    gradient norm."""

    def __init__(self, value, frozen: bool = False):
        value = np.asarray(value)
        if value.dtype not in (np.float32, np.float64):
            raise ValueError(f"a Parameter must be float32 or float64, got {value.dtype}")
        self.value = value
        self.grad = np.zeros_like(value)
        self.frozen = bool(frozen)

    @property
    def shape(self):
        return self.value.shape

    def zero_grad(self) -> None:
        if isinstance(self.grad, np.ndarray):
            self.grad[...] = 0
        else:
            from minimask.layers import glue
            glue.fill(self.grad, 0, _device_backend())

    def accumulate(self, g) -> None:
        """``grad += g``, on the device when the parameter lives there."""
        if isinstance(self.grad, np.ndarray):
            self.grad += g if isinstance(g, np.ndarray) else _host_copy(g)
        else:
            from minimask.layers import glue
            glue.add_into(self.grad, g, _device_backend())

    @property
    def on_device(self) -> bool:
        return not isinstance(self.value, np.ndarray)

    def move_to(self, be) -> None:
        """Put value and gradient on backend ``be``'s device (a GPU for
        "cuda", the host otherwise); a no-op when they are there already."""
        if be.on_device and not self.on_device:
            self.value, self.grad = be.asarray(self.value), be.asarray(self.grad)
        elif not be.on_device and self.on_device:
            self.value, self.grad = _host_copy(self.value), _host_copy(self.grad)

    def assign(self, value) -> None:
        """Overwrite the value in place with host array ``value`` (cast to
        the parameter's dtype), wherever the parameter lives."""
        value = np.asarray(value).astype(self.value.dtype, copy=False)
        if isinstance(self.value, np.ndarray):
            self.value[...] = value
        else:
            self.value.copy_to_device(np.ascontiguousarray(value))

    def __repr__(self) -> str:
        return f"Parameter(shape={self.value.shape}, dtype={self.value.dtype})"


class Module:
    """Base class: finds its parameters, buffers and child modules by attribute.

    Attributes that are a ``Parameter``, a ``Module``, or a list/tuple of
    modules are registered by name, so ``named_parameters`` gives dotted
    names such as ``"fpn.lateral3.weight"`` (or ``"heads.0.weight"`` for a
    list) that are stable across runs - the keys of ``state_dict``.

    A *buffer* (``register_buffer``, as in ``torch.nn.Module``) is state that
    is not trained but belongs to the model - running statistics, say. It
    stays an ordinary attribute (``self.name`` is the array), is saved and
    loaded with the parameters, and is not in ``parameters()``, so the
    optimiser never touches it.
    """

    def register_buffer(self, name: str, value) -> None:
        """Make ``self.<name> = value`` a buffer: saved in ``state_dict``,
        restored by ``load_state_dict``, not a parameter."""
        names = vars(self).setdefault("_buffer_names", [])
        if name not in names:
            names.append(name)
        setattr(self, name, np.array(value))

    def _buffer_slots(self, prefix: str = ""):
        """``(dotted name, owning module, attribute)`` of every buffer."""
        for name in vars(self).get("_buffer_names", ()):
            yield f"{prefix}{name}", self, name
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield from value._buffer_slots(f"{prefix}{name}.")
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Module):
                        yield from item._buffer_slots(f"{prefix}{name}.{i}.")

    def named_buffers(self, prefix: str = ""):
        for full, module, attr in self._buffer_slots(prefix):
            yield full, getattr(module, attr)

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

    def to_backend(self, be=None):
        """Move every parameter to backend ``be`` (default: the current one):
        onto the GPU for "cuda", back to the host otherwise. Cheap when they
        are there already, so ``RetinaMask`` calls it at every step."""
        if be is None:
            from minimask.backend import current_backend
            be = current_backend()
        for p in self.parameters():
            p.move_to(be)
        return self

    def num_parameters(self) -> int:
        return sum(p.value.size for p in self.parameters())

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameter and buffer values by dotted name, as host copies (a
        model on the GPU is copied back)."""
        state = {name: _host_copy(p.value) for name, p in self.named_parameters()}
        state.update({name: _host_copy(b) for name, b in self.named_buffers()})
        return state

    def load_state_dict(self, state: dict[str, np.ndarray], strict: bool = True) -> None:
        """Copy values into the parameters and buffers, refusing missing,
        extra or mis-shaped entries with a message that names them. A buffer
        missing from the file (a checkpoint written before the model had it)
        keeps its current value. Values land on the device the parameter
        lives on."""
        own = dict(self.named_parameters())
        buffers = {full: (module, attr) for full, module, attr in self._buffer_slots()}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own) - set(buffers))
        if strict and (missing or unexpected):
            raise ValueError("state dict does not match the module: "
                             f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        for name, p in own.items():
            if name not in state:
                continue
            value = _checked_entry(name, state[name], p.value.shape)
            p.assign(value)
        for name, (module, attr) in buffers.items():
            if name not in state:
                continue
            current = getattr(module, attr)
            value = _checked_entry(name, state[name], np.shape(current))
            setattr(module, attr, value.astype(current.dtype, copy=True))

    def save(self, path, metadata: dict | None = None) -> None:
        """Write the parameters to ``path`` as ``.npz``, atomically."""
        save_npz(path, self.state_dict(), metadata)

    def load(self, path, strict: bool = True) -> dict:
        """Load parameters written by ``save``; returns its metadata."""
        state, metadata = load_npz(path)
        self.load_state_dict(state, strict=strict)
        return metadata


def _device_backend():
    from minimask.backend import CUDA
    return CUDA


def _host_copy(a) -> np.ndarray:
    """A host NumPy copy of a host or device array."""
    if isinstance(a, np.ndarray):
        return a.copy()
    from minimask.backend import CUDA
    return CUDA.to_host(a)


def _checked_entry(name, value, shape) -> np.ndarray:
    value = np.asarray(value)
    if value.shape != tuple(shape):
        raise ValueError(f"state dict entry {name!r} has shape {value.shape}, "
                         f"the module expects {tuple(shape)}")
    if not np.all(np.isfinite(value)):
        raise ValueError(f"state dict entry {name!r} contains NaN or infinity")
    return value


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
        # host zeros; each moves to its parameter's device on the first step
        self.velocity = [np.zeros(p.value.shape, dtype=p.value.dtype) for p in self.params]

    def step(self) -> None:
        """One update of every parameter, on the device it lives on (the
        momentum buffer follows its parameter there on first use)."""
        from minimask.backend import CPU
        from minimask.layers import glue
        for i, (p, v) in enumerate(zip(self.params, self.velocity)):
            if isinstance(v, np.ndarray) == p.on_device:     # it moved: follow it
                v = self.velocity[i] = (_device_backend().asarray(v) if p.on_device
                                        else _host_copy(v))
            be = _device_backend() if p.on_device else CPU
            glue.sgd_update(p.value, p.grad, v, self.lr, self.momentum, self.weight_decay, be)

    def zero_grad(self) -> None:
        for p in self.params:
            p.zero_grad()

    def state_dict(self) -> dict[str, np.ndarray]:
        """The momentum buffers, as host copies."""
        return {f"velocity.{i}": _host_copy(v) for i, v in enumerate(self.velocity)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for i, v in enumerate(self.velocity):
            key = f"velocity.{i}"
            if key not in state or state[key].shape != v.shape:
                raise ValueError(f"optimiser state {key!r} is missing or has the wrong shape")
            value = np.asarray(state[key]).astype(v.dtype, copy=False)
            if isinstance(v, np.ndarray):
                v[...] = value
            else:
                v.copy_to_device(np.ascontiguousarray(value))
