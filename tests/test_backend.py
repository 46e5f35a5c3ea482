import pytest

import minimask


def test_default_backend_is_cpu():
    assert minimask.get_backend() in minimask.BACKENDS


def test_using_backend_restores_on_error():
    before = minimask.get_backend()
    with pytest.raises(RuntimeError):
        with minimask.using_backend("numpy"):
            assert minimask.get_backend() == "numpy"
            raise RuntimeError("boom")
    assert minimask.get_backend() == before


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        minimask.set_backend("tpu")


def _run_python(code, env_value=None, **extra_env):
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("MINIMASK_MALLOPT", "OMP_WAIT_POLICY")}
    if env_value is not None:
        env["MINIMASK_MALLOPT"] = env_value
    env.update(extra_env)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_import_changes_nothing_outside_minimask():
    # no environment variable, no malloc tuning: those belong to configure_process()
    code = ("import os; import minimask; "
            "print(minimask.MALLOC_TUNED, os.environ.get('OMP_WAIT_POLICY'))")
    assert _run_python(code) == "False None"


def test_configure_process_sets_passive_waiting_unless_the_user_chose():
    code = ("import os, minimask; r = minimask.configure_process(); "
            "print(os.environ['OMP_WAIT_POLICY'], r['omp_wait_policy'], r['omp_already_started'])")
    assert _run_python(code) == "passive passive False"
    assert _run_python(code, OMP_WAIT_POLICY="active") == "active active False"


def test_malloc_tuning_applies_on_glibc_and_can_be_switched_off():
    import platform
    code = ("import minimask; r = minimask.configure_process(); "
            "print(minimask.MALLOC_TUNED, r['malloc_tuned'])")
    assert _run_python(code, "0") == "False False"
    expected = "True" if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" else "False"
    assert _run_python(code) == f"{expected} {expected}"


def test_the_command_line_configures_its_process():
    code = ("import os, minimask, minimask.__main__ as cli; cli.main([]); "
            "print(os.environ.get('OMP_WAIT_POLICY'), minimask.MALLOC_TUNED)")
    import platform
    tuned = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert _run_python(code).splitlines()[-1] == f"passive {tuned}"


def test_configure_process_avoids_an_openmp_runtime_started_by_someone_else():
    # libgomp loaded first (as torch does): its wait policy is fixed, so
    # configure_process() asks Numba for the workqueue layer, which sleeps.
    # (A ReLU large enough to run in parallel: small ones run serially and
    # start no threads at all - minimask._threads.)
    code = ("import ctypes, numpy as np, numba; ctypes.CDLL('libgomp.so.1'); "
            "import minimask; r = minimask.configure_process(); "
            "from minimask.layers import relu_forward; relu_forward(np.ones((1, 4, 512, 512), np.float32)); "
            "print(r['omp_already_started'], r['numba_threading_layer'], numba.threading_layer())")
    assert _run_python(code) == "True workqueue workqueue"
    # the user's choice wins
    assert _run_python(code.replace("True workqueue", ""), NUMBA_THREADING_LAYER="omp").split() == \
        ["True", "None", "omp"]
    # nothing loaded before: OpenMP with passive waiting, Numba's own choice
    code = ("import numpy as np, numba, minimask; r = minimask.configure_process(); "
            "from minimask.layers import relu_forward; relu_forward(np.ones((1, 4, 512, 512), np.float32)); "
            "print(r['omp_already_started'], r['numba_threading_layer'], numba.threading_layer())")
    assert _run_python(code) == "False None omp"


# --------------------------------------------------------------------------
# Backends as objects
# --------------------------------------------------------------------------

import importlib  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402

from minimask import backend as backend_module  # noqa: E402
from minimask._cuda import cuda_available  # noqa: E402

LAYER_MODULES = ["activations", "conv", "group_norm", "pooling", "upsample", "roi_align",
                 "focal_loss", "smooth_l1", "mask_bce", "frozen_bn"]


def test_get_backend_returns_the_name_and_current_backend_the_object():
    for name in ("numpy", "cpu"):
        with minimask.using_backend(name):
            assert minimask.get_backend() == name
            assert isinstance(minimask.get_backend(), str)
            obj = backend_module.current_backend()
            assert obj.name == name and obj is backend_module.backend_object(name)
    with pytest.raises(ValueError, match="backend must be one of"):
        backend_module.backend_object("tpu")


def test_every_backend_registers_every_operation():
    for module in LAYER_MODULES:
        importlib.import_module(f"minimask.layers.{module}")
    numpy_ops = set(backend_module.NUMPY._ops)
    assert {"relu_forward", "conv.ops", "roi_align_backward", "mask_bce_forward"} <= numpy_ops
    missing_cpu = numpy_ops - set(backend_module.CPU._ops)
    assert not missing_cpu, f"cpu lacks {sorted(missing_cpu)}"
    from minimask._cuda import cuda
    if cuda is not None:
        missing_cuda = numpy_ops - set(backend_module.CUDA._ops)
        assert not missing_cuda, f"cuda lacks {sorted(missing_cuda)}"


def test_an_unregistered_operation_says_which():
    with pytest.raises(NotImplementedError, match="'cpu' backend has no implementation of 'nope'"):
        backend_module.CPU.op("nope")


