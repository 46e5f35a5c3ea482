"""The graders of chapters 6-10: each passes a correct solution (written here
the way a learner would, not by calling the package) and fails plausible
wrong ones; an unattempted exercise is reported, not raised."""
import numpy as np
import pytest

from minimask.exercises import (check_box_iou, check_clip_gradients, check_group_norm_backward,
                                check_group_norm_forward, check_largest_shift, check_learning_rate,
                                check_mask_bce, check_match_anchors, check_nms, check_paste_mask)


# ---------------------------------------------------------------- chapter 6

def gn_forward(x, gamma, beta, G, eps, consecutive=True):
    N, C, H, W = x.shape
    if consecutive:
        xg = x.reshape(N, G, -1)
    else:   # wrong: channel c in group c % G instead of c // (C / G)
        xg = x.reshape(N, C // G, G, H * W).transpose(0, 2, 1, 3).reshape(N, G, -1)
    mu = xg.mean(2, keepdims=True)
    var = xg.var(2, keepdims=True)
    xhat = (xg - mu) / np.sqrt(var + eps)
    if not consecutive:
        xhat = xhat.reshape(N, G, C // G, H * W).transpose(0, 2, 1, 3)
    return xhat.reshape(N, C, H, W) * gamma[:, None, None] + beta[:, None, None]


def gn_backward(dout, x, gamma, mean, rstd, G, variant="right"):
    N, C, H, W = x.shape
    xhat = ((x.reshape(N, G, -1) - mean[..., None]) * rstd[..., None]).reshape(N, C, H, W)
    dbeta = dout.sum((0, 2, 3))
    dgamma = (dout * xhat).sum((0, 2, 3))
    if variant == "dgamma without xhat":
        dgamma = dout.sum((0, 2, 3))
    g = (dout * gamma[:, None, None]).reshape(N, G, -1)
    xh = xhat.reshape(N, G, -1)
    if variant == "no mean term":
        dx = rstd[..., None] * (g - xh * (g * xh).mean(2, keepdims=True))
    elif variant == "no variance term":
        dx = rstd[..., None] * (g - g.mean(2, keepdims=True))
    else:
        dx = rstd[..., None] * (g - g.mean(2, keepdims=True) - xh * (g * xh).mean(2, keepdims=True))
    return dx.reshape(x.shape), dgamma, dbeta


def test_group_norm_forward_grader():
    assert check_group_norm_forward(gn_forward)
    assert not check_group_norm_forward(lambda x, g, b, G, eps: gn_forward(x, g, b, G, eps, False))
    # the variance without eps differs by far less than a wrong normalisation; still caught
    assert not check_group_norm_forward(lambda x, g, b, G, eps: gn_forward(x, g, b, G, 1e-2))


@pytest.mark.parametrize("variant", ["no mean term", "no variance term", "dgamma without xhat"])
def test_group_norm_backward_grader(variant):
    assert check_group_norm_backward(gn_backward)
    assert not check_group_norm_backward(lambda *a: gn_backward(*a, variant=variant))


def test_group_norm_backward_grader_catches_a_transposed_result():
    def transposed(dout, x, gamma, mean, rstd, G):
        dx, dgamma, dbeta = gn_backward(dout, x, gamma, mean, rstd, G)
        return dx.transpose(0, 1, 3, 2).reshape(x.shape), dgamma, dbeta
    assert not check_group_norm_backward(transposed)


# ---------------------------------------------------------------- chapter 7

def iou(a, b, subtract_inter=True, clip=True):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None) if clip else rb - lt
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None] - (inter if subtract_inter else 0)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def test_box_iou_grader():
    assert check_box_iou(iou)
    assert not check_box_iou(lambda a, b: iou(a, b, subtract_inter=False))
    assert not check_box_iou(lambda a, b: iou(a, b, clip=False))   # far apart: (-)(-) > 0
    assert not check_box_iou(lambda a, b: iou(a, b).T)


def match(iou, pos, neg, low_quality="best object"):
    """torchvision's Matcher rule (low_quality="best object"), and two wrong ones."""
    G, A = iou.shape
    best_gt, best = iou.argmax(0), iou.max(0)
    matches = np.where(best >= pos, best_gt, np.where(best >= neg, -2, -1))
    if low_quality == "best object":
        top = iou.max(1, keepdims=True)
        claimed = ((iou == top) & (top > 0)).any(0)
        matches[claimed] = best_gt[claimed]
    elif low_quality == "last object wins":
        for g in range(G):
            if iou[g].max() > 0:
                matches[iou[g] == iou[g].max()] = g
    return matches


def test_match_anchors_grader():
    assert check_match_anchors(match)
    assert not check_match_anchors(lambda i, p, n: match(i, p, n, "last object wins"))
    assert not check_match_anchors(lambda i, p, n: match(i, p, n, "none"))
    # the ignored band with the wrong ends open: u > 0.4 and u > 0.5
    def strict(i, p, n):
        return match(i, p + 1e-9, n + 1e-9)
    assert not check_match_anchors(strict)


# ---------------------------------------------------------------- chapter 8

def mask_bce(logits, labels, targets, all_channels=False, per_roi_only=False):
    R = len(labels)
    x = logits[np.arange(R), labels]
    p = 1 / (1 + np.exp(-x))
    loss = np.mean(np.maximum(x, 0) - x * targets + np.log1p(np.exp(-np.abs(x))))
    d = np.zeros_like(logits)
    scale = targets[0].size if per_roi_only else targets.size
    if all_channels:
        d += ((1 / (1 + np.exp(-logits))) - targets[:, None]) / (scale * logits.shape[1])
    else:
        d[np.arange(R), labels] = (p - targets) / scale
    return loss, d


