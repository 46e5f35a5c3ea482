"""Generated inputs (Hypothesis) against the command line, in-process:
COCO annotation files and checkpoint metadata, valid and corrupted one
field at a time. ``train`` and ``evaluate`` must either run (exit 0) or
stop with exit 2 and ONE line ``minimask: error: ...`` that names the file
and the field - never a traceback, a crash or a hang. A watchdog
(``faulthandler``) ends the whole process, with every thread's stack, if
one example runs past its time limit (written to ``WATCHDOG_LOG``), since a hang inside a compiled
kernel cannot be interrupted from Python.

The default profile tries a few examples of each (CI); ``HYPOTHESIS_PROFILE
=thorough`` tries many more.
"""
import contextlib
import copy
import faulthandler
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minimask.__main__ import main
from minimask.nn import load_npz, save_npz

# single-process training: the ranks are tests/test_distributed.py's
pytestmark = pytest.mark.usefixtures("one_rank")

SIZE = 64
THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
EXAMPLES = 60 if THOROUGH else 6
TIME_LIMIT_S = 240          # per example, on a busy 2-core machine; a hang is far longer
DELETE, DEEP = "<delete>", "<deep>"


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A valid 2-image COCO dataset (polygons would come from other tools;
    export writes RLE strings, the hardest case for counts)."""
    out = tmp_path_factory.mktemp("coco")
    assert main(["export-shapes", "--seed", "11", "--num-images", "2", "--image-size",
                 str(SIZE), "--out", str(out)]) == 0
    data = json.loads((out / "annotations.json").read_text())
    # one polygon annotation too, with a bbox and an area to corrupt
    data["annotations"].append({"id": 999, "image_id": data["images"][0]["id"],
                                "category_id": data["categories"][0]["id"],
                                "segmentation": [[10, 10, 30, 10, 30, 25, 10, 25]],
                                "bbox": [10, 10, 20, 15], "area": 300.0, "iscrowd": 0})
    return out, data


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("w") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--iters", "1", "--batch-size", "1", "--num-images", "2",
                     "--image-size", str(SIZE), "--eval-images", "0", "--no-progress",
                     "--workers", "1", "--out", str(out)]) == 0
    return out / "checkpoint.npz"


def _paths(value, prefix=()):
    """Every path into a JSON value (dict keys and list indices)."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:8]):
            yield from _paths(v, (*prefix, i))


def _apply(data, path, value):
    data = copy.deepcopy(data)
    if not path:
        return value if value is not DELETE else {}
    target = data
    for key in path[:-1]:
        target = target[key]
    if value == DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


def _dump(data) -> str:
    return json.dumps(data).replace(json.dumps(DEEP), "[" * 50_000 + "]" * 50_000)


HOSTILE = st.one_of(
    st.just(DELETE), st.just(DEEP), st.none(), st.booleans(),
    st.integers(-10, 100), st.sampled_from([-1, 0, 10 ** 6, 10 ** 9, 10 ** 12, 2 ** 63]),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.text(alphabet="0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmno~ é",
            max_size=8),
    st.lists(st.one_of(st.integers(-5, 70), st.floats(-1e12, 1e12)), max_size=8),
    st.dictionaries(st.sampled_from(["size", "counts", "id", "x"]), st.integers(0, 64),
                    max_size=2),
)


# where the watchdog writes every thread's stack before it ends the process
# (pytest captures file descriptor 2, so stderr would lose it)
WATCHDOG_LOG = Path(tempfile.gettempdir()) / "minimask_generated_inputs_watchdog.txt"


def _run(argv):
    """main(argv) -> (exit code, stdout, stderr), under the watchdog."""
    out, err = io.StringIO(), io.StringIO()
    log = open(WATCHDOG_LOG, "w")
    log.write(f"an example ran past {TIME_LIMIT_S} s: {argv}\n")
    log.flush()
    faulthandler.dump_traceback_later(TIME_LIMIT_S, exit=True, file=log)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        faulthandler.cancel_dump_traceback_later()
        log.close()
    return code, out.getvalue(), err.getvalue()


