"""The model's glue (minimask.layers.glue): every operation on every backend
against plain NumPy, on tiny arrays. On "cuda" the arrays are device arrays
and the results stay on the device."""
import numpy as np
import pytest

import minimask
from minimask.anchors import flatten_head_output, unflatten_head_grad
from minimask.backend import current_backend
from minimask.layers import glue


def dev(a):
    return current_backend().asarray(np.array(a))    # a copy: ops write in place


def host(a):
    return current_backend().to_host(a).copy()


def test_elementwise_and_in_place(backend, rng):
    a, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    np.testing.assert_array_equal(host(glue.add(dev(a), dev(b))), a + b)
    d = dev(a)
    glue.add_into(d, dev(b))
    np.testing.assert_array_equal(host(d), a + b)
    glue.scale_into(d, 0.5)
    np.testing.assert_array_equal(host(d), (a + b) * 0.5)
    glue.fill(d, 3)
    np.testing.assert_array_equal(host(d), np.full_like(a, 3))
    assert glue.sum_squares([dev(a), dev(b)]) == pytest.approx(
        float(np.sum(a ** 2) + np.sum(b ** 2)), rel=1e-12)


def test_crop_and_pad_are_adjoint(backend, rng):
    x = rng.standard_normal((2, 3, 5, 4))
    np.testing.assert_array_equal(host(glue.crop_hw(dev(x), 3, 2)), x[:, :, :3, :2])
    padded = host(glue.pad_hw(dev(x[:, :, :3, :2].copy()), (2, 3, 5, 4)))
    expected = np.zeros_like(x)
    expected[:, :, :3, :2] = x[:, :, :3, :2]
    np.testing.assert_array_equal(padded, expected)


def test_flatten_and_unflatten_heads(backend, rng):
    K = 3
    maps = [rng.standard_normal((2, 2 * K, h, w)) for h, w in [(4, 3), (2, 2), (1, 1)]]
    flat = host(glue.flatten_heads([dev(m) for m in maps], K))
    np.testing.assert_array_equal(
        flat, np.concatenate([flatten_head_output(m, K) for m in maps], axis=1))
    d = rng.standard_normal(flat.shape)
    back = glue.unflatten_heads(dev(d), [m.shape for m in maps])
    start = 0
    for m, b in zip(maps, back):
        n = m.shape[2] * m.shape[3] * 2
        np.testing.assert_array_equal(host(b), unflatten_head_grad(d[:, start:start + n], m.shape))
        start += n


def test_rows_and_indexed_fill(backend, rng):
    x = rng.standard_normal((6, 2, 3))
    idx = np.array([4, 0, 5])
    np.testing.assert_array_equal(host(glue.take_rows(dev(x), idx)), x[idx])
    dst = dev(np.zeros_like(x))
    glue.put_rows(dst, idx, dev(x[idx].copy()))
    expected = np.zeros_like(x)
    expected[idx] = x[idx]
    np.testing.assert_array_equal(host(dst), expected)
    flat = dev(np.zeros(10))
    glue.fill_at(flat, np.array([1, 7]), 2.0)
    np.testing.assert_array_equal(host(flat), np.eye(1, 10, 1)[0] * 2 + np.eye(1, 10, 7)[0] * 2)
    assert len(host(glue.take_rows(dev(x), np.zeros(0, dtype=np.int64)))) == 0


def test_above_compacts_and_sorts(backend, rng):
    x = rng.standard_normal(200)
    got = glue.above(dev(x), 1.0, capacity=100)
    np.testing.assert_array_equal(got, np.flatnonzero(x > 1.0))
    if minimask.get_backend() == "cuda":    # the host backends never overflow
        assert glue.above(dev(x), -10.0, capacity=10) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_update_matches_the_formula(backend, rng, dtype):
    w, g, v = (rng.standard_normal(7).astype(dtype) for _ in range(3))
    dw, dg, dv = dev(w), dev(g), dev(v)
    glue.sgd_update(dw, dg, dv, 0.1, 0.9, 1e-2)
    g2 = g + dtype(1e-2) * w
    v2 = dtype(0.9) * v + g2
    np.testing.assert_allclose(host(dv), v2, rtol=1e-6 if dtype == np.float32 else 1e-15)
    np.testing.assert_allclose(host(dw), w - dtype(0.1) * v2,
                               rtol=1e-6 if dtype == np.float32 else 1e-15)


def test_nchw_of_inverts_the_flat_index():
    """The index helper every one-thread-per-element kernel starts with."""
    from minimask._cuda import nchw_of_cpu
    shape = (2, 3, 4, 5)
    for t in range(int(np.prod(shape))):
        assert nchw_of_cpu(t, *shape[1:]) == np.unravel_index(t, shape), t
