"""Data-parallel training: each batch split over worker processes, the
gradients averaged (minimask.parallel)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minimask.data.synthetic import ShapesDataset
from minimask.model import Config, RetinaMask
from minimask.parallel import DataParallel, average_losses, batch_parts
from minimask.train import TrainSettings, make_batch, train

DATA = ShapesDataset(seed=5, num_images=6, size=64)


def micro_config(**kw):
    base = dict(stem_channels=4, stem_kernel=3, blocks=(1, 1, 1, 1), widths=(4, 8, 8, 8),
                fpn_channels=8, head_convs=1, mask_convs=1, anchor_sizes=(8, 16, 32, 64, 128),
                canonical_size=16, mask_size=8, num_classes=4, dtype="float64", seed=2)
    base.update(kw)
    return Config(**base).validated()


@given(batch=st.integers(1, 12), n=st.integers(1, 12))
def test_batch_parts_cover_the_batch_once_in_order(batch, n):
    if n > batch:
        with pytest.raises(ValueError, match="workers"):
            batch_parts(batch, n)
        return
    parts = batch_parts(batch, n)
    assert len(parts) == n
    np.testing.assert_array_equal(np.concatenate(parts), np.arange(batch))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_make_batch_parts_are_slices_of_the_whole_batch():
    s = TrainSettings(batch_size=5, seed=3)
    images, targets = make_batch(DATA, 7, s)
    for k, mine in enumerate(batch_parts(5, 2)):
        part_images, part_targets = make_batch(DATA, 7, s, part=(k, 2))
        np.testing.assert_array_equal(part_images, images[mine])
        for t, u in zip(part_targets, [targets[i] for i in mine]):
            np.testing.assert_array_equal(t["masks"], u["masks"])


def test_average_losses_means_the_terms_and_sums_the_counts():
    parts = [dict(cls=1.0, box=2.0, mask=3.0, total=6.0, num_pos=4, num_mask_rois=2),
             dict(cls=3.0, box=0.0, mask=1.0, total=4.0, num_pos=1, num_mask_rois=5)]
    out = average_losses(parts)
    assert out == dict(cls=2.0, box=1.0, mask=2.0, total=5.0, num_pos=5, num_mask_rois=7)


def test_the_gradient_is_the_mean_of_the_parts_gradients():
    # float64, so the workers' sums agree with this process's to rounding
    s = TrainSettings(batch_size=3, seed=1)
    model = RetinaMask(micro_config())
    rng = np.random.default_rng(0)
    for p in model.parameters():   # move away from the initial weights the workers also have
        p.value += 0.01 * rng.standard_normal(p.value.shape)
    with DataParallel(model, DATA, s, n=2) as dp:
        losses = dp.loss(step=4)
        got = {n: p.grad.copy() for n, p in model.named_parameters()}
    expected, terms = {}, []
    for k in range(2):
        images, targets = make_batch(DATA, 4, s, part=(k, 2))
        terms.append(model.loss(images, targets))
        for n, p in model.named_parameters():
            expected[n] = expected.get(n, 0) + p.grad / 2
    assert losses["total"] == pytest.approx((terms[0]["total"] + terms[1]["total"]) / 2, rel=1e-12)
    assert losses["num_pos"] == terms[0]["num_pos"] + terms[1]["num_pos"]
    for n in got:
        np.testing.assert_allclose(got[n], expected[n], rtol=1e-10, atol=1e-14, err_msg=n)
    assert sum(np.abs(g).sum() for g in got.values()) > 0


def test_one_worker_gives_the_whole_batch_loss():
    s = TrainSettings(batch_size=2, seed=1)
    model = RetinaMask(micro_config())
    with DataParallel(model, DATA, s, n=1) as dp:
        losses = dp.loss(step=0)
        got = [p.grad.copy() for p in model.parameters()]
    images, targets = make_batch(DATA, 0, s)
    whole = model.loss(images, targets)
    assert losses["total"] == pytest.approx(whole["total"], rel=1e-12)
    for g, p in zip(got, model.parameters()):
        np.testing.assert_allclose(g, p.grad, rtol=1e-10, atol=1e-14)


class BrokenData:
    """Image 3 cannot be read: a worker meets it and must say so."""
    num_classes = 4
    class_names = ShapesDataset.class_names
    size = 64

    def __len__(self):
        return 6

    def __getitem__(self, i):
        if i == 3:
            raise OSError("image 3 is unreadable")
        return DATA[i]


def test_a_failing_worker_raises_its_error_here():
    s = TrainSettings(batch_size=6, seed=0)
    model = RetinaMask(micro_config())
    with DataParallel(model, BrokenData(), s, n=2) as dp:
        with pytest.raises(RuntimeError, match="image 3 is unreadable"):
            for step in range(20):       # some batch draws index 3
                dp.loss(step)


def test_training_with_two_workers_is_reproducible_and_resumes(tmp_path):
    cfg = micro_config(dtype="float32")

    def run(out, iters, resume=False):
        s = TrainSettings(iters=iters, batch_size=2, lr=0.01, warmup_iters=1, log_every=1,
                          checkpoint_every=2, out=str(out), progress=False, workers=2,
                          resume=resume)
        return train(DATA, s, None if resume else cfg)

    a = run(tmp_path / "a", 4)
    b = run(tmp_path / "b", 2)
    b = run(tmp_path / "b", 4, resume=True)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_allclose(pa.value, pb.value, rtol=1e-5, atol=1e-7, err_msg=n)
    assert not np.allclose(a.parameters()[0].value, RetinaMask(cfg).parameters()[0].value)


def test_more_workers_than_images_is_refused(tmp_path):
    with pytest.raises(ValueError, match="workers"):
        TrainSettings(batch_size=2, workers=3).validated()
