"""The training loop: schedule, clipping, flips, checkpoints, resume,
Ctrl-C, and the non-finite-loss stop."""
import json
import os
import signal

import numpy as np
import pytest

from minimask.data.synthetic import ShapesDataset
from minimask.model import Config
from minimask.nn import Parameter, load_npz
from minimask.train import (NonFiniteLoss, TrainSettings, clip_gradients, hflip, learning_rate,
                            load_model, train)


def small_config(num_classes=4, **kw):
    return Config(stem_channels=4, stem_kernel=3, blocks=(1, 1, 1, 1), widths=(4, 8, 8, 8),
                  fpn_channels=8, head_convs=1, mask_convs=1, anchor_sizes=(8, 16, 32, 64, 128),
                  canonical_size=16, mask_size=8, num_classes=num_classes, **kw).validated()


def settings(tmp_path, **kw):
    base = dict(iters=4, batch_size=2, lr=0.01, warmup_iters=2, log_every=1,
                checkpoint_every=2, out=str(tmp_path / "run"), progress=False)
    base.update(kw)
    return TrainSettings(**base)


DATA = ShapesDataset(seed=5, num_images=6, size=64)


def test_learning_rate_warms_up_then_decays():
    s = TrainSettings(iters=100, lr=0.1, warmup_iters=10, warmup_factor=0.01)
    assert learning_rate(0, s) == pytest.approx(0.001)
    assert learning_rate(5, s) == pytest.approx(0.1 * (0.01 * 0.5 + 0.5))
    assert learning_rate(10, s) == pytest.approx(0.1)
    assert learning_rate(55, s) == pytest.approx(0.05)
    assert learning_rate(100, s) == pytest.approx(0.0, abs=1e-12)
    step = TrainSettings(iters=90, lr=0.1, warmup_iters=0, schedule="step")
    assert [learning_rate(i, step) for i in (0, 59, 60, 79, 80)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001])


def test_clip_gradients_scales_to_the_max_norm():
    a, b = Parameter(np.zeros(2)), Parameter(np.zeros(1))
    a.grad[:] = [3.0, 0.0]
    b.grad[:] = [4.0]
    assert clip_gradients([a, b], 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(np.r_[a.grad, b.grad], [0.6, 0.0, 0.8], rtol=1e-5)
    assert clip_gradients([a, b], 10.0) == pytest.approx(1.0, rel=1e-5)  # under: unchanged


def test_hflip_mirrors_image_boxes_and_masks():
    image, target = DATA[0]
    flipped, ft = hflip(image, target)
    np.testing.assert_array_equal(flipped, image[..., ::-1])
    np.testing.assert_array_equal(ft["masks"], target["masks"][..., ::-1])
    W = image.shape[-1]
    np.testing.assert_allclose(ft["boxes"][:, 0], W - target["boxes"][:, 2])
    from minimask.masks import box_of_mask
    for box, mask in zip(ft["boxes"], ft["masks"]):
        np.testing.assert_allclose(box, box_of_mask(mask))


def test_checkpoints_metrics_and_plot_are_written(tmp_path):
    train(DATA, settings(tmp_path), small_config())
    run = tmp_path / "run"
    arrays, meta = load_npz(run / "checkpoint.npz")
    assert meta["step"] == 4 and meta["image_size"] == 64
    assert meta["class_names"] == list(DATA.class_names)
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 4
    assert any(k.startswith("optimizer.") for k in arrays)
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r[k]) for r in rows for k in ("cls", "box", "mask", "total"))
    assert (run / "losses.png").stat().st_size > 0
    model, _ = load_model(run / "checkpoint.npz", num_classes=4)
    assert model.config == small_config()


