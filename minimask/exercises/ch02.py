"""Chapter 2's exercises: a convolution by loops, forward and backward.

``check_conv_forward_loops(fn)``
    ``fn(x, w, b, stride, padding) -> out``: ``x (N, C, H, W)``, ``w (F, C,
    kh, kw)``, ``b (F,)``, integer ``stride`` and ``padding``; ``out (N, F,
    OH, OW)`` with ``out[n, f, i, j] = b[f] + sum_{c, u, v} w[f, c, u, v]
    x[n, c, s i + u - p, s j + v - p]`` (zero outside the image).

``check_conv_backward_loops(fn)``
    ``fn(dout, x, w, stride, padding) -> (dx, dw, db)``: the gradients of
    ``sum(out * dout)``; graded against ``conv2d_backward`` and by a
    gradient check of each against centred differences.

``check_answer_im2col_megabytes(value)``
    The size in MB (10^6 bytes) of ``cols`` in float32 for the first 3x3
    layer of the mask head: 256 channels, 14 x 14, padding 1, 100 RoIs.
"""
from __future__ import annotations

import numpy as np

import minimask
from minimask.exercises._grading import Grade
from minimask.layers import conv2d_backward, conv2d_forward

__all__ = ["check_conv_forward_loops", "check_conv_backward_loops",
           "check_answer_im2col_megabytes"]

# (N, C, H, W, F, kh, kw, stride, padding): square and not, strides 1-3, padding 0-2
_CASES = [(2, 3, 5, 6, 4, 3, 3, 1, 1), (1, 2, 7, 7, 3, 3, 3, 2, 1),
          (2, 2, 6, 5, 3, 2, 3, 1, 0), (1, 3, 9, 8, 2, 3, 2, 3, 2)]


def _inputs(case, rng):
    N, C, H, W, F, kh, kw, s, p = case
    return (rng.normal(size=(N, C, H, W)), rng.normal(size=(F, C, kh, kw)),
            rng.normal(size=F), s, p)


def check_conv_forward_loops(fn, verbose: bool = True) -> bool:
    """Grade ``fn(x, w, b, stride, padding) -> out`` against ``conv2d_forward``."""
    g = Grade("conv_forward_loops", verbose)
    rng = np.random.default_rng(2)
    for case in _CASES:
        x, w, b, s, p = _inputs(case, rng)
        name = f"x {x.shape}, w {w.shape}, stride {s}, padding {p}"
        ok, out = g.call(name, fn, x.copy(), w.copy(), b.copy(), s, p)
        if ok:
            with minimask.using_backend("numpy"):
                expected, _ = conv2d_forward(x, w, b, stride=s, padding=p)
            g.compare(name, out, expected, rtol=1e-10, atol=1e-10)
    return g.finish()


def check_conv_backward_loops(fn, verbose: bool = True) -> bool:
    """Grade ``fn(dout, x, w, stride, padding) -> (dx, dw, db)`` against
    ``conv2d_backward`` and by centred differences."""
    g = Grade("conv_backward_loops", verbose)
    rng = np.random.default_rng(3)
    for case in _CASES:
        x, w, b, s, p = _inputs(case, rng)
        with minimask.using_backend("numpy"):
            out, cache = conv2d_forward(x, w, b, stride=s, padding=p)
            dout = rng.normal(size=out.shape)
            expected = conv2d_backward(dout, cache)
        label = f"x {x.shape}, w {w.shape}, stride {s}, padding {p}"
        ok, grads = g.call(label, fn, dout.copy(), x.copy(), w.copy(), s, p)
        if not ok:
            continue
        if not isinstance(grads, (tuple, list)) or len(grads) != 3:
            g.record(label, False, "return the three gradients (dx, dw, db)")
            continue
        for gname, yours, ref in zip(["dx", "dw", "db"], grads, expected):
            g.compare(f"{gname}, {label}", yours, ref, rtol=1e-9, atol=1e-10)
        if case is _CASES[0]:       # one gradient check, to see the pieces agree with calculus
            with minimask.using_backend("numpy"):
                for gname, arr, yours in zip(["dx", "dw", "db"], [x, w, b], grads):
                    g.gradient(f"{gname} by centred differences, {label}",
                               lambda: conv2d_forward(x, w, b, stride=s, padding=p)[0],
                               arr, yours, dout)
    return g.finish()


def check_answer_im2col_megabytes(value, verbose: bool = True) -> bool:
    """Grade the float32 size, in MB, of ``cols`` for the mask head's first
    3x3 conv over 100 RoIs of 256 x 14 x 14 (padding 1, stride 1)."""
    g = Grade("answer_im2col_megabytes", verbose)
    rows, columns = 256 * 3 * 3, 100 * 14 * 14
    g.answer("size of cols in MB (10^6 bytes)", value, rows * columns * 4 / 1e6, rtol=2e-3)
    return g.finish()