def test_mask_bce_grader():
    assert check_mask_bce(mask_bce)
    assert not check_mask_bce(lambda x, l, t: mask_bce(x, l, t, all_channels=True))
    assert not check_mask_bce(lambda x, l, t: mask_bce(x, l, t, per_roi_only=True))  # no 1/R
    def label_index_swapped(x, l, t):      # channel labels[r] of RoI r read as RoI labels[r]
        loss, d = mask_bce(x, l, t)
        wrong = np.zeros_like(d)
        R = len(l)
        p = 1 / (1 + np.exp(-x[np.minimum(l, R - 1), l]))
        wrong[np.arange(R), l] = (p - t) / t.size
        return loss, wrong
    assert not check_mask_bce(label_index_swapped)


def test_largest_shift_answer():
    assert check_largest_shift(1 - np.sqrt(2 / 3))
    assert check_largest_shift(0.184)
    assert not check_largest_shift(0.25)              # the quarter shift: IoU 0.39
    assert not check_largest_shift(1 - np.sqrt(0.5))  # forgot the union
    assert not check_largest_shift("a lot")


def test_largest_shift_not_attempted(capsys):
    assert check_largest_shift(None) is False
    assert "not attempted yet" in capsys.readouterr().out


# ---------------------------------------------------------------- chapter 9

def lr_at(step, lr, warmup, factor, iters, cosine_over_all=False, warmup_plus_one=False):
    if step < warmup:
        a = (step + 1 if warmup_plus_one else step) / warmup
        return lr * (factor * (1 - a) + a)
    t = step / iters if cosine_over_all else (step - warmup) / max(1, iters - warmup)
    return lr * 0.5 * (1 + np.cos(np.pi * min(t, 1.0)))


def test_learning_rate_grader():
    assert check_learning_rate(lr_at)
    assert not check_learning_rate(lambda *a: lr_at(*a, cosine_over_all=True))
    assert not check_learning_rate(lambda *a: lr_at(*a, warmup_plus_one=True))


def clip(grads, max_norm, per_tensor=False):
    if per_tensor:
        norms = [np.linalg.norm(g) for g in grads]
        return [g * min(1, max_norm / n) for g, n in zip(grads, norms)], float(np.sqrt(sum(n * n for n in norms)))
    norm = float(np.sqrt(sum(np.sum(g * g) for g in grads)))
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return [g * scale for g in grads], norm


def test_clip_gradients_grader():
    assert check_clip_gradients(clip)
    assert not check_clip_gradients(lambda g, m: clip(g, m, per_tensor=True))
    assert not check_clip_gradients(lambda g, m: ([x * m / clip(g, m)[1] for x in g], clip(g, m)[1]))  # always rescales


# ---------------------------------------------------------------- chapter 10

def nms(boxes, scores, t, suppressed_suppress=False, sort=True):
    order = np.argsort(-scores, kind="stable") if sort else np.arange(len(scores))
    ious = iou(boxes, boxes)
    keep, dead = [], np.zeros(len(boxes), bool)
    for i in order:
        if dead[i] and not suppressed_suppress:
            continue
        if not dead[i]:
            keep.append(i)
        dead |= ious[i] > t
        dead[i] = i not in keep
    return np.array(keep, dtype=np.int64)


def test_nms_grader():
    assert check_nms(nms)
    assert not check_nms(lambda b, s, t: nms(b, s, t, suppressed_suppress=True))
    assert not check_nms(lambda b, s, t: nms(b, s, t, sort=False))


def paste(mask, box, H, W, half_pixel=True, transpose=False):
    m = mask.shape[0]
    if transpose:
        mask = mask.T
    x1, y1, x2, y2 = box
    out = np.zeros((H, W))
    off = 0.5 if half_pixel else 0.0
    for i in range(H):
        for j in range(W):
            cx, cy = j + 0.5, i + 0.5
            if not (x1 <= cx <= x2 and y1 <= cy <= y2):
                continue
            u = np.clip((cx - x1) / (x2 - x1) * m - off, 0, m - 1)
            v = np.clip((cy - y1) / (y2 - y1) * m - off, 0, m - 1)
            u0, v0 = min(int(u), m - 2), min(int(v), m - 2)
            fu, fv = u - u0, v - v0
            top = mask[v0, u0] * (1 - fu) + mask[v0, u0 + 1] * fu
            bottom = mask[v0 + 1, u0] * (1 - fu) + mask[v0 + 1, u0 + 1] * fu
            out[i, j] = top * (1 - fv) + bottom * fv
    return out


def test_paste_mask_grader():
    assert check_paste_mask(paste)
    assert not check_paste_mask(lambda *a: paste(*a, half_pixel=False))
    assert not check_paste_mask(lambda *a: paste(*a, transpose=True))


# ---------------------------------------------------------------- every grader

CHECKS = [check_group_norm_forward, check_group_norm_backward, check_box_iou, check_match_anchors,
          check_mask_bce, check_learning_rate, check_clip_gradients, check_nms, check_paste_mask]


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_an_unattempted_exercise_is_reported_not_raised(check, capsys):
    def not_yet(*args, **kwargs):
        raise NotImplementedError("your turn")
    assert check(not_yet) is False
    assert "not attempted yet" in capsys.readouterr().out


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_a_crashing_solution_fails_with_the_error_printed(check, capsys):
    def broken(*args, **kwargs):
        raise IndexError("index 7 is out of bounds")
    assert check(broken) is False
    out = capsys.readouterr().out
    assert "IndexError: index 7 is out of bounds" in out and "not yet" in out
