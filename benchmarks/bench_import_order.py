"""What an in-process user gets: a tiny training step in a plain script.

    python benchmarks/bench_import_order.py                  # every variant, 2 threads
    python benchmarks/bench_import_order.py --threads 1 --steps 6

Each variant is a fresh ``python -c`` process that imports minimask (after
torch, in the "torch first" variants), loads ``weights/shapes_tiny.npz`` and
times ``model.loss`` on a batch of 4 synthetic 128 px images: the median of
``--steps`` steps after two warm-up steps, in wall-clock seconds and in CPU
seconds of the process (user + system, all threads). The CPU seconds are
what shows spinning: threads that spin burn CPU time while they wait, and
unlike the wall clock that count barely moves with other load on the
machine. Variants differ only in what the
process does before the first kernel runs: import torch first or not,
``NUMBA_THREADING_LAYER`` or ``OMP_WAIT_POLICY`` in the environment, and
whether the script calls ``minimask.configure_process()`` (the CLI's and
training's process settings). The variants that need torch are left out
when it is not installed. The machine's load average is printed with every
row: on a shared machine the numbers move with it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import os, sys, time, json, statistics, resource
if {torch_first}:
    import torch
import numpy as np
import minimask
if {configure}:
    minimask.configure_process()
import numba
from minimask.data.synthetic import ShapesDataset
from minimask.train import load_model
model, _ = load_model(os.path.join({root!r}, "weights", "shapes_tiny.npz"))
data = ShapesDataset(seed=0, num_images=4, size=128)
images = np.stack([data[i][0] for i in range(4)])
targets = [data[i][1] for i in range(4)]
for _ in range(2):
    model.loss(images, targets)
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
times, cpus = [], []
for _ in range({steps}):
    t0, c0 = time.perf_counter(), cpu()
    model.loss(images, targets)
    times.append(time.perf_counter() - t0)
    cpus.append(cpu() - c0)
print(json.dumps({{"median_s": statistics.median(times), "min_s": min(times),
                  "cpu_s": statistics.median(cpus),
                  "layer": numba.threading_layer(), "numba_threads": numba.get_num_threads(),
                  "torch_loaded": "torch" in sys.modules}}))
"""

# (name, import torch first, call configure_process(), extra environment)
VARIANTS = [
    ("plain import", False, False, {}),
    ("plain import + configure_process()", False, True, {}),
    ("torch first", True, False, {}),
    ("torch first + configure_process()", True, True, {}),
    ("plain, OMP_WAIT_POLICY=passive in env", False, False, {"OMP_WAIT_POLICY": "passive"}),
    ("torch first, OMP_WAIT_POLICY=passive in env", True, False, {"OMP_WAIT_POLICY": "passive"}),
    ("plain, NUMBA_THREADING_LAYER=omp", False, False, {"NUMBA_THREADING_LAYER": "omp"}),
    ("torch first, NUMBA_THREADING_LAYER=omp", True, False, {"NUMBA_THREADING_LAYER": "omp"}),
    ("plain, NUMBA_THREADING_LAYER=workqueue", False, False, {"NUMBA_THREADING_LAYER": "workqueue"}),
    ("torch first, NUMBA_THREADING_LAYER=workqueue", True, False,
     {"NUMBA_THREADING_LAYER": "workqueue"}),
]


def run_variant(torch_first, configure, extra_env, threads, steps):
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "NUMBA_THREADING_LAYER", "MINIMASK_MALLOPT")}
    env.update({"NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
                "OPENBLAS_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
    env.update(extra_env)
    code = CHILD.format(torch_first=torch_first, configure=configure, root=str(ROOT), steps=steps)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=900)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--only", nargs="*", help="run only the variants of these exact names")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    have_torch = importlib.util.find_spec("torch") is not None
    rows = []
    print(f"tiny step, batch 4, 128 px, {args.threads} thread(s), median of {args.steps}")
    print(f"{'variant':48s} {'median s':>9s} {'min s':>7s} {'CPU s':>7s} {'layer':>10s} "
          f"{'load before/after':>18s}")
    for name, torch_first, configure, extra in VARIANTS:
        if args.only and name not in args.only:
            continue
        if torch_first and not have_torch:
            continue
        before = os.getloadavg()[0]
        r = run_variant(torch_first, configure, extra, args.threads, args.steps)
        after = os.getloadavg()[0]
        r.update(variant=name, load_before=before, load_after=after, threads=args.threads)
        rows.append(r)
        if "error" in r:
            print(f"{name:48s} error: {r['error']}")
        else:
            print(f"{name:48s} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['cpu_s']:7.3f} {r['layer']:>10s} "
                  f"{before:8.2f} / {after:5.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
