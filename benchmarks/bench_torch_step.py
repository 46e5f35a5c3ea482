"""A training step of minimask against the same network in PyTorch.

    python benchmarks/bench_torch_step.py                 # verify, then time every case
    python benchmarks/bench_torch_step.py --cases tiny:128 --steps 8
    python benchmarks/bench_torch_step.py --verify-only

Needs torch and torchvision in the Python that runs it (a benchmark-only
dependency: minimask itself never imports torch). The twin is
``benchmarks/torch_twin.py``: the same layers, minimask's exact weights.

What is compared. Both sides get the same images and the same host-side
targets, computed once by minimask (``prepare``): the anchors' matching
(focal-loss targets and ignore weights, positive anchors, box targets), the
mask RoIs (ground truth plus detections matched at ``mask_roi_iou``), their
FPN levels (eq. (1)) and their mask targets. A step is then the network
only: forward, eq. (2) and backward, leaving every parameter's gradient -
``minimask_step`` on minimask's side (the body of ``RetinaMask.loss`` without
the host-side part), ``RetinaMaskTwin.loss`` + ``backward()`` on torch's. The
minimask column "model.loss" times the whole public call, matching included.

1. Verification, in float64, in one process: the three losses and every
   parameter's gradient of the twin against ``model.loss`` itself (which
   fills each ``Parameter.grad``), and ``minimask_step`` against
   ``model.loss``. The relative error of a gradient is
   ``||g_twin - g_minimask|| / ||g_minimask||`` per parameter; the check
   passes when the largest over the losses and the parameters is below
   ``--tolerance`` (1e-10). If it fails, nothing is timed (exit status 1).
2. Timing, in float32: each library in its own process (minimask's process
   never imports torch, torch's never imports minimask), with 1 and 2
   threads (``numba.set_num_threads`` / ``torch.set_num_threads`` and
   ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``,
   ``NUMBA_NUM_THREADS`` in the environment); each side keeps its own OpenMP
   wait policy (minimask's process calls ``minimask.configure_process()``,
   as the CLI does; torch's keeps the OpenMP runtime's default). Median of
   ``--steps`` steps after ``--warmup`` steps, in wall-clock seconds and in
   CPU seconds of the process (with one thread, the CPU seconds are what a
   step costs on an idle core even when the machine is loaded).

Cases: the tiny preset from the shipped ``weights/shapes_tiny.npz`` (or
``--tiny-weights``: another checkpoint, or ``preset`` for the tiny preset's
seed-0 initialisation) at 128 and 256 px, and the resnet18 preset (seed-0
initialisation: no weights are shipped for it) at 256 px; batch 4 of
synthetic shapes (seed 0). The tiny cases take their config (P2 or not,
the anchor ratios) from the checkpoint, and so does the twin. The
machine's load average is recorded before and after every measurement: on a
shared machine, timings move with it.

Writes ``benchmarks/results/torch_step.json`` and, when matplotlib is
installed, ``figures/benchmark_torch_step.png`` (or later:
``--plot benchmarks/results/torch_step.json`` with a Python that has it).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")
DEFAULT_CASES = ("tiny:128", "tiny:256", "resnet18:256")
TINY_WEIGHTS = str(ROOT / "weights" / "shapes_tiny.npz")


def parse_case(text):
    preset, _, size = text.partition(":")
    if preset not in ("tiny", "resnet18", "resnet50") or not size.isdigit() or int(size) < 32:
        raise argparse.ArgumentTypeError(f"a case is PRESET:SIZE with PRESET tiny, resnet18 or "
                                         f"resnet50 and SIZE >= 32, got {text!r}")
    return preset, int(size)


# ----------------------------------------------------------------------
# minimask's side (imports minimask, never torch)
# ----------------------------------------------------------------------

def build_minimask(preset, size, batch, dtype, tiny_weights=None):
    """(model, images, targets): the tiny preset from ``tiny_weights`` (a
    checkpoint, its own config included; default the shipped weights;
    ``"preset"``: the preset's seed-0 initialisation), other presets from
    their seed-0 initialisation; synthetic shapes."""
    import numpy as np

    from minimask.data.synthetic import ShapesDataset
    from minimask.model import Config, RetinaMask
    from minimask.nn import load_npz

    data = ShapesDataset(seed=0, num_images=batch, size=size)
    images = np.stack([data[i][0] for i in range(batch)]).astype(dtype)
    targets = [data[i][1] for i in range(batch)]
    tiny_weights = TINY_WEIGHTS if tiny_weights is None else tiny_weights
    if preset == "tiny" and tiny_weights != "preset":
        arrays, meta = load_npz(tiny_weights)
        config = Config.from_dict({**meta["config"], "dtype": np.dtype(dtype).name})
        model = RetinaMask(config)
        model.load_state_dict({k: v for k, v in arrays.items() if not k.startswith("optimizer.")})
    else:
        model = RetinaMask(Config.preset(preset, num_classes=data.num_classes,
                                         dtype=np.dtype(dtype).name))
    if model.config.self_adjusting_beta:
        raise ValueError("the benchmark needs a fixed box_beta (self_adjusting_beta=False)")
    return model, images, targets


def prepare(model, images, targets) -> dict:
    """The host-side part of ``RetinaMask.loss``, done once: what both
    networks are handed. Mirrors the loss's code (verification checks that
    the result is the same)."""
    import numpy as np

    from minimask.model.retinamask import IGNORED, encode_boxes, match_anchors

    c = model.config
    images = model._check_images(images)
    targets = model._check_targets(targets, images)
    N, _, H, W = images.shape
    images = model.normalize_images(images)     # what the network sees (both sides)
    P, logits, deltas, _ = model._forward_dense(images)
    anchors_per_level = model._anchors(P, (H, W))
    anchors = np.concatenate(anchors_per_level)
    cls_targets = np.zeros_like(logits)
    weights = np.ones_like(logits)
    positive = np.zeros(logits.shape[:2], dtype=bool)
    box_targets = np.zeros_like(deltas)
    for n, t in enumerate(targets):
        matches = match_anchors(anchors, t["boxes"], c.pos_iou, c.neg_iou, c.low_quality_matches,
                                low_quality_iou=c.low_quality_iou)
        pos = matches >= 0
        positive[n] = pos
        cls_targets[n, pos, t["labels"][matches[pos]]] = 1
        weights[n, matches == IGNORED] = 0
        if pos.any():
            box_targets[n, pos] = encode_boxes(t["boxes"][matches[pos]], anchors[pos],
                                               c.box_weights)
    mask_batch = model._mask_rois(logits, deltas, anchors_per_level, targets, H, W)
    m = c.mask_size
    if mask_batch is None:
        rois, roi_labels, mtargets = (np.zeros((0, 5), model.dtype), np.zeros(0, np.int64),
                                      np.zeros((0, m, m), model.dtype))
    else:
        rois, roi_labels, mtargets = mask_batch
    return {"images": images, "cls_targets": cls_targets, "weights": weights,
            "positive": positive, "box_targets": box_targets,
            "num_pos": np.array(max(1, int(positive.sum()))), "beta": np.array(c.box_beta),
            "rois": rois, "roi_labels": roi_labels.astype(np.int64),
            "roi_levels": model.pooler.levels_of(rois[:, 1:]).astype(np.int64),
            "mask_targets": mtargets}


def minimask_step(model, prep) -> dict:
    """Forward, eq. (2) and backward of the network, from ``prepare``'s
    targets: ``RetinaMask.loss`` without its host-side part."""
    import numpy as np

    from minimask.layers import (mask_bce_backward, mask_bce_forward, sigmoid_focal_loss_backward,
                                 sigmoid_focal_loss_forward, smooth_l1_backward, smooth_l1_forward)

    c = model.config
    dt = model.dtype
    model.zero_grad()
    P, logits, deltas, dense_cache = model._forward_dense(prep["images"])
    num_pos = int(prep["num_pos"])
    l_cls, focal_cache = sigmoid_focal_loss_forward(
        logits, prep["cls_targets"], alpha=c.focal_alpha, gamma=c.focal_gamma,
        weights=prep["weights"], reduction="sum")
    l_cls = float(l_cls) / num_pos
    positive = prep["positive"]
    ddeltas = np.zeros_like(deltas)
    l_box = 0.0
    if positive.any():
        l_box, box_cache = smooth_l1_forward(deltas[positive], prep["box_targets"][positive],
                                             beta=float(prep["beta"]), reduction="sum")
        l_box = float(l_box) / num_pos
        ddeltas[positive] = smooth_l1_backward(np.asarray(1.0 / num_pos, dt), box_cache)
    l_mask, dP_mask = 0.0, None
    if len(prep["rois"]):
        # P2..P7 when the config builds P2 for the masks, else P3..P7
        feats, pool_cache = model.pooler.forward(model._mask_levels(P, dense_cache),
                                                 prep["rois"])
        mask_logits, head_cache = model.mask_head.forward(feats)
        l_mask, bce_cache = mask_bce_forward(mask_logits, prep["roi_labels"], prep["mask_targets"])
        l_mask = float(l_mask)
        dmask = mask_bce_backward(np.asarray(c.mask_loss_weight, dt), bce_cache)
        dP_mask = model.pooler.backward(model.mask_head.backward(dmask, head_cache), pool_cache)
    dlogits = sigmoid_focal_loss_backward(np.asarray(1.0 / num_pos, dt), focal_cache)
    model._backward_dense(np.asarray(dlogits), ddeltas, dP_mask, dense_cache)
    return {"cls": l_cls, "box": l_box, "mask": l_mask,
            "total": l_cls + l_box + c.mask_loss_weight * l_mask}


def _rel(a, b):
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.linalg.norm(b)
    num = np.linalg.norm(a - b)
    return float(num / den) if den > 0 else (0.0 if num == 0 else float("inf"))


# ----------------------------------------------------------------------
# roles: each runs in its own process
# ----------------------------------------------------------------------

def role_verify(cases, batch, tolerance, tiny_weights=None):
    """float64: twin vs model.loss, and minimask_step vs model.loss."""
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    from torch_twin import RetinaMaskTwin, as_tensors, load_minimask_state

    rows = []
    for preset, size in cases:
        model, images, targets = build_minimask(preset, size, batch, np.float64, tiny_weights)
        prep = prepare(model, images, targets)
        ref = model.loss(images, targets)
        ref_grads = {k: p.grad.copy() for k, p in model.named_parameters()}
        mine = minimask_step(model, prep)
        step_err = max([_rel(mine[k], ref[k]) for k in ("cls", "box", "mask")] +
                       [_rel(p.grad, ref_grads[k]) for k, p in model.named_parameters()])
        twin = RetinaMaskTwin(model.config.to_dict()).double()
        load_minimask_state(twin, model.state_dict(), torch.float64)
        t = as_tensors(prep, torch.float64)
        total, l_cls, l_box, l_mask = twin.loss(torch.from_numpy(prep["images"]), t)
        total.backward()
        loss_err = {k: _rel(float(v), ref[k]) for k, v in
                    (("cls", l_cls), ("box", l_box), ("mask", l_mask), ("total", total))}
        twin_grads = dict(twin.named_parameters())
        grad_err = {k: _rel(twin_grads[k].grad.numpy(), g) for k, g in ref_grads.items()}
        worst = max(grad_err, key=grad_err.get)
        err = max(max(loss_err.values()), max(grad_err.values()))
        ok = err < tolerance and step_err < tolerance
        rows.append({"preset": preset, "size": size, "batch": batch, "dtype": "float64",
                     "losses": {k: ref[k] for k in ("cls", "box", "mask", "total")},
                     "num_pos": ref["num_pos"], "num_mask_rois": ref["num_mask_rois"],
                     "mask_levels": [model.config.roi_min_level, model.config.roi_max_level],
                     "anchors_per_position": model.config.num_anchors,
                     "mask_rois_per_level": {f"P{k}": int(n) for k, n in
                                             zip(*np.unique(prep["roi_levels"], return_counts=True))},
                     "loss_rel_err": loss_err, "max_grad_rel_err": grad_err[worst],
                     "worst_param": worst, "num_params": len(grad_err),
                     "minimask_step_vs_loss_rel_err": step_err, "tolerance": tolerance,
                     "passed": bool(ok)})
    return rows


def role_prepare(preset, size, batch, out, tiny_weights=None):
    import numpy as np
    model, images, targets = build_minimask(preset, size, batch, np.float32, tiny_weights)
    prep = prepare(model, images, targets)
    arrays = {f"prep.{k}": v for k, v in prep.items()}
    arrays.update({f"param.{k}": v for k, v in model.state_dict().items()})
    arrays["config"] = np.frombuffer(model.config.to_json().encode(), dtype=np.uint8)
    np.savez(out, **arrays)


def _load_case(path):
    import numpy as np
    with np.load(path, allow_pickle=False) as d:
        prep = {k[5:]: d[k] for k in d.files if k.startswith("prep.")}
        state = {k[6:]: d[k] for k in d.files if k.startswith("param.")}
        config = json.loads(d["config"].tobytes().decode())
    return prep, state, config


def _cpu_seconds():
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _time(fn, warmup, steps):
    """Wall-clock and CPU seconds (user + system, all threads of the
    process) of each step. On a loaded machine the wall clock of a step
    grows with the load; its CPU seconds barely do - with one thread they
    are what the step costs on an idle core, and with more they show time
    burnt spinning."""
    for _ in range(warmup):
        fn()
    times, cpus = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), _cpu_seconds()
        fn()
        times.append(time.perf_counter() - t0)
        cpus.append(_cpu_seconds() - c0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
            "cpu_median_s": statistics.median(cpus)}


def role_time_minimask(path, threads, warmup, steps, batch_targets, tiny_weights=None):
    import minimask
    minimask.configure_process()          # what the CLI and training do
    import numba
    numba.set_num_threads(threads)
    from minimask.model import Config, RetinaMask
    prep, state, config = _load_case(path)
    model = RetinaMask(Config.from_dict(config))
    model.load_state_dict(state)
    out = _time(lambda: minimask_step(model, prep), warmup, steps)
    out["layer"] = numba.threading_layer()
    if batch_targets:       # the whole public call, matching and mask RoIs included
        preset, size, batch = batch_targets
        _, images, targets = build_minimask(preset, size, batch, "float32", tiny_weights)
        full = _time(lambda: model.loss(images, targets), 1, 3)
        out["model_loss_median_s"] = full["median_s"]
    out["torch_loaded"] = "torch" in sys.modules
    return out


def role_time_torch(path, threads, warmup, steps):
    import torch
    torch.set_num_threads(threads)
    sys.path.insert(0, str(HERE))
    from torch_twin import RetinaMaskTwin, as_tensors, load_minimask_state
    prep, state, config = _load_case(path)
    twin = RetinaMaskTwin(config)
    load_minimask_state(twin, state, torch.float32)
    t = as_tensors(prep, torch.float32)
    images = torch.from_numpy(prep["images"])

    def step():
        twin.zero_grad(set_to_none=True)
        total = twin.loss(images, t)[0]
        total.backward()

    out = _time(step, warmup, steps)
    out["torch_threads"] = torch.get_num_threads()
    out["minimask_loaded"] = "minimask" in sys.modules
    return out


# ----------------------------------------------------------------------
# the orchestrating process
# ----------------------------------------------------------------------

def _child(args, threads=None, timeout=3600):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if threads is not None:
        env.update({k: str(threads) for k in THREAD_VARS})
    out = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"bench_torch_step: the child {' '.join(args[:2])} failed "
                         f"(exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(results, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = results["timing"]
    labels = [f"{r['preset']} {r['size']}\n{r['threads']} thr." for r in rows]
    x = list(range(len(rows)))
    panels = [("minimask_s", "torch_s", "ratio", "wall clock")]
    if all("minimask_cpu_s" in r for r in rows):
        panels.append(("minimask_cpu_s", "torch_cpu_s", "cpu_ratio", "CPU time"))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6, 1.2 * len(rows)) * len(panels) / 1.3, 4.2),
                             squeeze=False)
    for ax, (km, kt, kr, ylabel) in zip(axes[0], panels):
        ratios = [r[kr] for r in rows]
        colours = ["tab:green" if q <= 1.0 else "tab:red" for q in ratios]
        ax.bar(x, ratios, 0.6, color=colours)
        ax.axhline(1.0, color="k", lw=1, ls="--")
        for i, r in zip(x, rows):
            ax.text(i, ratios[i] + 0.02 * max(ratios), f"{r[km] * 1e3:.0f} /\n{r[kt] * 1e3:.0f} ms",
                    ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel(f"minimask / torch, {ylabel}")
        ax.set_ylim(0, max(ratios) * 1.25)
        ax.grid(axis="y", alpha=0.3)
    load = results["load_before"][0], results["load_after"][0]
    fig.suptitle(f"network step (forward + eq. (2) + backward), float32, batch {results['batch']}, "
                 f"medians (labels: minimask / torch); load average {load[0]:.1f} -> {load[1]:.1f}",
                 fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def orchestrate(args):
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
        print("bench_torch_step: torch and torchvision are not installed in this Python "
              f"({sys.executable}); they are needed only for this benchmark - run it with a "
              "Python that has them (pip install torch torchvision)", file=sys.stderr)
        return 2
    cases = args.cases
    if args.tiny_weights != "preset" and not os.path.isfile(args.tiny_weights):
        print(f"bench_torch_step: --tiny-weights must be a checkpoint file or 'preset', got "
              f"{args.tiny_weights!r} (no such file)", file=sys.stderr)
        return 2
    print(f"verifying in float64 (tolerance {args.tolerance:g}) ...", flush=True)
    verify = _child(["--role", "verify", "--batch", str(args.batch), "--tolerance",
                     str(args.tolerance), "--tiny-weights", args.tiny_weights,
                     "--cases", *[f"{p}:{s}" for p, s in cases]],
                    threads=args.threads[-1])
    for v in verify:
        e = v["loss_rel_err"]
        print(f"  {v['preset']:9s} {v['size']:4d} px (mask RoIs from P{v['mask_levels'][0]}.."
              f"P{v['mask_levels'][1]}, {v['anchors_per_position']} anchors per position): "
              f"losses cls {v['losses']['cls']:.6f} "
              f"box {v['losses']['box']:.6f} mask {v['losses']['mask']:.6f} "
              f"({v['num_pos']} positives, {v['num_mask_rois']} mask RoIs: "
              f"{', '.join(f'{k} {n}' for k, n in v['mask_rois_per_level'].items())}); rel. err. "
              f"cls {e['cls']:.1e} box {e['box']:.1e} mask {e['mask']:.1e}; gradients of "
              f"{v['num_params']} parameters: max {v['max_grad_rel_err']:.1e} ({v['worst_param']}); "
              f"minimask_step vs model.loss {v['minimask_step_vs_loss_rel_err']:.1e}  "
              f"{'PASS' if v['passed'] else 'FAIL'}", flush=True)
    results = {"batch": args.batch, "steps": args.steps, "warmup": args.warmup,
               "tiny_weights": args.tiny_weights,
               "python": sys.version.split()[0], "verification": verify, "timing": []}
    if not all(v["passed"] for v in verify):
        print("bench_torch_step: verification FAILED: the twin does not compute what minimask "
              "computes, so nothing is timed", file=sys.stderr)
        return 1
    if args.verify_only:
        return 0
    results["load_before"] = os.getloadavg()
    print(f"timing float32, batch {args.batch}, median of {args.steps} steps "
          f"(load average before: {results['load_before'][0]:.2f})", flush=True)
    print(f"{'case':14s} {'threads':>7s} {'minimask ms':>12s} {'torch ms':>9s} {'ratio':>6s} "
          f"{'CPU ms: minimask':>17s} {'torch':>7s} {'ratio':>6s} {'model.loss ms':>14s} "
          f"{'load':>11s}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for preset, size in cases:
            path = os.path.join(tmp, f"{preset}_{size}.npz")
            subprocess.run([sys.executable, __file__, "--role", "prepare", "--cases",
                            f"{preset}:{size}", "--batch", str(args.batch), "--out", path,
                            "--tiny-weights", args.tiny_weights],
                           env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep +
                                os.environ.get("PYTHONPATH", "")}, check=True)
            for threads in args.threads:
                before = os.getloadavg()[0]
                common = ["--case-file", path, "--warmup", str(args.warmup), "--steps",
                          str(args.steps), "--cases", f"{preset}:{size}", "--batch", str(args.batch),
                          "--tiny-weights", args.tiny_weights]
                mm = _child(["--role", "time-minimask", *common], threads=threads)
                tt = _child(["--role", "time-torch", *common], threads=threads)
                after = os.getloadavg()[0]
                row = {"preset": preset, "size": size, "threads": threads,
                       "minimask_s": mm["median_s"], "torch_s": tt["median_s"],
                       "ratio": mm["median_s"] / tt["median_s"],
                       "minimask_min_s": mm["min_s"], "torch_min_s": tt["min_s"],
                       "minimask_cpu_s": mm["cpu_median_s"], "torch_cpu_s": tt["cpu_median_s"],
                       "cpu_ratio": mm["cpu_median_s"] / tt["cpu_median_s"],
                       "minimask_model_loss_s": mm.get("model_loss_median_s"),
                       "numba_threading_layer": mm["layer"], "load_before": before,
                       "load_after": after, "minimask_times_s": mm["times_s"],
                       "torch_times_s": tt["times_s"]}
                results["timing"].append(row)
                print(f"{preset + ' ' + str(size):14s} {threads:7d} {row['minimask_s'] * 1e3:12.1f} "
                      f"{row['torch_s'] * 1e3:9.1f} {row['ratio']:6.2f} "
                      f"{row['minimask_cpu_s'] * 1e3:17.1f} {row['torch_cpu_s'] * 1e3:7.1f} "
                      f"{row['cpu_ratio']:6.2f} "
                      f"{(row['minimask_model_loss_s'] or 0) * 1e3:14.1f} "
                      f"{before:5.2f}/{after:5.2f}", flush=True)
    results["load_after"] = os.getloadavg()
    print(f"load average after: {results['load_after'][0]:.2f} (1 min), "
          f"{results['load_after'][1]:.2f} (5 min)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    if importlib.util.find_spec("matplotlib") is not None:
        plot(results, Path(args.png))
        print(f"wrote {args.png}")
    else:
        print(f"matplotlib is not installed here: make the figure with "
              f"`python {Path(__file__).name} --plot {out}` in a Python that has it")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=parse_case, nargs="+",
                   default=[parse_case(c) for c in DEFAULT_CASES], help="PRESET:SIZE ...")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=1e-10)
    p.add_argument("--verify-only", action="store_true")
    p.add_argument("--tiny-weights", default=TINY_WEIGHTS, metavar="NPZ|preset",
                   help="the tiny cases' checkpoint (its config included; default the shipped "
                        "weights), or 'preset' for the tiny preset's seed-0 initialisation")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "torch_step.json"))
    p.add_argument("--png", default=str(ROOT / "figures" / "benchmark_torch_step.png"))
    p.add_argument("--plot", metavar="JSON", help="only draw the figure from a results file")
    p.add_argument("--role", choices=("verify", "prepare", "time-minimask", "time-torch"),
                   help=argparse.SUPPRESS)
    p.add_argument("--case-file", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.png))
        print(f"wrote {args.png}")
        return 0
    if args.role is None:
        return orchestrate(args)
    threads = int(os.environ.get("NUMBA_NUM_THREADS", "0")) or os.cpu_count()
    if args.role == "verify":
        result = role_verify(args.cases, args.batch, args.tolerance, args.tiny_weights)
    elif args.role == "prepare":
        preset, size = args.cases[0]
        role_prepare(preset, size, args.batch, args.out, args.tiny_weights)
        return 0
    elif args.role == "time-minimask":
        preset, size = args.cases[0]
        result = role_time_minimask(args.case_file, threads, args.warmup, args.steps,
                                    (preset, size, args.batch), args.tiny_weights)
    else:
        result = role_time_torch(args.case_file, threads, args.warmup, args.steps)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
