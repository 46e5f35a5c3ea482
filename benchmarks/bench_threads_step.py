"""A whole training step on one thread against two, idle and beside busy
processes: "more threads are never slower than one" (issue 12) for each
preset, not only for each layer (``bench_threads.py``).

    python benchmarks/bench_threads_step.py                       # tiny 128/256, resnet18 256; busy 0 and 1
    python benchmarks/bench_threads_step.py --cases tiny:128 --busy 0 1 2 --steps 7

For each case it builds the network step of ``bench_torch_step.py``
(``minimask_step``: forward, eq. (2), backward; the host-side matching done
once) from the same weights and images, and times it with 1 and with 2 Numba
threads, interleaved (1, 2, 1, 2, ...: a change of the machine's load hits
both), medians of ``--steps`` after two warm-up steps; with ``--busy K``, K
processes spin on a core each for the whole measurement. minimask's own
rule decides everything else (``minimask._threads``: work sizes, the load
check). One process per case: ``minimask.configure_process()`` first, as the
CLI does. torch is not needed.

Prints a table and writes ``benchmarks/results/threads_step.json``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


def _spin(stop):
    x = 0
    while not stop.is_set():
        for _ in range(10000):
            x += 1


def role(preset, size, batch, steps, rounds, busy, out):
    import minimask
    minimask.configure_process()
    import numba
    sys.path.insert(0, str(HERE))
    from bench_torch_step import build_minimask, minimask_step, prepare

    model, images, targets = build_minimask(preset, size, batch, "float32")
    prep = prepare(model, images, targets)
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True)
                for _ in range(busy)]
    for p in spinners:
        p.start()
    times = {1: [], 2: []}
    try:
        for threads in (1, 2):                   # warm-up: both versions of every kernel
            numba.set_num_threads(threads)
            for _ in range(2):
                minimask_step(model, prep)
        time.sleep(0.5)                          # let the spinners' load show
        load = [os.getloadavg()[0]]
        for _ in range(rounds):
            for threads in (1, 2):
                numba.set_num_threads(threads)
                for _ in range(steps):
                    t = time.perf_counter()
                    minimask_step(model, prep)
                    times[threads].append(time.perf_counter() - t)
        load.append(os.getloadavg()[0])
    finally:
        stop.set()
        for p in spinners:
            p.join()
    result = {"preset": preset, "size": size, "batch": batch, "busy": busy,
              "one_ms": 1e3 * statistics.median(times[1]),
              "two_ms": 1e3 * statistics.median(times[2]),
              "one_times_s": times[1], "two_times_s": times[2], "load": load}
    Path(out).write_text(json.dumps(result))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["tiny:128", "tiny:256", "resnet18:256"])
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="steps per thread count and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/threads_step.json"))
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role:
        preset, size, busy = args.role.split(":")
        role(preset, int(size), args.batch, args.steps, args.rounds, int(busy), args.out)
        return 0
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["NUMBA_NUM_THREADS"] = "2"
    rows = []
    print(f"{'case':14s} {'busy':>4s} {'1 thread ms':>12s} {'2 threads ms':>13s} {'2 / 1':>6s}  load")
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            preset, size = case.split(":")
            for busy in args.busy:
                out = Path(tmp) / "row.json"
                subprocess.run([sys.executable, __file__, "--role", f"{preset}:{size}:{busy}",
                                "--batch", str(args.batch), "--steps", str(args.steps),
                                "--rounds", str(args.rounds), "--out", str(out)],
                               env=env, check=True)
                row = json.loads(out.read_text())
                rows.append(row)
                print(f"{case:14s} {busy:4d} {row['one_ms']:12.1f} {row['two_ms']:13.1f} "
                      f"{row['two_ms'] / row['one_ms']:6.2f}  "
                      f"{row['load'][0]:.2f}-{row['load'][1]:.2f}", flush=True)
    from minimask import _blas
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"blas": _blas.info(), "rows": rows}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
