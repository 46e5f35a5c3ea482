"""Parameters, modules, checkpoints and SGD."""
import os

import numpy as np
import pytest

from minimask.nn import SGD, Module, Parameter, load_npz, save_npz


class Linear(Module):
    def __init__(self, n_in, n_out, rng):
        self.weight = Parameter(rng.standard_normal((n_out, n_in)))
        self.bias = Parameter(np.zeros(n_out))


class Net(Module):
    def __init__(self, rng):
        self.first = Linear(3, 4, rng)
        self.blocks = [Linear(4, 4, rng), Linear(4, 2, rng)]
        self.scale = Parameter(np.ones(1))
        self.not_a_parameter = np.zeros(3)


def test_named_parameters_are_dotted_and_complete(rng):
    names = [n for n, _ in Net(rng).named_parameters()]
    assert names == ["first.weight", "first.bias", "blocks.0.weight", "blocks.0.bias",
                     "blocks.1.weight", "blocks.1.bias", "scale"]
    assert Net(rng).num_parameters() == 12 + 4 + 16 + 4 + 8 + 2 + 1


def test_zero_grad(rng):
    net = Net(rng)
    for p in net.parameters():
        p.grad += 3.0
    net.zero_grad()
    assert all(np.all(p.grad == 0) for p in net.parameters())


def test_save_load_round_trip_with_metadata(tmp_path):
    a, b = Net(np.random.default_rng(1)), Net(np.random.default_rng(2))
    path = tmp_path / "w.npz"
    a.save(path, metadata={"step": 7, "preset": "tiny"})
    meta = b.load(path)
    assert meta == {"step": 7, "preset": "tiny"}
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        np.testing.assert_array_equal(pa.value, pb.value)
    # no temporary files left behind by the atomic write
    assert [p.name for p in tmp_path.iterdir()] == ["w.npz"]


def test_save_replaces_atomically_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "w.npz"
    save_npz(path, {"x": np.ones(3)})

    def broken_savez(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError):
        save_npz(path, {"x": np.zeros(3)})
    monkeypatch.undo()
    arrays, _ = load_npz(path)
    np.testing.assert_array_equal(arrays["x"], np.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["w.npz"]


def test_load_refuses_missing_corrupt_and_pickled_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_npz(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_npz(bad)
    truncated = tmp_path / "truncated.npz"
    save_npz(truncated, {"x": np.arange(1000.0)})
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_npz(truncated)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError):
        load_npz(pickled)


def test_load_state_dict_refuses_mismatch(rng):
    net = Net(rng)
    state = net.state_dict()
    wrong_shape = dict(state, **{"first.weight": np.zeros((5, 3))})
    with pytest.raises(ValueError, match="first.weight.*shape"):
        net.load_state_dict(wrong_shape)
    missing = {k: v for k, v in state.items() if k != "scale"}
    with pytest.raises(ValueError, match="missing \\['scale'\\]"):
        net.load_state_dict(missing)
    extra = dict(state, extra=np.zeros(1))
    with pytest.raises(ValueError, match="unexpected \\['extra'\\]"):
        net.load_state_dict(extra)
    nan = dict(state, scale=np.array([np.nan]))
    with pytest.raises(ValueError, match="NaN"):
        net.load_state_dict(nan)


def test_sgd_matches_hand_computed_momentum_and_weight_decay():
    p = Parameter(np.array([1.0, -2.0]))
    opt = SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    grads = [np.array([0.5, 0.25]), np.array([-1.0, 2.0])]
    w = np.array([1.0, -2.0])
    v = np.zeros(2)
    for g in grads:
        p.grad[...] = g
        opt.step()
        v = 0.9 * v + (g + 0.01 * w)
        w = w - 0.1 * v
        np.testing.assert_allclose(p.value, w, rtol=1e-15)


def test_sgd_descends_a_quadratic():
    p = Parameter(np.array([3.0, -4.0]))
    opt = SGD([p], lr=0.05, momentum=0.9)
    for _ in range(300):
        opt.zero_grad()
        p.grad += 2 * p.value  # gradient of |w|^2
        opt.step()
    assert np.linalg.norm(p.value) < 1e-3


def test_sgd_refuses_bad_settings():
    p = Parameter(np.zeros(1))
    with pytest.raises(ValueError, match="lr"):
        SGD([p], lr=0)
    with pytest.raises(ValueError, match="momentum"):
        SGD([p], lr=0.1, momentum=1.0)


def test_parameter_refuses_integers():
    with pytest.raises(ValueError, match="float32 or float64"):
        Parameter(np.arange(3))


class WithBuffer(Module):
    def __init__(self, rng):
        self.layer = Linear(2, 2, rng)
        self.register_buffer("running", np.array([1.0, 0.0]))
        self.children = [Linear(2, 1, rng)]
        self.children[0].register_buffer("count", np.zeros(1))


def test_buffers_are_saved_and_loaded_but_not_parameters(tmp_path, rng):
    net = WithBuffer(rng)
    assert [n for n, _ in net.named_buffers()] == ["running", "children.0.count"]
    assert "running" not in dict(net.named_parameters())
    assert len(net.parameters()) == 4
    state = net.state_dict()
    assert set(state) == {"layer.weight", "layer.bias", "children.0.weight", "children.0.bias",
                          "running", "children.0.count"}
    # the optimiser holds parameters only: a step leaves a buffer alone
    opt = SGD(net.parameters(), lr=0.1)
    for p in net.parameters():
        p.grad[...] = 1.0
    opt.step()
    np.testing.assert_array_equal(net.running, [1.0, 0.0])
    # the attribute is the array, and re-assigning it keeps it a buffer
    net.running = np.array([0.5, 0.25])
    net.children[0].count = np.array([3.0])
    net.save(tmp_path / "w.npz")
    other = WithBuffer(np.random.default_rng(9))
    other.load(tmp_path / "w.npz")
    np.testing.assert_array_equal(other.running, [0.5, 0.25])
    np.testing.assert_array_equal(other.children[0].count, [3.0])
    # a file from before the buffer existed still loads; the buffer keeps its value
    no_buffers = {k: v for k, v in state.items() if k not in ("running", "children.0.count")}
    fresh = WithBuffer(rng)
    fresh.load_state_dict(no_buffers)
    np.testing.assert_array_equal(fresh.running, [1.0, 0.0])
    with pytest.raises(ValueError, match="'running' has shape"):
        fresh.load_state_dict({**state, "running": np.zeros(3)})