def test_same_seed_same_run_and_resume_matches_an_uninterrupted_run(tmp_path):
    a = train(DATA, settings(tmp_path / "a"), small_config())
    b = train(DATA, settings(tmp_path / "b"), small_config())
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(pa.value, pb.value, err_msg=n)
    # stop at step 2, then resume to 4
    train(DATA, settings(tmp_path / "c", iters=2), small_config())
    c = train(DATA, settings(tmp_path / "c", iters=4, resume=True))
    for (n, pa), (_, pc) in zip(a.named_parameters(), c.named_parameters()):
        np.testing.assert_array_equal(pa.value, pc.value, err_msg=n)
    rows = (tmp_path / "c" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4]
    # the running means are in the checkpoint: the logged curve has no seam
    straight = (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()
    for r, q in zip(rows, straight):
        for k in ("cls", "box", "mask", "total"):
            assert json.loads(r)[k] == json.loads(q)[k], (r, q)


def test_resume_with_self_adjusting_beta_matches_an_uninterrupted_run(tmp_path):
    """beta_stats (the self-adjusting smooth L1's running mean and variance)
    is a buffer: saved with the weights, so 2 + 2 steps equal 4 bit for bit."""
    config = small_config(self_adjusting_beta=True)
    a = train(DATA, settings(tmp_path / "a"), config)
    train(DATA, settings(tmp_path / "c", iters=2), config)
    arrays, _ = load_npz(tmp_path / "c" / "run" / "checkpoint.npz")
    assert "beta_stats" in arrays and arrays["beta_stats"][1] > 0  # it moved and was saved
    c = train(DATA, settings(tmp_path / "c", iters=4, resume=True))
    np.testing.assert_array_equal(c.beta_stats, a.beta_stats)
    assert not np.array_equal(a.beta_stats, [config.box_beta, 0.0])
    for (n, pa), (_, pc) in zip(a.named_parameters(), c.named_parameters()):
        np.testing.assert_array_equal(pa.value, pc.value, err_msg=n)


class ExplodingData:
    """Shapes whose pixels become huge at a given step: the loss overflows."""
    num_classes = 4
    class_names = ShapesDataset.class_names
    size = 64

    def __init__(self, bad_after):
        self.calls = 0
        self.bad_after = bad_after

    def __len__(self):
        return 6

    def __getitem__(self, i):
        self.calls += 1
        image, target = DATA[i]
        if self.calls > self.bad_after:
            image = image * np.float32(3e38)
        return image, target


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    s = settings(tmp_path, iters=6, checkpoint_every=2)
    with pytest.raises(NonFiniteLoss, match="non-finite at step 3"), \
            np.errstate(over="ignore", invalid="ignore"):      # the overflow is the point
        train(ExplodingData(bad_after=2 * 3), s, small_config())
    _, meta = load_npz(tmp_path / "run" / "checkpoint.npz")
    assert meta["step"] == 2


class InterruptingData(ExplodingData):
    def __getitem__(self, i):
        self.calls += 1
        if self.calls == self.bad_after:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would
        return DATA[i]


def test_ctrl_c_saves_before_leaving(tmp_path):
    s = settings(tmp_path, iters=50, checkpoint_every=100)
    model = train(InterruptingData(bad_after=2 * 2 + 1), s, small_config())
    _, meta = load_npz(tmp_path / "run" / "checkpoint.npz")
    assert meta["step"] == 3  # the step in flight finishes, then it saves
    assert model.interrupted  # the command line exits 130 on it
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


class TwoClassData:
    num_classes = 2
    class_names = ("a", "b")
    size = 64

    def __len__(self):
        return 6

    def __getitem__(self, i):
        image, target = DATA[i]
        return image, dict(target, labels=target["labels"] % 2)


def test_config_and_dataset_must_agree_on_the_classes(tmp_path):
    with pytest.raises(ValueError, match="config has 2 classes, the dataset has 4"):
        train(DATA, settings(tmp_path, iters=2), small_config(num_classes=2))
    train(DATA, settings(tmp_path, iters=2), small_config())
    with pytest.raises(ValueError, match="is for 4 classes, the dataset has 2"):
        train(TwoClassData(), settings(tmp_path, iters=4, resume=True))