def _check_outcome(code, stderr, file_name, fields, case):
    assert "Traceback" not in stderr, (case, stderr)
    assert code in (0, 2), (case, code, stderr[-2000:])
    if code == 2:
        lines = [l for l in stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[-1].startswith("minimask: error: "), (case, stderr)
        assert file_name in lines[-1], (case, lines[-1])
        assert any(str(f) in lines[-1] for f in fields), (case, fields, lines[-1])


# words an error about a corrupted key may name instead of the key itself
RELATED = {"id": ["id", "image_id", "category_id", "image file"],
           "file_name": ["file_name", "image file"], "images": ["images", "image"],
           "height": ["height", "image file", "size"], "width": ["width", "image file", "size"],
           "counts": ["counts", "segmentation"], "size": ["size", "segmentation"],
           "categories": ["categor"], "annotations": ["annotation"],
           "name": ["name"], "iscrowd": ["iscrowd"]}


@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_generated_coco_files_train_or_exit_2(coco, weights, tmp_path_factory, data):
    src, valid = coco
    paths = list(_paths(valid))
    path = data.draw(st.sampled_from(paths), label="path")
    value = data.draw(HOSTILE, label="value")
    corrupted = data.draw(st.booleans(), label="corrupt") or not path
    work = tmp_path_factory.mktemp("g")
    ann = work / "gen.json"
    ann.write_text(_dump(_apply(valid, path, value) if corrupted else valid))
    command = data.draw(st.sampled_from(["train", "evaluate"]), label="command")
    if command == "train":
        argv = ["train", "--dataset", str(ann), "--images", str(src / "images"), "--iters", "1",
                "--batch-size", "1", "--image-size", str(SIZE), "--eval-images", "0",
                "--no-progress", "--workers", "1", "--out", str(work / "run")]
    else:
        argv = ["evaluate", "--weights", str(weights),
                "--dataset", str(ann), "--images", str(src / "images"), "--no-progress",
                "--out", str(work / "eval")]
    code, _, err = _run(argv)
    keys = [k for k in path if isinstance(k, str)] or ["images", "annotations", "categories",
                                                       "object"]
    fields = [w for k in keys for w in RELATED.get(k, [k])]
    if value in (DEEP,):
        fields.append("nests too deeply")
    if isinstance(value, int) and not isinstance(value, bool) and "id" in keys:
        fields.append(str(value))
    if not corrupted:
        assert code == 0, err
    _check_outcome(code, err, "gen.json", fields + ["number of classes", "classes"],
                   (path, value, command))
    shutil.rmtree(work, ignore_errors=True)


META_PATHS = [("config", None), ("image_size",), ("class_names",), ("step",), ("running",),
              ("settings",), ("settings", "lr"), ("settings", "batch_size"),
              ("settings", "seed"), ("dataset",), ("running", "cls")]


@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_generated_checkpoint_metadata_runs_or_exits_2(weights, tmp_path_factory, data):
    arrays, meta = load_npz(weights)
    where = data.draw(st.sampled_from(META_PATHS), label="where")
    if where[0] == "config" and where[1] is None:
        where = ("config", data.draw(st.sampled_from(sorted(meta["config"])), label="field"))
    value = data.draw(HOSTILE.filter(lambda v: v != DEEP), label="value")
    changed = _apply(meta, where, value)
    work = tmp_path_factory.mktemp("m")
    run = work / "run"
    run.mkdir()
    save_npz(run / "checkpoint.npz", arrays, changed)
    command = data.draw(st.sampled_from(["evaluate", "resume"]), label="command")
    if command == "evaluate":
        argv = ["evaluate", "--weights", str(run / "checkpoint.npz"), "--num-images", "1",
                "--no-progress", "--out", str(work / "eval")]
    else:
        argv = ["train", "--resume", "--out", str(run), "--iters", "2", "--eval-images", "0",
                "--no-progress", "--workers", "1"]
    code, _, err = _run(argv)
    fields = [str(w) for w in where if w is not None] + ["metadata", "config"]
    _check_outcome(code, err, "checkpoint.npz", fields, (where, value, command))
    shutil.rmtree(work, ignore_errors=True)
