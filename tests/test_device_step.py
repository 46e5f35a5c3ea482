"""A whole training step on the "cuda" backend: equal to "cpu", and on the device.

Runs in the CUDA simulator in CI (``NUMBA_ENABLE_CUDASIM=1 pytest -m cuda``)
and on a real GPU in ``benchmarks/gpu_check.sh``. The model is a micro
config on 16 x 16 images (the simulator runs each GPU thread in Python, so a
step costs about a thousand kernel launches' worth of Python).

* the loss and every parameter's gradient on cuda equal cpu's (float64:
  rtol 1e-9; float32: rtol 2e-4 on the loss, and gradients within 2e-3 of
  the largest gradient entry of their parameter);
* two training steps (loss, clipping, SGD with momentum) on cuda equal two
  on cpu (the second resumed from a checkpoint cpu wrote after the first,
  loaded onto the device);
* what crosses between host and device during a step is counted: the
  images, small index and box arrays, and scalars; never an array the shape
  of a feature map, a head output or a parameter;
* a checkpoint written on one backend resumes on the other (both ways).
"""
import numpy as np
import pytest

import minimask
from minimask._cuda import cuda_available
from minimask.backend import CUDA
from minimask.model import Config, RetinaMask
from minimask.nn import SGD
from minimask.train import clip_gradients

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not cuda_available(),
                                 reason="runs in the GPU / simulator run (-m cuda)")]


def micro_config(dtype="float64"):
    return Config(stem_channels=2, stem_kernel=3, blocks=(1, 1, 1, 1), widths=(2, 4, 4, 4),
                  fpn_channels=4, head_convs=0, mask_convs=0, mask_channels=2,
                  anchor_sizes=(8, 16, 32, 64, 128), anchor_ratios=(1.0,), anchor_scales=(1.0,),
                  canonical_size=16, mask_size=4, num_classes=2, max_mask_rois=2,
                  self_adjusting_beta=True, dtype=dtype).validated()


def micro_batch(dtype=np.float64, size=16, shift=0):
    """Two images with one box each (masks are the boxes' rectangles)."""
    rng = np.random.default_rng(shift)
    images = rng.uniform(0, 1, (2, 3, size, size)).astype(dtype)
    targets = []
    for box, label in [([2.0 + shift, 3.0, 12.0, 13.0], 1), ([1.0, 1.0 + shift, 9.0, 6.0], 0)]:
        mask = np.zeros((1, size, size), dtype=bool)
        x1, y1, x2, y2 = (int(v) for v in box)
        mask[0, y1:y2, x1:x2] = True
        targets.append({"boxes": np.array([box]), "labels": np.array([label]), "masks": mask})
    return images, targets


def host(a):
    """A host copy (never a view of a live array)."""
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.array(a)


def train_steps(model, optimizer, backend, steps, first=0, keep_grads=True):
    """``steps`` SGD steps on ``backend``; returns each step's losses and
    the gradients of the first step (host copies; ``keep_grads=False`` makes
    none, so that a copy count sees the training step's copies only)."""
    losses, grads = [], None if keep_grads else {}
    with minimask.using_backend(backend):
        for step in range(first, first + steps):
            images, targets = micro_batch(model.dtype, shift=step % 2)
            out = model.loss(images, targets)
            losses.append(np.array([out[k] for k in ("cls", "box", "mask", "total")]))
            if grads is None:
                grads = {n: host(p.grad) for n, p in model.named_parameters()}
            clip_gradients(model.parameters(), 1.0)
            optimizer.step()
    return losses, grads


def micro_model(dtype="float64"):
    """The micro config with every parameter nudged by N(0, 0.05^2): at 16 px
    the last stages and P5-P7 are 1 x 1 maps, where a GroupNorm group holds
    one value and its output is exactly its bias - zero at initialisation,
    so a ReLU after it would sit on its kink and round-off would pick the
    side. Random biases keep every ReLU input away from 0."""
    model = RetinaMask(micro_config(dtype))
    rng = np.random.default_rng(123)
    for p in model.parameters():
        p.value += rng.normal(0, 0.05, p.value.shape).astype(p.value.dtype)
    return model


def new_run(dtype="float64"):
    model = micro_model(dtype)
    return model, SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def assert_params_close(a, b, rtol, atol, what):
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_allclose(host(pa.value), host(pb.value), rtol=rtol, atol=atol,
                                   err_msg=f"{what}: {name}")
    np.testing.assert_allclose(a.beta_stats, b.beta_stats, rtol=rtol, atol=atol)


def _record_numba_copies(monkeypatch):
    """Count copies at Numba's level too, so none can bypass the backend."""
    from minimask._cuda import cuda
    seen = []
    to_device = cuda.to_device

    def counted_to_device(a, *args, **kwargs):
        seen.append(("to_device", np.asarray(a).nbytes, np.shape(a)))
        return to_device(a, *args, **kwargs)
    monkeypatch.setattr(cuda, "to_device", counted_to_device)
    device_type = type(cuda.device_array(1))
    copy_to_host = device_type.copy_to_host

    def counted_copy_to_host(self, *args, **kwargs):
        out = copy_to_host(self, *args, **kwargs)
        seen.append(("to_host", out.nbytes, out.shape))
        return out
    monkeypatch.setattr(device_type, "copy_to_host", counted_copy_to_host)
    return seen


