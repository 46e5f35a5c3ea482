"""Run folders (``minimask.runs``) through the command line: a new run
never destroys an old one, ``--resume`` keeps the run's settings and data,
a damaged checkpoint or metrics file gives one line naming the file and
the field, and what a crash leaves behind is tidied up.

Every run here is tiny (64 px, 2-3 steps, no final evaluation); commands
run in-process through ``main([...])``.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from minimask import runs
from minimask.__main__ import main
from minimask.nn import load_npz, save_npz

# single-process training: the ranks are tests/test_distributed.py's
pytestmark = pytest.mark.usefixtures("one_rank")

SIZE = 64
TINY = ["--num-images", "4", "--image-size", str(SIZE), "--eval-images", "0", "--no-progress",
        "--workers", "1"]


def _run(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("minimask: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A 2-step run, copied by the tests that change it."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", "--iters", "2", "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture
def run(base_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    return out


def _weights(path):
    arrays, _ = load_npz(path)
    return {k: v for k, v in arrays.items() if not k.startswith("optimizer.")}


def _set_meta(run_dir, **changes):
    """Rewrite the checkpoint's metadata (``None`` deletes a field)."""
    arrays, meta = load_npz(run_dir / "checkpoint.npz")
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    save_npz(run_dir / "checkpoint.npz", arrays, meta)


# ----------------------------------------------------------------------
# item 1: a new run never destroys an old one
# ----------------------------------------------------------------------


def test_explicit_out_holding_a_run_is_refused_and_the_run_is_kept(run, capsys):
    metrics = (run / "metrics.jsonl").read_text()
    before = _weights(run / "checkpoint.npz")
    code, _, err = _run(capsys, ["train", "--iters", "1", "--out", str(run), *TINY])
    assert code == 2
    line = _one_error_line(err)
    assert str(run) in line and "--resume" in line and "--overwrite" in line, line
    assert (run / "metrics.jsonl").read_text() == metrics
    after = _weights(run / "checkpoint.npz")
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_overwrite_replaces_the_run(run, capsys):
    code, out, _ = _run(capsys, ["train", "--iters", "1", "--out", str(run), "--overwrite", *TINY])
    assert code == 0, out
    _, meta = load_npz(run / "checkpoint.npz")
    assert meta["step"] == 1
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1]


def test_default_out_gets_a_fresh_folder_each_time(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for expected in ("runs/train", "runs/train2"):
        code, out, _ = _run(capsys, ["train", "--iters", "1", *TINY])
        assert code == 0
        assert f"writing to {expected}" in out, out
        assert (tmp_path / expected / "checkpoint.npz").is_file()
    # the first run is intact
    _, meta = load_npz(tmp_path / "runs/train/checkpoint.npz")
    assert meta["step"] == 1
    assert runs.fresh_run_dir("runs/train") == Path("runs/train3")


def test_the_library_refuses_too(run):
    from minimask.data.synthetic import ShapesDataset
    from minimask.train import TrainSettings, train
    with pytest.raises(runs.RunExists, match="already holds a run"):
        train(ShapesDataset(seed=0, num_images=4, size=SIZE),
              TrainSettings(iters=1, batch_size=2, out=str(run), progress=False))


# ----------------------------------------------------------------------
# item 7: --resume keeps the run's settings and data
# ----------------------------------------------------------------------


@pytest.mark.parametrize("flag,value", [("--lr", "0.01"), ("--seed", "7"),
                                        ("--batch-size", "2"), ("--image-size", "128"),
                                        ("--num-images", "9"), ("--dataset", "x.json")])
def test_resume_refuses_a_flag_that_contradicts_the_run(run, capsys, flag, value):
    code, _, err = _run(capsys, ["train", "--iters", "3", "--out", str(run), "--resume",
                                 flag, value, "--no-progress", "--eval-images", "0"])
    assert code == 2
    line = _one_error_line(err)
    assert flag in line and str(run) in line, line
    _, meta = load_npz(run / "checkpoint.npz")
    assert meta["step"] == 2


def test_resume_without_flags_uses_the_runs_settings_and_data(run, capsys):
    # the run: 64 px, 4 shapes images, batch 4, seed 0; nothing of it is repeated here
    code, out, err = _run(capsys, ["train", "--out", str(run), "--resume", "--iters", "3",
                                   "--no-progress", "--eval-images", "0", "--workers", "1"])
    assert code == 0, err
    assert "at step 2" in out and "ShapesDataset (4 images" in out, out
    _, meta = load_npz(run / "checkpoint.npz")
    assert meta["step"] == 3 and meta["image_size"] == SIZE
    assert meta["settings"]["batch_size"] == 4 and meta["dataset"]["num_images"] == 4


def test_resume_with_the_same_values_typed_is_accepted(run, capsys):
    code, _, err = _run(capsys, ["train", "--out", str(run), "--resume", "--iters", "3",
                                 "--image-size", str(SIZE), "--num-images", "4", "--seed", "0",
                                 "--no-progress", "--eval-images", "0", "--workers", "1"])
    assert code == 0, err


def test_the_library_refuses_changed_settings_on_resume(run):
    from minimask.data.synthetic import ShapesDataset
    from minimask.train import TrainSettings, train
    with pytest.raises(ValueError, match="lr 0.5 differs"):
        train(ShapesDataset(seed=0, num_images=4, size=SIZE),
              TrainSettings(iters=3, lr=0.5, out=str(run), resume=True, progress=False))


# ----------------------------------------------------------------------
# items 8, 9, 11: damaged checkpoints and metrics
# ----------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("step", 2.7), ("step", -5), ("step", "2"),
                                         ("step", None), ("running", "abc"),
                                         ("running", {"cls": "x"}), ("settings", []),
                                         ("settings", None), ("settings", {"lr": "fast"}),
                                         ("settings", {"batch_size": 10 ** 12}),
                                         ("settings", {"batch_size": -1}),
                                         ("settings", {"schedule": "linear"}),
                                         ("image_size", "big"), ("class_names", 5)])
