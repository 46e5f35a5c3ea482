"""Chapter 11's grader passes a correct fold and fails the usual slips."""
import numpy as np

from minimask.exercises import check_fold_frozen_bn


def _right(gamma, beta, mean, var, eps):
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def test_fold_frozen_bn_passes_a_correct_fold():
    assert check_fold_frozen_bn(_right, verbose=False)


def test_fold_frozen_bn_fails_typical_slips():
    wrong = {
        "no epsilon": lambda g, b, m, v, e: _right(g, b, m, v, 0.0),
        "variance, not std": lambda g, b, m, v, e: (g / (v + e), b - m * g / (v + e)),
        "shift without the scale": lambda g, b, m, v, e: (g / np.sqrt(v + e), b - m),
        "mean added": lambda g, b, m, v, e: (g / np.sqrt(v + e), b + m * g / np.sqrt(v + e)),
        "a pair swapped": lambda g, b, m, v, e: _right(g, b, m, v, e)[::-1],
    }
    for name, fn in wrong.items():
        assert not check_fold_frozen_bn(fn, verbose=False), name


def test_fold_frozen_bn_skeleton_is_not_attempted(capsys):
    from minimask.exercises import grade

    def skeleton(gamma, beta, mean, var, eps):
        raise NotImplementedError
    assert grade(check_fold_frozen_bn, skeleton) is None
    assert "not attempted yet" in capsys.readouterr().out
