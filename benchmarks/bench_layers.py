"""Time forward+backward of each layer at RetinaMask's real shapes.

    python benchmarks/bench_layers.py            # numpy vs cpu (vs torch if installed)
    python benchmarks/bench_layers.py --quick    # smaller shapes, fewer repeats
    python benchmarks/bench_layers.py --cuda     # also cuda vs torch CUDA, on a GPU

Prints a table of median times and ratios, writes it as JSON to
``benchmarks/results/`` and plots it, with how RoIAlign's cost grows with the
number of RoIs and a conv's with the image size, into ``figures/``.

torch / torchvision are optional here (never needed to run or test
minimask); where they are missing the table says so and compares ``cpu``
with the NumPy reference only. Every backend runs on the same thread count:
Numba's (``NUMBA_NUM_THREADS``) and torch's are set to the same number.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import minimask  # noqa: E402
from minimask import layers as L  # noqa: E402

try:
    import torch
    import torchvision
except ImportError:
    torch = torchvision = None


def median_time(fn, repeats, warmup=1, sync=None):
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------
# The cases: each builds float32 inputs and returns closures per backend.
# ---------------------------------------------------------------------------

def random_rois(rng, n, image_size, batch=1):
    """Boxes of varied size and aspect inside an image_size x image_size image."""
    cx, cy = rng.uniform(0, image_size, (2, n))
    w, h = np.exp(rng.uniform(np.log(16), np.log(image_size / 2), (2, n)))
    x1, y1 = np.clip(cx - w / 2, 0, image_size - 1), np.clip(cy - h / 2, 0, image_size - 1)
    x2, y2 = np.clip(cx + w / 2, x1 + 1, image_size), np.clip(cy + h / 2, y1 + 1, image_size)
    idx = rng.integers(0, batch, n)
    return np.stack([idx, x1, y1, x2, y2], 1).astype(np.float32)


def minimask_fn(fwd, bwd, args, kwargs):
    def run():
        out, cache = fwd(*args, **kwargs)
        bwd(np.ones_like(out) if np.ndim(out) else np.float32(1), cache)
    return run


def case_conv(rng, size, channels=256):
    x = rng.standard_normal((1, channels, size, size), dtype=np.float32)
    w = rng.standard_normal((channels, channels, 3, 3), dtype=np.float32) * 0.02
    b = np.zeros(channels, np.float32)
    fns = {"minimask": minimask_fn(L.conv2d_forward, L.conv2d_backward, (x, w, b), {"padding": 1})}
    if torch is not None:
        def torch_fn(device):
            tx = torch.tensor(x, device=device, requires_grad=True)
            tw = torch.tensor(w, device=device, requires_grad=True)
            tb = torch.tensor(b, device=device, requires_grad=True)
            def run():
                out = torch.nn.functional.conv2d(tx, tw, tb, padding=1)
                out.backward(torch.ones_like(out))
            return run
        fns["torch"] = torch_fn
    return fns


def case_roi_align(rng, n_rois, channels=256, size=64, stride=8):
    features = rng.standard_normal((1, channels, size, size), dtype=np.float32)
    rois = random_rois(rng, n_rois, size * stride)
    kw = dict(output_size=14, spatial_scale=1 / stride, sampling_ratio=2, aligned=True)
    fns = {"minimask": minimask_fn(L.roi_align_forward, L.roi_align_backward, (features, rois), kw)}
    if torch is not None:
        def torch_fn(device):
            tf = torch.tensor(features, device=device, requires_grad=True)
            tr = torch.tensor(rois, device=device)
            def run():
                out = torchvision.ops.roi_align(tf, tr, 14, 1 / stride, 2, True)
                out.backward(torch.ones_like(out))
            return run
        fns["torch"] = torch_fn
    return fns


def case_deconv(rng, n_rois=64, channels=256):
    x = rng.standard_normal((n_rois, channels, 14, 14), dtype=np.float32)
    w = rng.standard_normal((channels, channels, 2, 2), dtype=np.float32) * 0.02
    b = np.zeros(channels, np.float32)
    fns = {"minimask": minimask_fn(L.conv_transpose2d_forward, L.conv_transpose2d_backward,
                                   (x, w, b), {"stride": 2})}
    if torch is not None:
        def torch_fn(device):
            tx = torch.tensor(x, device=device, requires_grad=True)
            tw = torch.tensor(w, device=device, requires_grad=True)
            tb = torch.tensor(b, device=device, requires_grad=True)
            def run():
                out = torch.nn.functional.conv_transpose2d(tx, tw, tb, stride=2)
                out.backward(torch.ones_like(out))
            return run
        fns["torch"] = torch_fn
    return fns


def anchors_of(image_size):
    return 9 * sum((image_size // s) ** 2 for s in (8, 16, 32, 64, 128))


def case_focal(rng, image_size=512, classes=80):
    n = anchors_of(image_size)
    logits = rng.standard_normal((1, n, classes), dtype=np.float32) - 4
    targets = (rng.random((1, n, classes)) < 0.001).astype(np.float32)
    fns = {"minimask": minimask_fn(L.sigmoid_focal_loss_forward, L.sigmoid_focal_loss_backward,
                                   (logits, targets), {})}
    if torch is not None:
        def torch_fn(device):
            tl = torch.tensor(logits, device=device, requires_grad=True)
            tt = torch.tensor(targets, device=device)
            def run():
                loss = torchvision.ops.sigmoid_focal_loss(tl, tt, reduction="sum")
                loss.backward()
            return run
        fns["torch"] = torch_fn
    return fns


def case_group_norm(rng, size=64, channels=256):
    x = rng.standard_normal((1, channels, size, size), dtype=np.float32)
    g, b = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    fns = {"minimask": minimask_fn(L.group_norm_forward, L.group_norm_backward,
                                   (x, g, b, 32), {})}
    if torch is not None:
        def torch_fn(device):
            tx = torch.tensor(x, device=device, requires_grad=True)
            tg = torch.tensor(g, device=device, requires_grad=True)
            tb = torch.tensor(b, device=device, requires_grad=True)
            def run():
                out = torch.nn.functional.group_norm(tx, 32, tg, tb)
                out.backward(torch.ones_like(out))
            return run
        fns["torch"] = torch_fn
    return fns


def cases(quick):
    rng = np.random.default_rng(0)
    if quick:
        return {
            "conv3x3 64->64 1x64x32x32": case_conv(rng, 32, 64),
            "roi_align 64 rois 64ch 14x14": case_roi_align(rng, 64, 64, 32),
            "deconv 2x2 64->64 16x14x14": case_deconv(rng, 16, 64),
            "focal loss 128px 80 cls": case_focal(rng, 128),
            "group_norm 1x64x32x32 G=32": case_group_norm(rng, 32, 64),
        }
    return {
        "conv3x3 256->256 1x256x64x64": case_conv(rng, 64),
        "roi_align 256 rois 256ch 14x14": case_roi_align(rng, 256),
        "roi_align 1000 rois 256ch 14x14": case_roi_align(rng, 1000),
        "deconv 2x2 256->256 64x14x14": case_deconv(rng),
        "focal loss 512px 80 cls": case_focal(rng),
        "group_norm 1x256x64x64 G=32": case_group_norm(rng),
    }


def time_case(fns, backends, repeats, with_torch, cuda):
    row = {}
    for backend in backends:
        n = 1 if backend == "numpy" else repeats
        with minimask.using_backend(backend):
            row[backend] = median_time(fns["minimask"], n, warmup=1)
    if with_torch and "torch" in fns:
        row["torch"] = median_time(fns["torch"]("cpu"), repeats)
    if cuda:
        from numba import cuda as nb_cuda
        with minimask.using_backend("cuda"):
            row["cuda"] = median_time(fns["minimask"], repeats, warmup=2,
                                      sync=nb_cuda.synchronize)
        if with_torch and "torch" in fns and torch.cuda.is_available():
            row["torch_cuda"] = median_time(fns["torch"]("cuda"), repeats, warmup=2,
                                            sync=torch.cuda.synchronize)
    return row


def second_start_seconds():
    """A new process, from start to the first `cpu` conv call returning (the
    njit cache on disk is what makes this quick)."""
    code = ("import numpy as np, minimask; from minimask.layers import conv2d_forward;"
            "conv2d_forward(np.ones((1,8,8,8),np.float32), np.ones((8,8,3,3),np.float32), None, padding=1)")
    subprocess.run([sys.executable, "-c", code], check=True)  # fills the cache
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def scaling(quick, with_torch):
    """Seconds of cpu fwd+bwd (and torch) against RoI count and image size."""
    rng = np.random.default_rng(1)
    roi_counts = [16, 64, 256] if quick else [16, 64, 256, 1000]
    sizes = [16, 32, 64] if quick else [32, 64, 128]
    out = {"rois": {"n": roi_counts, "cpu": [], "torch": []},
           "conv": {"size": sizes, "cpu": [], "torch": []}}
    for n in roi_counts:
        fns = case_roi_align(rng, n, 64 if quick else 256)
        with minimask.using_backend("cpu"):
            out["rois"]["cpu"].append(median_time(fns["minimask"], 3))
        if with_torch:
            out["rois"]["torch"].append(median_time(fns["torch"]("cpu"), 3))
    for s in sizes:
        fns = case_conv(rng, s, 64 if quick else 256)
        with minimask.using_backend("cpu"):
            out["conv"]["cpu"].append(median_time(fns["minimask"], 3))
        if with_torch:
            out["conv"]["torch"].append(median_time(fns["torch"]("cpu"), 3))
    return out


def plot(results, scale, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    names = list(results)
    backends = [b for b in ("numpy", "cpu", "torch", "cuda", "torch_cuda")
                if any(b in results[n] for n in names)]
    width = 0.8 / len(backends)
    for i, b in enumerate(backends):
        vals = [results[n].get(b, np.nan) * 1e3 for n in names]
        axes[0].bar(np.arange(len(names)) + i * width, vals, width, label=b)
    axes[0].set_yscale("log")
    axes[0].set_xticks(np.arange(len(names)) + 0.4 - width / 2)
    axes[0].set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    axes[0].set_ylabel("forward+backward, ms (median)")
    axes[0].legend()
    axes[0].set_title("layers at RetinaMask's shapes")
    for ax, key, xkey, title in [(axes[1], "rois", "n", "RoIAlign: cost against RoI count"),
                                 (axes[2], "conv", "size", "conv 3x3: cost against map size")]:
        for b in ("cpu", "torch"):
            if scale[key][b]:
                ax.plot(scale[key][xkey], np.array(scale[key][b]) * 1e3, "o-", label=b)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("RoIs" if key == "rois" else "map side (pixels)")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cuda", action="store_true", help="also time the cuda backend")
    parser.add_argument("--no-numpy", action="store_true", help="skip the slow NumPy reference")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    from numba import get_num_threads
    threads = get_num_threads()
    with_torch = torch is not None
    if with_torch:
        torch.set_num_threads(threads)
        print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {threads} threads")
    else:
        print("torch / torchvision are not installed: comparing cpu with the NumPy reference only")
    backends = (["numpy"] if not args.no_numpy else []) + ["cpu"]

    results = {}
    for name, fns in cases(args.quick).items():
        results[name] = time_case(fns, backends, args.repeats, with_torch, args.cuda)
        print(f"  timed {name}", flush=True)

    cols = list(dict.fromkeys(k for r in results.values() for k in r))
    ratio_cols = [("cpu", "numpy"), ("cpu", "torch"), ("cuda", "torch_cuda")]
    ratio_cols = [rc for rc in ratio_cols if rc[0] in cols and rc[1] in cols]
    head = f"{'case':34s}" + "".join(f"{c + ' ms':>13s}" for c in cols) + \
        "".join(f"{a + '/' + b:>15s}" for a, b in ratio_cols)
    print("\n" + head + "\n" + "-" * len(head))
    for name, row in results.items():
        line = f"{name:34s}" + "".join(f"{row.get(c, np.nan) * 1e3:13.2f}" for c in cols)
        line += "".join(f"{row[a] / row[b]:15.3f}" for a, b in ratio_cols)
        print(line)

    start = second_start_seconds()
    print(f"\nsecond start (new process to first cpu conv call returning): {start:.2f} s")
    scale = scaling(args.quick, with_torch)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "quick" if args.quick else "full"
    record = {"machine": platform.processor() or platform.machine(), "threads": threads,
              "numpy": np.__version__, "torch": torch.__version__ if with_torch else None,
              "seconds": results, "second_start_s": start, "scaling_s": scale}
    json_path = out / f"layers_{tag}.json"
    json_path.write_text(json.dumps(record, indent=2))
    fig_path = ROOT / "figures" / f"benchmark_layers_{tag}.png"
    plot(results, scale, fig_path)
    print(f"wrote {json_path.relative_to(ROOT)} and {fig_path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