def test_resume_from_damaged_metadata_is_one_line(run, capsys, field, value):
    metrics = (run / "metrics.jsonl").read_text()
    _set_meta(run, **{field: value})
    code, _, err = _run(capsys, ["train", "--out", str(run), "--resume", "--iters", "4",
                                 "--no-progress", "--eval-images", "0"])
    assert code == 2
    line = _one_error_line(err)
    assert "checkpoint.npz" in line and field in line, line
    assert (run / "metrics.jsonl").read_text() == metrics


def test_a_partial_last_metrics_line_is_dropped_with_a_message(run, capsys):
    path = run / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 3, "lr": 0.0')   # a full disk's last write
    code, out, err = _run(capsys, ["train", "--out", str(run), "--resume", "--iters", "3",
                                   "--no-progress", "--eval-images", "0", "--workers", "1"])
    assert code == 0, err
    assert f"{path}: dropped 1 unreadable line(s) (line 2)" in out, out
    # the base run logs its last step only (log_every 10): step 2, then 3
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [2, 3]


def test_stale_temporary_checkpoints_are_removed(run, capsys):
    for name in (".tmp-abc123.npz", ".tmp-zz.npz", ".checkpoint.json.tmp"):
        (run / name).write_bytes(b"x" * 1000)
    (run / "keep.npz").write_bytes(b"mine")
    code, out, err = _run(capsys, ["train", "--out", str(run), "--resume", "--iters", "3",
                                   "--no-progress", "--eval-images", "0", "--workers", "1"])
    assert code == 0, err
    assert "removed 3 unfinished checkpoint file(s)" in out, out
    assert sorted(p.name for p in run.glob(".*tmp*")) == []
    assert (run / "keep.npz").read_bytes() == b"mine"


def test_a_directory_as_weights_says_so(run, tmp_path, capsys):
    code, _, err = _run(capsys, ["evaluate", "--weights", str(run), "--num-images", "1",
                                 "--out", str(tmp_path / "e"), "--no-progress"])
    assert code == 2
    line = _one_error_line(err)
    assert "is a directory" in line and str(run) in line, line


# ----------------------------------------------------------------------
# item 11 and 8: Ctrl-C
# ----------------------------------------------------------------------


def test_interrupted_train_exits_130_and_resumes(run, capsys, monkeypatch):
    import minimask.train as train_module
    real = train_module.make_batch

    def interrupting(dataset, step, s, *a, **k):
        if step == 2:
            import os
            import signal
            os.kill(os.getpid(), signal.SIGINT)      # as Ctrl-C would, mid-step
        return real(dataset, step, s, *a, **k)

    monkeypatch.setattr(train_module, "make_batch", interrupting)
    code, _, err = _run(capsys, ["train", "--out", str(run), "--resume", "--iters", "6",
                                 "--no-progress", "--eval-images", "0", "--workers", "1"])
    assert code == 130
    assert "interrupted at step 3 of 6" in err and "--resume" in err, err
    _, meta = load_npz(run / "checkpoint.npz")
    assert meta["step"] == 3


def test_ctrl_c_during_the_final_evaluation_exits_130_without_a_traceback(run, capsys,
                                                                          monkeypatch):
    import minimask.evaluate as evaluate_module

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module, "evaluate", interrupted)
    code, _, err = _run(capsys, ["train", "--out", str(run), "--resume", "--iters", "3",
                                 "--no-progress", "--eval-images", "2", "--workers", "1"])
    assert code == 130
    assert "interrupted" in err and "Traceback" not in err, err
    _, meta = load_npz(run / "checkpoint.npz")
    assert meta["step"] == 3            # the training it finished is saved


def test_disk_full_names_the_file(tmp_path, monkeypatch):
    import errno
    import builtins
    real_open = builtins.open

    def full(path, mode="r", *a, **k):
        if "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", full)
    with pytest.raises(OSError, match=r"metrics.jsonl.*disk is full"):
        runs.append_metrics(tmp_path / "metrics.jsonl", {"step": 1})
