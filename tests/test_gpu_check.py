"""The CPU-only parts of the device check (benchmarks/gpu_check.sh): its
argument and stage logic, and the training-step benchmark's code path on
the cpu backend. The GPU stages themselves run where there is a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)


def test_dry_run_lists_every_stage_within_eight_minutes(tmp_path):
    done = run("--dry-run", OUT=str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    stages = [l.split()[1] for l in lines if l.startswith("stage ")]
    assert stages == ["setup", "env", "tests", "layers", "steps"]
    assert "pytest -q -m cuda" in done.stdout
    assert "bench_layers.py --cuda" in done.stdout
    assert "bench_gpu_step.py --backend cuda" in done.stdout
    assert f"output in {tmp_path}" in done.stdout
    worst = int(lines[-1].split()[-2])
    assert worst <= 480
    assert list(tmp_path.iterdir()) == []      # a dry run writes nothing


def test_only_selects_stages_and_bad_arguments_exit_2(tmp_path):
    done = run("--dry-run", "--only", "tests,steps", OUT=str(tmp_path))
    assert [l.split()[1] for l in done.stdout.splitlines() if l.startswith("stage ")] == \
        ["tests", "steps"]
    bad = run("--only", "tests,gpu")
    assert bad.returncode == 2 and "unknown stage 'gpu'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    bad = run("--fast")
    assert bad.returncode == 2 and "unknown argument '--fast'" in bad.stderr


def test_a_stage_runs_and_is_recorded_with_its_time(tmp_path):
    # the env stage needs no GPU: it reports what is there and succeeds
    done = run("--only", "env", OUT=str(tmp_path))
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["env"]["result"] == "ok" and summary["env"]["limit"] == 20
    assert done.returncode == 0
    log = (tmp_path / "gpu_check.log").read_text()
    assert "numba" in log and "cuda available:" in log


def test_step_benchmark_runs_on_the_cpu_backend(tmp_path):
    out = tmp_path / "step.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu_step.py"),
                           "--backend", "cpu", "--case", "tiny:64:1", "--steps", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    (case,) = record["cases"]
    assert case["case"] == "tiny:64:1" and case["backend"] == "cpu"
    assert case["median_step_s"] > 0 and case["parameters"] > 0
    assert all(v == v and v > 0 for v in case["loss"].values())   # finite, positive


@pytest.mark.parametrize("case, message", [("tiny:64", "preset:image_size:batch"),
                                           ("tiny:x:1", "must be integers"),
                                           ("tiny:16:1", "image_size must be >= 32")])
def test_step_benchmark_refuses_bad_cases(case, message):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu_step.py"),
                           "--case", case], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr
