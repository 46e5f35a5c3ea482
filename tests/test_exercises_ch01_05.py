"""The graders of chapters 1-5: each passes a correct solution and fails
plausible wrong ones (a transposed index, a missing term, a sign error, an
off-by-one), and a skeleton that still raises NotImplementedError is "not
attempted", not a crash.

The solutions here are written independently of minimask's implementations
(plain loops and textbook formulas), so a grader passing them also says the
reference it compares with is right.
"""
import math

import numpy as np
import pytest

from minimask.exercises import (NotAttempted, check_answer_aspect_ratio,
                                check_answer_fma_per_global_load, check_answer_focal_tenth,
                                check_answer_im2col_megabytes, check_bilinear_weights,
                                check_conv_backward_loops, check_conv_forward_loops,
                                check_crop_background_fraction, check_focal_loss_gradient,
                                check_fpn_level, check_launch_grid, check_output_partition,
                                check_smooth_l1, check_winograd_f23, grade)

# ---------------------------------------------------------------- chapter 1


def crop_fraction(obj, crop):
    return 1.0 - (obj & crop).sum() / crop.sum()


def crop_fraction_object_share(obj, crop):          # forgot the "1 -"
    return (obj & crop).sum() / crop.sum()


def crop_fraction_over_object(obj, crop):           # divides by |M| instead of |K|
    return (crop & ~obj).sum() / obj.sum()


def crop_fraction_chapter_bug(obj, crop):           # the old chapter 1 line: always 0
    return 1.0 - obj.sum() / obj.sum()


# ---------------------------------------------------------------- chapter 2


def conv_forward(x, w, b, stride, padding, flip=False, pad_offset=True):
    N, C, H, W = x.shape
    F, _, kh, kw = w.shape
    OH = (H + 2 * padding - kh) // stride + 1
    OW = (W + 2 * padding - kw) // stride + 1
    out = np.zeros((N, F, OH, OW))
    for n in range(N):
        for f in range(F):
            for i in range(OH):
                for j in range(OW):
                    total = b[f]
                    for c in range(C):
                        for u in range(kh):
                            for v in range(kw):
                                y = stride * i + u - (padding if pad_offset else 0)
                                xx = stride * j + v - (padding if pad_offset else 0)
                                if 0 <= y < H and 0 <= xx < W:
                                    wt = w[f, c, kh - 1 - u, kw - 1 - v] if flip else w[f, c, u, v]
                                    total += wt * x[n, c, y, xx]
                    out[n, f, i, j] = total
    return out


def conv_backward(dout, x, w, stride, padding, bug=None):
    N, C, H, W = x.shape
    F, _, kh, kw = w.shape
    dx, dw = np.zeros_like(x), np.zeros_like(w)
    db = dout.sum(axis=(0, 2, 3)) if bug != "db_axes" else dout.sum(axis=(0, 1, 2))[:F]
    for n in range(N):
        for f in range(F):
            for i in range(dout.shape[2]):
                for j in range(dout.shape[3]):
                    for c in range(C):
                        for u in range(kh):
                            for v in range(kw):
                                y, xx = stride * i + u - padding, stride * j + v - padding
                                if 0 <= y < H and 0 <= xx < W:
                                    g = dout[n, f, i, j]
                                    dx[n, c, y, xx] += g * w[f, c, u, v]
                                    if bug == "dw_transposed":
                                        dw[f, c, v % kh, u % kw] += g * x[n, c, y, xx]
                                    else:
                                        dw[f, c, u, v] += g * x[n, c, y, xx]
    if bug == "dx_sign":
        dx = -dx
    return dx, dw, db


# ---------------------------------------------------------------- chapter 3


def bilinear(y, x, swap=False):
    row, col = math.floor(y), math.floor(x)
    ly, lx = y - row, x - col
    if swap:                                        # fractions of the wrong axes
        ly, lx = lx, ly
    return row, col, np.array([[(1 - ly) * (1 - lx), (1 - ly) * lx],
                               [ly * (1 - lx), ly * lx]])


def bilinear_flipped(y, x):                         # weights given to the far cell
    row, col = math.floor(y), math.floor(x)
    ly, lx = y - row, x - col
    return row, col, np.array([[ly * lx, ly * (1 - lx)], [(1 - ly) * lx, (1 - ly) * (1 - lx)]])


def level(boxes, eps=1e-6, side="area", rounding=np.floor):
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    size = np.sqrt(w * h) if side == "area" else np.maximum(w, h)
    return np.clip(rounding(4 + np.log2(size / 224 + eps)), 3, 5).astype(np.int64)


# ---------------------------------------------------------------- chapter 4


def focal_grad(x, t, alpha, gamma, bug=None):
    p = 1 / (1 + np.exp(-x))
    pt = np.where(t == 1, p, 1 - p)
    at = np.where(t == 1, alpha, 1 - alpha)
    dpt = np.where(t == 1, 1.0, -1.0) * p * (1 - p)          # d p_t / d x
    # FL = -a_t (1 - p_t)^g log p_t
    modulating = gamma * (1 - pt) ** (gamma - 1) * dpt * np.log(pt) if gamma else 0.0
    if bug == "no_modulating_term":
        modulating = 0.0
    ce_term = -(1 - pt) ** gamma * dpt / pt
    grad = at * (modulating + ce_term)
    if bug == "alpha_not_swapped":
        grad = alpha * (modulating + ce_term)
    if bug == "sign":
        grad = -grad
    return grad


def smooth_l1(d, beta, bug=None):
    a = np.abs(d)
    loss = np.where(a < beta, 0.5 * d * d / (1.0 if bug == "no_beta" else beta), a - 0.5 * beta)
    grad = np.clip(d / beta, -1, 1) if bug != "unclipped" else d / beta
    return loss, grad


# ---------------------------------------------------------------- chapter 5


def partition(n, workers, bug=None):
    q, r = divmod(n, workers)
    if bug == "drop_tail":
        return [(i * q, (i + 1) * q) for i in range(workers)]
    if bug == "overlap":
        return [(max(0, i * q - 1), (i + 1) * q if i < workers - 1 else n) for i in range(workers)]
    if bug == "last_takes_rest":
        return [(i * q, (i + 1) * q if i < workers - 1 else n) for i in range(workers)]
    out, start = [], 0
    for i in range(workers):
        stop = start + q + (i < r)
        out.append((start, stop))
        start = stop
    return out


def winograd_f23(d, g, bug=None):
    """Winograd's F(2, 3) from the four products m0 .. m3 (Lavin and Gray, eq. 5)."""
    half = 1.0 if bug == "no_half" else 0.5
    m0 = (d[0] - d[2]) * g[0]
    m1 = (d[1] + d[2]) * ((g[0] + g[1] + g[2]) * half)
    m2 = (d[2] - d[1]) * ((g[0] - g[1] + g[2]) * half)
    m3 = (d[1] - d[3]) * g[2]
    if bug == "y1_sign":
        return m0 + m1 + m2, m1 + m2 - m3
    return m0 + m1 + m2, m1 - m2 - m3


def correlate_directly(d, g):                       # right values, but 6 multiplies
    return (d[0] * g[0] + d[1] * g[1] + d[2] * g[2],
            d[1] * g[0] + d[2] * g[1] + d[3] * g[2])


def winograd_f23_in_floats(d, g):                   # converts the counting numbers
    d, g = [float(v) for v in d], [float(v) for v in g]
    return winograd_f23(d, g)


# ---------------------------------------------------------------- the tests

CORRECT = [
    (check_crop_background_fraction, crop_fraction),
    (check_conv_forward_loops, conv_forward),
    (check_conv_backward_loops, conv_backward),
    (check_bilinear_weights, bilinear),
    (check_fpn_level, level),
    (check_focal_loss_gradient, focal_grad),
    (check_smooth_l1, smooth_l1),
    (check_launch_grid, lambda n, t: (n + t - 1) // t),
    (check_output_partition, partition),
    (check_winograd_f23, winograd_f23),
]

WRONG = {
    "crop fraction: object share": (check_crop_background_fraction, crop_fraction_object_share),
    "crop fraction: divides by the object": (check_crop_background_fraction,
                                             crop_fraction_over_object),
    "crop fraction: the chapter's old 1 - M/M": (check_crop_background_fraction,
                                                 crop_fraction_chapter_bug),
    "conv forward: flipped kernel": (check_conv_forward_loops,
                                     lambda *a: conv_forward(*a, flip=True)),
    "conv forward: padding not subtracted": (check_conv_forward_loops,
                                             lambda *a: conv_forward(*a, pad_offset=False)),
    "conv backward: dw with transposed u, v": (check_conv_backward_loops,
                                               lambda *a: conv_backward(*a, bug="dw_transposed")),
    "conv backward: db over the wrong axes": (check_conv_backward_loops,
                                              lambda *a: conv_backward(*a, bug="db_axes")),
    "conv backward: dx sign": (check_conv_backward_loops,
                               lambda *a: conv_backward(*a, bug="dx_sign")),
    "bilinear: fractions of the wrong axes": (check_bilinear_weights,
                                              lambda y, x: bilinear(y, x, swap=True)),
    "bilinear: weights to the far cell": (check_bilinear_weights, bilinear_flipped),
    "fpn level: no epsilon": (check_fpn_level, lambda b: level(b, eps=0.0)),
    "fpn level: longest side instead of area": (check_fpn_level, lambda b: level(b, side="max")),
    "fpn level: round instead of floor": (check_fpn_level, lambda b: level(b, rounding=np.round)),
    "focal gradient: modulating factor taken as constant": (
        check_focal_loss_gradient, lambda *a: focal_grad(*a, bug="no_modulating_term")),
    "focal gradient: alpha not swapped for negatives": (
        check_focal_loss_gradient, lambda *a: focal_grad(*a, bug="alpha_not_swapped")),
    "focal gradient: sign": (check_focal_loss_gradient, lambda *a: focal_grad(*a, bug="sign")),
    "smooth L1: no 1/beta": (check_smooth_l1, lambda d, b: smooth_l1(d, b, bug="no_beta")),
    "smooth L1: gradient not clipped": (check_smooth_l1,
                                        lambda d, b: smooth_l1(d, b, bug="unclipped")),
    "launch grid: floor division": (check_launch_grid, lambda n, t: n // t),
    "launch grid: always one extra block": (check_launch_grid, lambda n, t: n // t + 1),
    "partition: drops the tail": (check_output_partition,
                                  lambda n, w: partition(n, w, bug="drop_tail")),
    "partition: overlapping ranges": (check_output_partition,
                                      lambda n, w: partition(n, w, bug="overlap")),
    "partition: last worker takes the rest": (check_output_partition,
                                              lambda n, w: partition(n, w, bug="last_takes_rest")),
    "winograd F(2, 3): the direct 6 multiplies": (check_winograd_f23, correlate_directly),
    "winograd F(2, 3): sign of m2 in y1": (check_winograd_f23,
                                           lambda d, g: winograd_f23(d, g, bug="y1_sign")),
    "winograd F(2, 3): filter sums not halved": (check_winograd_f23,
                                                 lambda d, g: winograd_f23(d, g, bug="no_half")),
    "winograd F(2, 3): numbers turned into floats": (check_winograd_f23, winograd_f23_in_floats),
}


@pytest.mark.parametrize("check, solution", CORRECT, ids=[c.__name__ for c, _ in CORRECT])
def test_grader_passes_a_correct_solution(check, solution, capsys):
    assert check(solution) is True
    assert "passed" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(WRONG))
def test_grader_fails_a_wrong_solution_and_says_where(name, capsys):
    check, solution = WRONG[name]
    assert check(solution) is False
    out = capsys.readouterr().out
    assert "DIFF" in out and "not yet" in out, out


@pytest.mark.parametrize("check, value, right", [
    (check_answer_aspect_ratio, 4 + math.sqrt(15), True),
    (check_answer_aspect_ratio, 1.0, False),          # where f(45 deg) is 0.5, not 0.8
    (check_answer_im2col_megabytes, 2304 * 19600 * 4 / 1e6, True),
    (check_answer_im2col_megabytes, 2304 * 19600 / 1e6, False),     # forgot 4 bytes per float
    (check_answer_focal_tenth, 1 - math.sqrt(0.1), True),
    (check_answer_focal_tenth, math.sqrt(0.1), False),
    (check_answer_fma_per_global_load, 32, True),
    (check_answer_fma_per_global_load, 64, False),
    (check_answer_fma_per_global_load, "thirty-two", False),
])
def test_answers(check, value, right):
    assert check(value, verbose=False) is right


@pytest.mark.parametrize("check", [check_answer_aspect_ratio, check_answer_im2col_megabytes,
                                   check_answer_focal_tenth, check_answer_fma_per_global_load])
def test_a_blank_answer_is_not_attempted(check, capsys):
    assert grade(check, None) is None
    assert "not attempted yet" in capsys.readouterr().out


@pytest.mark.parametrize("check", [c for c, _ in CORRECT], ids=[c.__name__ for c, _ in CORRECT])
def test_a_skeleton_is_not_attempted_not_a_crash(check, capsys):
    def skeleton(*args):
        raise NotImplementedError

    assert grade(check, skeleton) is None
    assert "not attempted yet" in capsys.readouterr().out
    with pytest.raises(NotAttempted):
        check(skeleton)


@pytest.mark.parametrize("solution, says", [
    (correlate_directly, "6; F(2, 3) needs only 4"),
    (lambda d, g: winograd_f23(d, g, bug="y1_sign"), "1 of 2 entries differ; worst at (1,)"),
    (lambda d, g: winograd_f23(d, g, bug="no_half"), "entries differ"),
])
def test_winograd_f23_grader_says_what_differs(solution, says, capsys):
    assert check_winograd_f23(solution) is False
    assert says in capsys.readouterr().out


def test_winograd_f23_grader_counts_only_products_of_two_inputs():
    # multiplying by constants (1/2, the matrices' 0 and +-1) is free: the
    # matrix form y = A^T [(G g) * (B^T d)] passes with its 4 products
    from minimask.layers.winograd import transform_matrices

    BT, G, AT = transform_matrices()
    assert check_winograd_f23(lambda d, g: AT @ ((G @ g) * (BT @ d)), verbose=False) is True


def test_grade_returns_the_verdict_and_a_crash_is_a_failed_check(capsys):
    assert grade(check_launch_grid, lambda n, t: -(-n // t)) is True
    assert grade(check_launch_grid, lambda n, t: 1 / 0) is False
    assert "ZeroDivisionError" in capsys.readouterr().out
