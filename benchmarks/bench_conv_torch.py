"""The largest conv of RetinaMask against PyTorch: 3x3, 256 -> 256 channels,
64 x 64 (P3 of a 512 px image), batch 1, float32, forward + backward.

    python benchmarks/bench_conv_torch.py                  # 1 and 2 threads, 5 rounds
    python benchmarks/bench_conv_torch.py --threads 1 --rounds 3
    env -u OPENBLAS_CORETYPE python benchmarks/bench_conv_torch.py

Each side runs in its own process (minimask's never imports torch, torch's
never imports minimask), with ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS``
/ ``NUMBA_NUM_THREADS`` / ``MKL_NUM_THREADS`` and the libraries' own thread
settings at the thread count; minimask's process calls
``minimask.configure_process()`` as the CLI does. Rounds alternate the two
sides (minimask, torch, minimask, ...) so that a change in the machine's
load hits both. Every process times ``--steps`` calls after one warm-up and
reports medians of the wall-clock time and of the process's CPU time; with
one thread the CPU time is what the call costs on a core of its own, even
on a loaded machine. Before timing, the two sides' outputs and gradients are
compared (same inputs, float64: relative difference below 1e-10).

OpenBLAS (minimask's GEMM) chooses its kernels from ``OPENBLAS_CORETYPE``
when that is set, and from the CPU otherwise; the line ``blas`` says which
ran. Prints a table and writes ``benchmarks/results/conv_torch.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")
SHAPE = dict(N=1, C=256, H=64, W=64, F=256)


def _inputs(dtype):
    import numpy as np
    rng = np.random.default_rng(0)
    s = SHAPE
    x = rng.standard_normal((s["N"], s["C"], s["H"], s["W"])).astype(dtype)
    w = (0.02 * rng.standard_normal((s["F"], s["C"], 3, 3))).astype(dtype)
    b = (0.1 * rng.standard_normal(s["F"])).astype(dtype)
    d = rng.standard_normal((s["N"], s["F"], s["H"], s["W"])).astype(dtype)
    return x, w, b, d


def _minimask_fn(dtype):
    import minimask
    minimask.configure_process()
    from minimask.layers import conv2d_backward, conv2d_forward
    x, w, b, d = _inputs(dtype)

    def step():
        out, cache = conv2d_forward(x, w, b, 1, 1)
        return (out, *conv2d_backward(d, cache))
    return step


def _torch_fn(dtype, threads):
    import torch
    if threads:
        torch.set_num_threads(threads)
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    x, w, b, d = (torch.from_numpy(a) for a in _inputs(dtype))
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    d = d.to(tdtype)

    def step():
        x.grad = w.grad = b.grad = None
        out = torch.nn.functional.conv2d(x, w, b, padding=1)
        out.backward(d)
        return tuple(t.detach().numpy() for t in (out, x.grad, w.grad, b.grad))
    return step


def role(side, threads, steps, out_path):
    if side == "minimask":
        import minimask
        # before Numba's threads start: set_num_threads launches them, and
        # an OpenMP pool launched before configure_process() spins between
        # kernels (it took the second core from the multiply: 2 threads
        # measured 27-43 ms a call instead of 22)
        minimask.configure_process()
        import numba
        if threads:
            numba.set_num_threads(threads)
        step = _minimask_fn("float32")
        from minimask import _blas
        info = _blas.info()
    else:
        step = _torch_fn("float32", threads)
        import torch
        info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    step()
    wall, cpu = [], []
    step()                       # a second warm-up: new workspaces fault their pages in
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    Path(out_path).write_text(json.dumps({"wall_ms": 1e3 * statistics.median(wall),
                                          "cpu_ms": 1e3 * statistics.median(cpu),
                                          "info": info}))


def verify(out_path):
    """float64 outputs and gradients of both sides (the torch side here,
    minimask's in a child), largest relative difference."""
    import numpy as np
    ours = Path(out_path).with_suffix(".minimask.npz")
    env = _env(None)
    subprocess.run([sys.executable, __file__, "--role", "verify-minimask", "--out", str(ours)],
                   env=env, check=True)
    mine = np.load(ours)
    theirs = _torch_fn("float64", None)()
    worst = 0.0
    for name, t in zip(("out", "dx", "dw", "db"), theirs):
        m = mine[name]
        worst = max(worst, float(np.abs(m - t).max() / np.abs(t).max()))
    os.unlink(ours)
    return worst


def _env(threads):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if threads:
        env.update({k: str(threads) for k in THREAD_VARS})
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/conv_torch.json"))
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "verify-minimask":
        import numpy as np
        out, dx, dw, db = _minimask_fn("float64")()
        np.savez(args.out, out=out, dx=dx, dw=dw, db=db)
        return 0
    if args.role:
        side, threads = args.role.split(":")
        role(side, int(threads), args.steps, args.out)
        return 0
    try:
        import torch  # noqa: F401
    except ImportError:
        print("bench_conv_torch: needs torch in this Python (a benchmark-only dependency)",
              file=sys.stderr)
        return 2
    worst = verify(args.json)
    print(f"verification (float64): largest relative difference {worst:.2e}")
    if worst > 1e-10:
        print("bench_conv_torch: the two sides disagree; nothing timed", file=sys.stderr)
        return 1
    import tempfile
    results = {"verification": worst, "coretype_env": os.environ.get("OPENBLAS_CORETYPE"),
               "shape": SHAPE, "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            runs = {"minimask": [], "torch": []}
            loads = [os.getloadavg()[0]]
            for r in range(args.rounds):
                for side in ("minimask", "torch"):
                    path = Path(tmp) / f"{side}.json"
                    subprocess.run([sys.executable, __file__, "--role", f"{side}:{threads}",
                                    "--steps", str(args.steps), "--out", str(path)],
                                   env=_env(threads), check=True)
                    runs[side].append(json.loads(path.read_text()))
                loads.append(os.getloadavg()[0])
            case = {"threads": threads, "load": loads,
                    "blas": runs["minimask"][0]["info"]}
            for side in runs:
                case[side] = {k: statistics.median(r[k] for r in runs[side])
                              for k in ("wall_ms", "cpu_ms")}
            case["ratio_wall"] = case["minimask"]["wall_ms"] / case["torch"]["wall_ms"]
            case["ratio_cpu"] = case["minimask"]["cpu_ms"] / case["torch"]["cpu_ms"]
            results["cases"].append(case)
            print(f"{threads} thread(s): minimask {case['minimask']['wall_ms']:.1f} ms wall, "
                  f"{case['minimask']['cpu_ms']:.1f} ms CPU | torch "
                  f"{case['torch']['wall_ms']:.1f} ms wall, {case['torch']['cpu_ms']:.1f} ms CPU"
                  f" | ratio wall {case['ratio_wall']:.2f}, CPU {case['ratio_cpu']:.2f}"
                  f" | load {min(loads):.1f}-{max(loads):.1f} | blas "
                  f"{case['blas'].get('coretype')}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    print("wrote", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