def test_layer_modules_have_no_backend_ladders():
    root = pathlib.Path(minimask.__file__).parent / "layers"
    for module in LAYER_MODULES:
        text = (root / f"{module}.py").read_text()
        assert not re.search(r"get_backend\(\)|backend\s*==\s*\"", text), module
        assert "def _host(" not in text, module


def _layer_cases():
    """(name, forward(), backward(out, cache)) on tiny float64 inputs."""
    from minimask import layers as L
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 6, 6))
    w = rng.standard_normal((3, 4, 3, 3))
    b = rng.standard_normal(3)
    wt = rng.standard_normal((4, 3, 2, 2))
    g, be_ = rng.standard_normal(4), rng.standard_normal(4)
    rois = np.array([[0, 0.5, 1.0, 4.0, 5.0], [1, 1.0, 0.0, 5.5, 3.0]])
    logits = rng.standard_normal((2, 5, 3))
    targets = (rng.random((2, 5, 3)) < 0.3).astype(np.float64)
    mask_logits = rng.standard_normal((2, 3, 4, 4))
    labels = np.array([2, 0])
    mtargets = (rng.random((2, 4, 4)) < 0.5).astype(np.float64)
    return [
        ("relu", lambda: L.relu_forward(x), L.relu_backward),
        ("conv2d", lambda: L.conv2d_forward(x, w, b, 1, 1), L.conv2d_backward),
        ("conv_transpose2d", lambda: L.conv_transpose2d_forward(x, wt, None),
         L.conv_transpose2d_backward),
        ("group_norm", lambda: L.group_norm_forward(x, g, be_, 2), L.group_norm_backward),
        ("max_pool2d", lambda: L.max_pool2d_forward(x, 3, 2, 1), L.max_pool2d_backward),
        ("upsample", lambda: L.upsample_nearest2d_forward(x, 2), L.upsample_nearest2d_backward),
        ("frozen_bn", lambda: L.frozen_bn_forward(x, g, be_, 0.1 * g, 1 + g * g),
         L.frozen_bn_backward),
        ("roi_align", lambda: L.roi_align_forward(x, rois, 2, 1.0, 2), L.roi_align_backward),
        ("focal", lambda: L.sigmoid_focal_loss_forward(logits, targets, reduction="none"),
         L.sigmoid_focal_loss_backward),
        ("smooth_l1", lambda: L.smooth_l1_forward(logits, targets, reduction="none"),
         L.smooth_l1_backward),
        ("mask_bce", lambda: L.mask_bce_forward(mask_logits, labels, mtargets),
         lambda d, c: L.mask_bce_backward(1.5, c)),
    ]


@pytest.mark.parametrize("forward_on, switch_to", [("cpu", "numpy"), ("numpy", "cpu")])
def test_backward_follows_its_forward_whatever_the_setting(forward_on, switch_to, monkeypatch):
    """Forward on one backend, then switch: the backward must run the
    forward's backend (the other one's kernels are made to fail) and give
    exactly what a backward without the switch gives."""
    other = backend_module.backend_object(switch_to)
    for name, forward, backward in _layer_cases():
        with minimask.using_backend(forward_on):
            out, cache = forward()
            dout = np.linspace(-1, 1, np.size(out)).reshape(np.shape(out))
            expected = backward(dout, cache)
            out, cache = forward()
        broken = {op: (lambda *a, **k: pytest.fail(f"{name}: backward ran on {switch_to}"))
                  for op in other._ops}
        with monkeypatch.context() as m:
            m.setattr(other, "_ops", broken)
            with minimask.using_backend(switch_to):
                got = backward(dout, cache)
        got = got if isinstance(got, tuple) else (got,)
        expected = expected if isinstance(expected, tuple) else (expected,)
        for e, g_ in zip(expected, got):
            if e is None:
                assert g_ is None
            else:
                np.testing.assert_array_equal(g_, e, err_msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="runs in the GPU / simulator run (-m cuda)")
def test_cuda_backward_follows_a_cuda_forward_after_switching_to_numpy():
    from minimask._cuda import cuda
    for name, forward, backward in _layer_cases():
        with minimask.using_backend("cuda"):
            out, cache = forward()
        out = out.copy_to_host() if hasattr(out, "copy_to_host") else np.asarray(out)
        dout = np.linspace(-1, 1, out.size).reshape(out.shape)
        with minimask.using_backend("numpy"):
            got = backward(cuda.to_device(dout), cache)
        got = got if isinstance(got, tuple) else (got,)
        # a device dout on the cuda backend's cache: the gradient stays on the device
        # (losses mirror the forward's host input instead)
        with minimask.using_backend("cpu"):
            out_c, cache_c = forward()
            expected = backward(dout, cache_c)
        expected = expected if isinstance(expected, tuple) else (expected,)
        for e, g_ in zip(expected, got):
            if e is None:
                continue
            g_ = g_.copy_to_host() if hasattr(g_, "copy_to_host") else np.asarray(g_)
            np.testing.assert_allclose(g_, e, rtol=1e-9, atol=1e-12, err_msg=name)
