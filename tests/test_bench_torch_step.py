"""The torch benchmark's parts that need no torch.

``benchmarks/bench_torch_step.py`` times ``minimask_step`` (the network part
of ``RetinaMask.loss``, fed targets computed once by ``prepare``) against a
PyTorch twin. These tests check that this mirror computes exactly what
``model.loss`` computes, so the benchmark times the real thing, and that
the script refuses cleanly where torch is not installed.
"""
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_torch_step.py"


def test_refuses_without_torch():
    # sys.modules["torch"] = None makes torch unimportable, installed or not
    code = ("import sys, runpy; sys.modules['torch'] = None; "
            f"sys.argv = [{str(SCRIPT)!r}, '--verify-only']; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "torch and torchvision are not installed" in out.stderr
    assert "Traceback" not in out.stderr


def test_rejects_a_malformed_case():
    bench = runpy.run_path(str(SCRIPT))
    assert bench["parse_case"]("tiny:128") == ("tiny", 128)
    with pytest.raises(Exception, match="PRESET:SIZE"):
        bench["parse_case"]("tiny128")


# the tiny preset (mask RoIs from P2, five anchor ratios), the one before
# issue 11's study (P3..P5 by eq. (1) at level 4, three ratios), and P2 with
# a small canonical size, so that the RoIs of one batch read P2 and P3: the
# mirror must follow each pyramid
OLD_TINY = dict(roi_min_level=3, roi_max_level=5, canonical_level=4, anchor_ratios=(0.5, 1.0, 2.0))
MIXED_P2 = dict(canonical_size=6, roi_max_level=5)


@pytest.mark.parametrize("overrides, levels_read", [({}, {2}), (OLD_TINY, {3}), (MIXED_P2, {2, 3})],
                         ids=["tiny_p2", "tiny_p3", "tiny_p2_mixed"])
def test_network_step_equals_model_loss(overrides, levels_read):
    """float64, tiny preset at 64 px, two images: the losses and every
    gradient of ``minimask_step`` equal ``model.loss``'s."""
    from minimask.data.synthetic import ShapesDataset
    from minimask.model import Config, RetinaMask

    bench = runpy.run_path(str(SCRIPT))
    data = ShapesDataset(seed=4, num_images=2, size=64)
    images = np.stack([data[i][0] for i in range(2)]).astype(np.float64)
    targets = [data[i][1] for i in range(2)]
    model = RetinaMask(Config.preset("tiny", num_classes=data.num_classes, dtype="float64",
                                     **overrides))
    with_p2 = model.config.roi_min_level == 2
    assert model.fpn.with_p2 == with_p2
    prep = bench["prepare"](model, images, targets)
    assert prep["rois"].shape[0] > 0 and int(prep["num_pos"]) > 0   # all three terms present
    # eq. (1)'s levels, as the case means them to be
    assert set(prep["roi_levels"].tolist()) == levels_read
    ref = model.loss(images, targets)
    ref_grads = {k: p.grad.copy() for k, p in model.named_parameters()}
    assert ("fpn.lateral2.weight" in ref_grads) == with_p2
    if with_p2:     # the mask loss reaches P2's convs
        assert np.abs(ref_grads["fpn.smooth2.weight"]).max() > 0
    mine = bench["minimask_step"](model, prep)
    for k in ("cls", "box", "mask", "total"):
        assert mine[k] == pytest.approx(ref[k], rel=1e-12, abs=0)
    for k, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, ref_grads[k], rtol=1e-10, atol=1e-14 * np.abs(ref_grads[k]).max())


def test_threads_step_benchmark_times_both_thread_counts(tmp_path):
    """bench_threads_step's measuring process: one row with 1- and 2-thread
    times of the same step, beside a busy process (the spinner must stop)."""
    import json
    import multiprocessing
    bench = runpy.run_path(str(ROOT / "benchmarks" / "bench_threads_step.py"))
    out = tmp_path / "row.json"
    before = len(multiprocessing.active_children())
    bench["role"]("tiny", 64, 1, steps=2, rounds=1, busy=1, out=str(out))
    row = json.loads(out.read_text())
    assert (row["preset"], row["size"], row["busy"]) == ("tiny", 64, 1)
    assert len(row["one_times_s"]) == len(row["two_times_s"]) == 2
    assert all(t > 0 for t in row["one_times_s"] + row["two_times_s"])
    assert row["one_ms"] == pytest.approx(1e3 * float(np.median(row["one_times_s"])))
    assert len(multiprocessing.active_children()) == before      # the spinner was joined