def test_two_training_steps_on_cuda_equal_cpu_and_stay_on_the_device(tmp_path, monkeypatch):
    cpu_model, cpu_opt = new_run()
    cpu_losses, cpu_grads = train_steps(cpu_model, cpu_opt, "cpu", 3)

    model, opt = new_run()
    # step 1: the loss and every gradient equal cpu's
    losses, grads = train_steps(model, opt, "cuda", 1)
    np.testing.assert_allclose(losses[0], cpu_losses[0], rtol=1e-9)
    assert set(grads) == set(cpu_grads)
    for name, g in grads.items():
        np.testing.assert_allclose(g, cpu_grads[name], rtol=1e-9, atol=1e-12, err_msg=name)
    # after the first step everything lives on the device
    assert all(not isinstance(p.value, np.ndarray) and not isinstance(p.grad, np.ndarray)
               for p in model.parameters())
    assert all(not isinstance(v, np.ndarray) for v in opt.velocity)

    # a checkpoint written on cpu after step 1 loads onto the device arrays
    # (it differs from the cuda model's own state by round-off only), and
    # step 2 continues from it on cuda
    first = _cpu_after(1)
    model.load_state_dict(first.state_dict())
    opt.load_state_dict(_CPU_OPTS[1].state_dict())
    assert all(not isinstance(p.value, np.ndarray) for p in model.parameters())
    assert all(not isinstance(v, np.ndarray) for v in opt.velocity)
    for (name, p), (_, q) in zip(model.named_parameters(), first.named_parameters()):
        np.testing.assert_array_equal(host(p.value), q.value, err_msg=name)

    # step 2, with every host<->device copy recorded
    numba_copies = _record_numba_copies(monkeypatch)
    with CUDA.counting_copies() as copies:
        losses, _ = train_steps(model, opt, "cuda", 1, first=1, keep_grads=False)
    monkeypatch.undo()
    np.testing.assert_allclose(losses[0], cpu_losses[1], rtol=1e-9)
    assert_params_close(model, _cpu_after(2), 1e-9, 1e-12, "2 steps")

    images, _ = micro_batch()
    image_copies = [c for c in copies if c[2] == images.shape]
    assert len(image_copies) == 1 and image_copies[0][0] == "to_device"
    small = [c for c in copies if c[2] != images.shape]
    forbidden = _activation_and_parameter_shapes(model)
    crossed = [c for c in small if c[2] in forbidden]
    assert not crossed, f"feature-map / parameter sized arrays crossed: {crossed}"
    # every copy Numba made went through the backend's counter
    assert len(numba_copies) == len(copies), (numba_copies, copies)
    small_bytes = sum(c[1] for c in small)
    print(f"\nbytes crossing in one cuda training step of the micro config: images "
          f"{images.nbytes}, everything else {small_bytes} in {len(small)} copies")
    assert small_bytes < images.nbytes

    # a checkpoint written on cuda resumes on cpu: step 3 there equals cpu's
    state = model.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    opt_state = opt.state_dict()
    resumed, resumed_opt = new_run()
    resumed.load_state_dict(state)
    resumed_opt.load_state_dict(opt_state)
    losses, _ = train_steps(resumed, resumed_opt, "cpu", 1, first=2)
    np.testing.assert_allclose(losses[0], cpu_losses[2], rtol=1e-9)
    assert_params_close(resumed, cpu_model, 1e-9, 1e-12, "cuda checkpoint resumed on cpu")


_CPU_RUNS, _CPU_OPTS = {}, {}


def _cpu_after(steps):
    if steps not in _CPU_RUNS:
        model, opt = new_run()
        train_steps(model, opt, "cpu", steps)
        _CPU_RUNS[steps], _CPU_OPTS[steps] = model, opt
    return _CPU_RUNS[steps]


def _activation_and_parameter_shapes(model):
    """Shapes of every feature map, head output and parameter of a step."""
    images, targets = micro_batch()
    shapes = {tuple(p.shape) for p in model.parameters()}
    with minimask.using_backend("cpu"):
        cpu_model = micro_model(model.config.dtype)
        C, _ = cpu_model.backbone.forward(images)
        P, logits, deltas, _ = cpu_model._forward_dense(images)
    shapes |= {tuple(a.shape) for a in C + P}
    shapes |= {tuple(logits.shape), tuple(deltas.shape)}
    # a parameter shape of one entry, (C,), could collide with a small index
    # array; those are the GroupNorm / bias vectors, checked through the
    # larger shapes they come with
    return {s for s in shapes if np.prod(s) > 4}


def test_float32_loss_and_gradients_on_cuda_match_cpu():
    """float32: the kernels sum in other orders (tiles, atomics), so the
    results differ by float32 round-off. Written tolerances: the loss within
    2e-4 relative; each gradient within 2e-3 of its parameter's largest
    gradient entry (absolute), which is what a float32 GEMM over a few
    hundred terms can move - or of 1e-3 of the model's largest gradient
    entry, for a parameter whose whole gradient is tiny (a GroupNorm on a
    1 x 1 map gets ~1e-8, and its round-off comes from the larger terms
    that cancelled to give it)."""
    cpu_model, model = micro_model("float32"), micro_model("float32")
    images, targets = micro_batch(np.float32)
    with minimask.using_backend("cpu"):
        ref = cpu_model.loss(images, targets)
    with minimask.using_backend("cuda"):
        got = model.loss(images, targets)
    for k in ("cls", "box", "mask", "total"):
        assert got[k] == pytest.approx(ref[k], rel=2e-4), k
    largest = max(float(np.abs(q.grad).max()) for q in cpu_model.parameters())
    for (name, p), (_, q) in zip(model.named_parameters(), cpu_model.named_parameters()):
        g, r = host(p.grad), q.grad
        scale = max(float(np.abs(r).max()), 1e-3 * largest)
        np.testing.assert_allclose(g, r, rtol=0, atol=2e-3 * scale, err_msg=name)
