"""One thread against all of them, per layer and size: where the work-size
rule of ``minimask._threads`` should switch.

    python benchmarks/bench_threads.py              # idle machine
    python benchmarks/bench_threads.py --busy 1     # with one busy process beside it
    python benchmarks/bench_threads.py --quick

For each layer of the ``"cpu"`` backend (forward + backward, float32) and a
sweep of sizes, it times the call with every kernel forced serial (the
rule's thresholds set above any work) and with every kernel forced parallel
on all of Numba's threads (thresholds 0), interleaved, median of ``--reps``;
then what the rule itself picks at that size and how long that takes (the
rule includes the load check, ``minimask._threads.threads_now``; the forced
columns ignore it). The BLAS multiply is swept the same way (one thread
against the multiply split over all, and the rule).

``--busy K`` starts K processes that spin on a core for the whole run (the
case the issue names: another process busy on a 2-core machine).

Prints one row per layer and size, writes ``benchmarks/results/threads.json``
(with the load average before and after) and ``figures/benchmark_threads.png``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _spin(stop):
    x = 0
    while not stop.is_set():
        for _ in range(10000):
            x += 1


def _layer_cases(quick):
    """(layer name, size label, elements of its input, function of rng)."""
    from minimask.layers import (conv2d_backward, conv2d_forward, group_norm_backward,
                                 group_norm_forward, relu_backward, relu_forward,
                                 roi_align_backward, roi_align_forward,
                                 sigmoid_focal_loss_backward, sigmoid_focal_loss_forward,
                                 upsample_nearest2d_backward, upsample_nearest2d_forward)
    sizes = (8, 16, 32, 64) if quick else (8, 16, 32, 64, 128)
    cases = []
    for s in sizes:
        shape = (2, 64, s, s)
        n = int(np.prod(shape))

        def make(shape=shape):
            n = int(np.prod(shape))          # this size's, not the loop's last
            rng = np.random.default_rng(0)
            x = rng.standard_normal(shape).astype(np.float32)
            d = rng.standard_normal(shape).astype(np.float32)
            w = (0.05 * rng.standard_normal((64, 64, 3, 3))).astype(np.float32)
            b = np.zeros(64, np.float32)
            g, beta = np.ones(64, np.float32), np.zeros(64, np.float32)
            up = rng.standard_normal((shape[0], shape[1], 2 * shape[2], 2 * shape[3])
                                     ).astype(np.float32)
            logits = rng.standard_normal((shape[0], n // (shape[0] * 8), 8)).astype(np.float32)
            t = (rng.random(logits.shape) < 0.05).astype(np.float32)
            side = 4.0 * shape[2]
            rois = np.array([[i % 2, 0.1 * side, 0.2 * side, 0.1 * side + side * (0.3 + 0.02 * i),
                              0.2 * side + side * 0.5] for i in range(32)])
            droi = rng.standard_normal((32, 64, 7, 7)).astype(np.float32)

            def fb(fwd, bwd, dout, *args):
                def run():
                    out, cache = fwd(x, *args)
                    bwd(dout, cache)
                return run
            return {
                "relu": fb(relu_forward, relu_backward, d),
                "conv3x3": fb(conv2d_forward, conv2d_backward, d, w, b, 1, 1),
                "group_norm": fb(group_norm_forward, group_norm_backward, d, g, beta, 32),
                "upsample": fb(upsample_nearest2d_forward, upsample_nearest2d_backward, up, 2),
                "roi_align 32": fb(roi_align_forward, roi_align_backward, droi, rois, 7, 0.25, 2),
                "focal_loss": lambda: sigmoid_focal_loss_backward(
                    np.float32(1.0), sigmoid_focal_loss_forward(logits, t)[1]),
            }
        cases.append((f"2x64x{s}x{s}", n, make))
    return cases


def _time(fn, reps):
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, default=0, help="busy processes beside the run")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/threads.json"))
    ap.add_argument("--png", default=str(ROOT / "figures/benchmark_threads.png"))
    args = ap.parse_args(argv)

    import minimask
    minimask.configure_process()
    import numba
    from minimask import _blas, _threads
    threads = numba.get_num_threads()
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True)
                for _ in range(args.busy)]
    for p in spinners:
        p.start()
    load_before = os.getloadavg()
    rows = []
    default = _threads.set_thresholds()
    aware = _threads.set_load_aware(True)       # restored at the end
    try:
        with minimask.using_backend("cpu"):
            for label, n, make in _layer_cases(args.quick):
                for layer, fn in make().items():
                    fn()                                   # compile / warm
                    serial, parallel, rule = [], [], []
                    for _ in range(args.reps):             # interleaved
                        _threads.set_load_aware(False)     # forced: whatever the load
                        _threads.set_thresholds(1 << 62, 1e30)
                        serial += _time(fn, 1)
                        _threads.set_thresholds(0, 0.0)
                        parallel += _time(fn, 1)
                        _threads.set_thresholds(*default)
                        _threads.set_load_aware(aware)     # the rule as it runs
                        rule += _time(fn, 1)
                    row = {"layer": layer, "size": label, "elements": n,
                           "serial_ms": 1e3 * statistics.median(serial),
                           "parallel_ms": 1e3 * statistics.median(parallel),
                           "rule_ms": 1e3 * statistics.median(rule)}
                    rows.append(row)
                    print(f"{layer:14s} {label:14s} {n:9d} el  1 thread {row['serial_ms']:8.3f} ms"
                          f"  {threads} threads {row['parallel_ms']:8.3f} ms"
                          f"  rule {row['rule_ms']:8.3f} ms", flush=True)
            gemm_rows = []
            rng = np.random.default_rng(0)
            for M, K, N in ((16, 144, 128), (64, 576, 128), (64, 576, 512), (64, 576, 2048),
                            (128, 1152, 2048), (256, 2304, 4096)):
                a = rng.standard_normal((M, K)).astype(np.float32)
                b = rng.standard_normal((K, N)).astype(np.float32)
                _blas.gemm(a, b)
                one, many, by_rule = [], [], []
                for _ in range(args.reps):
                    _threads.set_load_aware(False)
                    _threads.set_thresholds(None, 1e30)
                    one += _time(lambda: _blas.gemm(a, b), 1)
                    _threads.set_thresholds(None, 0.0)
                    many += _time(lambda: _blas.gemm(a, b), 1)
                    _threads.set_thresholds(*default)
                    _threads.set_load_aware(aware)
                    by_rule += _time(lambda: _blas.gemm(a, b), 1)
                row = {"M": M, "K": K, "N": N, "flops": 2.0 * M * K * N,
                       "one_ms": 1e3 * statistics.median(one),
                       "all_ms": 1e3 * statistics.median(many),
                       "rule_ms": 1e3 * statistics.median(by_rule),
                       "rule_threads": _threads.gemm_threads(2.0 * M * K * N)}
                gemm_rows.append(row)
                print(f"gemm {M}x{K}x{N:<6d} {row['flops']:10.3g} flop  1 thread "
                      f"{row['one_ms']:8.3f} ms  {threads} threads {row['all_ms']:8.3f} ms"
                      f"  rule {row['rule_ms']:8.3f} ms ({row['rule_threads']} thread(s))", flush=True)
    finally:
        _threads.set_thresholds(*default)
        _threads.set_load_aware(aware)
        stop.set()
        for p in spinners:
            p.join()
    result = {"threads": threads, "busy": args.busy, "load_before": load_before,
              "load_after": os.getloadavg(), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "blas": _blas.info(),
              "kernel_serial_elements": default[0], "gemm_serial_flops": default[1],
              "layers": rows, "gemm": gemm_rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print("load average before / after:", load_before, result["load_after"])
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure")
        return 0
    layers = sorted({r["layer"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for layer in layers:
        rs = [r for r in rows if r["layer"] == layer]
        axes[0].plot([r["elements"] for r in rs], [r["parallel_ms"] / r["serial_ms"] for r in rs],
                     "o-", label=layer)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("elements of the layer's input")
    axes[0].set_ylabel(f"time on {threads} threads / time on 1")
    axes[0].set_title(f"layers, fwd+bwd (busy processes: {args.busy})")
    axes[0].legend(fontsize=7)
    axes[1].plot([r["flops"] for r in gemm_rows], [r["all_ms"] / r["one_ms"] for r in gemm_rows],
                 "o-")
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].axvline(default[1], color="r", ls="--", label="rule: 1 thread below")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("GEMM FLOPs")
    axes[1].set_title("BLAS multiply")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)
    print("wrote", args.json, "and", args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
