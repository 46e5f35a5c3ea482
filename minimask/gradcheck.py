"""Numerical gradients, to check the hand-written backward passes.

For a function ``f`` with output ``y`` and an upstream gradient ``dout``
(what the loss would send back), the quantity a backward pass must produce
for input ``x`` is the gradient of the scalar ``sum(f(x) * dout)``. Its
centred difference along element ``i`` is

    (sum(f(x + h e_i) * dout) - sum(f(x - h e_i) * dout)) / (2 h)

with error O(h^2). ``dout`` is random on purpose: with ``dout = 1`` a
backward that transposes or swaps two axes of equal size can still pass.

Run checks in float64; in float32 the round-off of ``f`` (about 1e-7
relative) divided by ``2h`` swamps the difference.
"""
from __future__ import annotations

import numpy as np


def numerical_gradient(f, x: np.ndarray, dout: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Centred-difference gradient of ``sum(f(x) * dout)`` with respect to ``x``.

    ``f`` takes no arguments and reads ``x``, which is perturbed in place
    element by element and restored, so ``f`` can close over several inputs
    and the caller checks each in turn.
    """
    grad = np.zeros_like(x)
    flat_x = x.reshape(-1)  # a view: writing it perturbs x
    flat_g = grad.reshape(-1)
    for i in range(flat_x.size):
        old = flat_x[i]
        flat_x[i] = old + h
        plus = np.sum(np.asarray(f()) * dout)
        flat_x[i] = old - h
        minus = np.sum(np.asarray(f()) * dout)
        flat_x[i] = old
        flat_g[i] = (plus - minus) / (2 * h)
    return grad


def rel_error(a, b, eps: float = 1e-12) -> float:
    """Largest relative difference, ``max |a - b| / max(|a| + |b|, eps)``,
    over the whole array (CS231n's measure, taken over the array rather than
    element by element so that near-zero entries do not dominate)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    if a.size == 0:
        return 0.0
    scale = max(float(np.max(np.abs(a) + np.abs(b))), eps)
    return float(np.max(np.abs(a - b)) / scale)


def check_layer(forward, backward, inputs: dict, wrt: list[str], *, seed: int = 0,
                h: float = 1e-6, **kwargs) -> dict[str, float]:
    """Compare ``backward`` with centred differences for each input in ``wrt``.

    ``forward(**inputs, **kwargs)`` returns ``(out, cache)`` and
    ``backward(dout, cache)`` returns one gradient per differentiable input
    (a single array, or a tuple in the order the contract lists). ``wrt``
    names those inputs in that same order; ``None`` entries skip one.
    Returns ``{name: relative error}``.
    """
    rng = np.random.default_rng(seed)
    out, cache = forward(**inputs, **kwargs)
    out = np.asarray(out)
    dout = rng.standard_normal(out.shape)
    grads = backward(dout, cache)
    if not isinstance(grads, tuple):
        grads = (grads,)
    errors = {}
    for name, analytic in zip(wrt, grads):
        if name is None:
            continue
        x = inputs[name]
        numeric = numerical_gradient(lambda: forward(**inputs, **kwargs)[0], x, dout, h)
        errors[name] = rel_error(analytic, numeric)
    return errors
