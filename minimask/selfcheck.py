"""``python -m minimask check``: prove every layer on this machine.

For each layer of the contract table, on a small fixed case:

1. gradient check of the NumPy reference in float64 (centred differences,
   random upstream gradient) - the relative error must be below 1e-6;
2. each fast backend available here (``cpu``; ``cuda`` on a GPU or in the
   simulator) against the reference, forward and backward, in float32 and
   float64: the largest difference relative to the reference's largest
   value.

It prints a table and exits non-zero if anything fails, so it doubles as a
smoke test of an installation.
"""
from __future__ import annotations

import time

import numpy as np

import minimask
from minimask import layers as L
from minimask._cuda import cuda_available
from minimask.gradcheck import check_layer, rel_error

GRAD_TOL = 1e-6
PARITY_TOL = {np.float64: 1e-10, np.float32: 1e-4}


def _cases(rng):
    """(name, forward, backward, inputs, differentiable input names, kwargs)."""
    def r(*shape, lo=-1.0, hi=1.0):
        return rng.uniform(lo, hi, size=shape)

    x_relu = r(2, 3, 5, 5)
    x_relu[np.abs(x_relu) < 1e-3] = 0.5  # away from the kink at 0
    pool_x = rng.permutation(2 * 3 * 7 * 7).reshape(2, 3, 7, 7) / 10.0  # distinct
    rois = np.array([[0, 1.3, 2.1, 11.7, 9.2], [1, -3.1, 4.4, 6.3, 20.9],
                     [0, 5.2, 5.3, 6.1, 6.4]])
    logits = r(2, 20, 3, lo=-4, hi=4)
    targets = (rng.random((2, 20, 3)) < 0.2).astype(np.float64)
    pred = r(10, 4)
    target = pred + rng.choice([-1, 1], size=(10, 4)) * rng.uniform(0.2, 1.0, size=(10, 4))
    mask_logits = r(3, 4, 6, 6, lo=-3, hi=3)
    return [
        ("relu", L.relu_forward, L.relu_backward, {"x": x_relu}, ["x"], {}),
        ("sigmoid", L.sigmoid_forward, L.sigmoid_backward, {"x": r(2, 3, 4)}, ["x"], {}),
        ("conv2d 3x3 s2 p1", L.conv2d_forward, L.conv2d_backward,
         {"x": r(2, 3, 7, 6), "w": r(4, 3, 3, 3), "b": r(4)}, ["x", "w", "b"],
         {"stride": 2, "padding": 1}),
        ("conv_transpose2d 2x2 s2", L.conv_transpose2d_forward, L.conv_transpose2d_backward,
         {"x": r(2, 3, 4, 5), "w": r(3, 2, 2, 2), "b": r(2)}, ["x", "w", "b"],
         {"stride": 2}),
        ("group_norm G=2", L.group_norm_forward, L.group_norm_backward,
         {"x": r(2, 4, 5, 3), "gamma": r(4), "beta": r(4)}, ["x", "gamma", "beta"],
         {"num_groups": 2}),
        ("frozen_bn", L.frozen_bn_forward, L.frozen_bn_backward,
         {"x": r(2, 3, 4, 5), "gamma": r(3), "beta": r(3), "running_mean": r(3),
          "running_var": r(3, lo=0.5, hi=1.5)}, ["x"], {}),
        ("max_pool2d 3x3 s2 p1", L.max_pool2d_forward, L.max_pool2d_backward,
         {"x": pool_x}, ["x"], {"kernel_size": 3, "stride": 2, "padding": 1}),
        ("upsample_nearest2d x2", L.upsample_nearest2d_forward, L.upsample_nearest2d_backward,
         {"x": r(2, 3, 4, 5)}, ["x"], {"scale": 2}),
        ("roi_align avg", L.roi_align_forward, L.roi_align_backward,
         {"features": r(2, 3, 12, 13), "rois": rois}, ["features"],
         {"output_size": 3, "spatial_scale": 0.5, "sampling_ratio": 2}),
        ("roi_align max", L.roi_align_forward, L.roi_align_backward,
         {"features": r(2, 3, 12, 13), "rois": rois}, ["features"],
         {"output_size": 3, "spatial_scale": 0.5, "sampling_ratio": 2, "mode": "max"}),
        ("sigmoid_focal_loss", L.sigmoid_focal_loss_forward, L.sigmoid_focal_loss_backward,
         {"logits": logits, "targets": targets}, ["logits"], {}),
        ("smooth_l1", L.smooth_l1_forward, L.smooth_l1_backward,
         {"pred": pred, "target": target}, ["pred"], {}),
        ("mask_bce", L.mask_bce_forward, L.mask_bce_backward,
         {"mask_logits": mask_logits, "labels": np.array([0, 3, 1]),
          "targets": (rng.random((3, 6, 6)) < 0.5).astype(np.float64)}, ["mask_logits"], {}),
    ]


def _grads_tuple(g):
    return g if isinstance(g, tuple) else (g,)


def _run(forward, backward, inputs, kwargs, dout_seed=1):
    out, cache = forward(**inputs, **kwargs)
    out = np.asarray(out)
    dout = np.random.default_rng(dout_seed).standard_normal(out.shape).astype(out.dtype)
    grads = _grads_tuple(backward(dout, cache))
    return [out] + [np.asarray(g) for g in grads if g is not None]


def _cast(inputs, dtype):
    return {k: (v.astype(dtype) if k not in ("labels", "rois") and v.dtype.kind == "f" else v)
            for k, v in inputs.items()}


def main(verbose: bool = True) -> int:
    rng = np.random.default_rng(0)
    fast = ["cpu"] + (["cuda"] if cuda_available() else [])
    failures = 0
    header = f"{'layer':26s} {'grad rel err':>12s} " + " ".join(
        f"{b + ' f64':>10s} {b + ' f32':>10s}" for b in fast) + "  status"
    if verbose:
        print(header)
        print("-" * len(header))
    for name, fwd, bwd, inputs, wrt, kwargs in _cases(rng):
        with minimask.using_backend("numpy"):
            errs = check_layer(fwd, bwd, inputs, wrt, **kwargs)
        grad_err = max(errs.values())
        ok = grad_err < GRAD_TOL
        cells = []
        for backend in fast:
            for dtype in (np.float64, np.float32):
                case = _cast(inputs, dtype)
                with minimask.using_backend("numpy"):
                    ref = _run(fwd, bwd, case, kwargs)
                with minimask.using_backend(backend):
                    got = _run(fwd, bwd, case, kwargs)
                diff = max(rel_error(a, b) for a, b in zip(got, ref))
                ok &= diff < PARITY_TOL[dtype]
                cells.append(f"{diff:10.1e}")
        failures += not ok
        if verbose:
            print(f"{name:26s} {grad_err:12.1e} " + " ".join(cells) + ("  ok" if ok else "  FAIL"))
    if verbose:
        print(f"\ngradient check: rel err < {GRAD_TOL:g} (float64 reference); parity: "
              f"rel diff < {PARITY_TOL[np.float64]:g} (f64), < {PARITY_TOL[np.float32]:g} (f32)")
        print("all layers ok" if not failures else f"{failures} layer(s) FAILED")
    return 1 if failures else 0
