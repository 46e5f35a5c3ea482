"""Time forward+backward of each layer at RetinaMask's real shapes.

    python benchmarks/bench_layers.py            # numpy vs cpu (vs torch if installed)
    python benchmarks/bench_layers.py --quick    # smaller shapes, fewer repeats
    python benchmarks/bench_layers.py --cuda     # also cuda vs torch CUDA, on a GPU

The cases (float32, batch of one image, the shapes a 512 x 512 input gives):

* ``conv3x3 256->256 1x256x64x64``: a 3x3 conv of the class / box subnets
  on P3 (stride 8), padding 1, with bias;
* ``roi_align 256 / 1000 rois``: RoIAlign (avg, ``aligned=True``,
  ``sampling_ratio=2``) to 14 x 14 from a 256-channel 64 x 64 map, RoIs of
  varied size and aspect (the mask head's input during training / at
  inference);
* ``deconv 2x2 256->256 64x14x14``: the mask head's transposed conv, 64 RoIs;
* ``focal loss 512px 80 cls``: the sigmoid focal loss over all anchors of
  P3-P7 (9 per location, 49104 anchors) and 80 classes;
* ``group_norm 1x256x64x64 G=32``: GroupNorm after a subnet conv on P3.

Each case is timed as forward + backward with a fixed random upstream
gradient; the median of ``--repeats`` runs after one warm-up run (the NumPy
reference: one run, no warm-up, as it compiles nothing; it is skipped for
1000 RoIs, where it takes about a minute and scales like the 256-RoI case).
Before timing, each case runs once on minimask's ``cpu`` backend and once
in torch, and the outputs and every gradient are compared (relative to
their largest magnitude), so the two sides are known to do the same work.

Prints a table of median times and ratios, writes it as JSON to
``benchmarks/results/layers_{full,quick}.json`` and plots it, with how
RoIAlign's cost grows with the number of RoIs and a conv's with the map
size, into ``figures/benchmark_layers_{full,quick}.png``.

torch / torchvision are optional here (never needed to run or test
minimask); where they are missing the table says so and compares ``cpu``
with the NumPy reference only. Every backend runs on the same thread count:
Numba's (``NUMBA_NUM_THREADS``) and torch's are set to the same number.
"""
from __future__ import annotations

import argparse
import datetime
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

# passive OpenMP waiting before torch loads the OpenMP runtime both share
minimask.configure_process()

try:
    import torch
    import torchvision
except ImportError:
    torch = torchvision = None

# float32 agreement of minimask's cpu backend with torch, relative to the
# largest magnitude of each tensor: sums of up to 2304 products (conv) and
# scatter-adds in another order differ by float32 round-off, ~1e-6 relative.
AGREE_RTOL = 1e-4


def median_time(fn, repeats, warmup=1, sync=None):
    """Median and minimum seconds of ``repeats`` calls, after ``warmup``."""
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
    return statistics.median(times), min(times)


# ---------------------------------------------------------------------------
# The cases: each builds float32 inputs and a fixed random upstream gradient,
# and returns a minimask closure and (if torch is there) a torch one. Both
# return [out, *grads] so that they can be compared.
# ---------------------------------------------------------------------------

def random_rois(rng, n, image_size, batch=1):
    """Boxes of varied size and aspect inside an image_size x image_size image."""
    cx, cy = rng.uniform(0, image_size, (2, n))
    w, h = np.exp(rng.uniform(np.log(16), np.log(image_size / 2), (2, n)))
    x1, y1 = np.clip(cx - w / 2, 0, image_size - 1), np.clip(cy - h / 2, 0, image_size - 1)
    x2, y2 = np.clip(cx + w / 2, x1 + 1, image_size), np.clip(cy + h / 2, y1 + 1, image_size)
    idx = rng.integers(0, batch, n)
    return np.stack([idx, x1, y1, x2, y2], 1).astype(np.float32)


def minimask_fn(fwd, bwd, args, kwargs, dout):
    """A closure running fwd then bwd on host arrays; ``run.on_device()``
    gives the same on device copies (for the "cuda" backend, so that the
    timing leaves out host-device copies, as torch CUDA's does)."""
    def make(args, dout):
        def run():
            out, cache = fwd(*args, **kwargs)
            grads = bwd(dout, cache)
            return [out, *(grads if isinstance(grads, tuple) else (grads,))]
        return run

    def on_device():
        from numba import cuda
        move = lambda a: cuda.to_device(a) if isinstance(a, np.ndarray) and a.ndim else a
        return make([move(a) for a in args], move(dout))

    run = make(args, dout)
    run.on_device = on_device
    return run


def torch_fn(op, arrays, needs_grad, dout):
    """A factory: device -> closure computing op(*tensors) and the gradients
    of <op, dout> with respect to the tensors flagged in needs_grad."""
    def make(device):
        tensors = [torch.tensor(a, device=device, requires_grad=g)
                   for a, g in zip(arrays, needs_grad)]
        wrt = [t for t, g in zip(tensors, needs_grad) if g]
        tdout = torch.tensor(dout, device=device)

        def run():
            out = op(*tensors)
            return [out, *torch.autograd.grad(out, wrt, tdout)]
        return run
    return make


def case_conv(rng, size, channels=256):
    x = rng.standard_normal((1, channels, size, size), dtype=np.float32)
    w = rng.standard_normal((channels, channels, 3, 3), dtype=np.float32) * 0.02
    b = rng.standard_normal(channels, dtype=np.float32)
    dout = rng.standard_normal((1, channels, size, size), dtype=np.float32)
    fns = {"minimask": minimask_fn(L.conv2d_forward, L.conv2d_backward, (x, w, b),
                                   {"padding": 1}, dout)}
    if torch is not None:
        fns["torch"] = torch_fn(lambda tx, tw, tb: torch.nn.functional.conv2d(tx, tw, tb, padding=1),
                                [x, w, b], [True, True, True], dout)
    return fns


def case_roi_align(rng, n_rois, channels=256, size=64, stride=8):
    features = rng.standard_normal((1, channels, size, size), dtype=np.float32)
    rois = random_rois(rng, n_rois, size * stride)
    dout = rng.standard_normal((n_rois, channels, 14, 14), dtype=np.float32)
    kw = dict(output_size=14, spatial_scale=1 / stride, sampling_ratio=2, aligned=True)
    fns = {"minimask": minimask_fn(L.roi_align_forward, L.roi_align_backward,
                                   (features, rois), kw, dout)}
    if torch is not None:
        fns["torch"] = torch_fn(
            lambda tf, tr: torchvision.ops.roi_align(tf, tr, 14, 1 / stride, 2, True),
            [features, rois], [True, False], dout)
    return fns


def case_deconv(rng, n_rois=64, channels=256):
    x = rng.standard_normal((n_rois, channels, 14, 14), dtype=np.float32)
    w = rng.standard_normal((channels, channels, 2, 2), dtype=np.float32) * 0.02
    b = rng.standard_normal(channels, dtype=np.float32)
    dout = rng.standard_normal((n_rois, channels, 28, 28), dtype=np.float32)
    fns = {"minimask": minimask_fn(L.conv_transpose2d_forward, L.conv_transpose2d_backward,
                                   (x, w, b), {"stride": 2}, dout)}
    if torch is not None:
        fns["torch"] = torch_fn(
            lambda tx, tw, tb: torch.nn.functional.conv_transpose2d(tx, tw, tb, stride=2),
            [x, w, b], [True, True, True], dout)
    return fns


def anchors_of(image_size):
    return 9 * sum((image_size // s) ** 2 for s in (8, 16, 32, 64, 128))


def case_focal(rng, image_size=512, classes=80):
    n = anchors_of(image_size)
    logits = rng.standard_normal((1, n, classes), dtype=np.float32) - 4
    targets = (rng.random((1, n, classes)) < 0.001).astype(np.float32)
    one = np.float32(1.0)
    fns = {"minimask": minimask_fn(L.sigmoid_focal_loss_forward, L.sigmoid_focal_loss_backward,
                                   (logits, targets), {}, one)}
    if torch is not None:
        fns["torch"] = torch_fn(
            lambda tl, tt: torchvision.ops.sigmoid_focal_loss(tl, tt, reduction="sum"),
            [logits, targets], [True, False], one)
    return fns


def case_group_norm(rng, size=64, channels=256):
    x = rng.standard_normal((1, channels, size, size), dtype=np.float32)
    g = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    b = rng.standard_normal(channels, dtype=np.float32)
    dout = rng.standard_normal(x.shape, dtype=np.float32)
    fns = {"minimask": minimask_fn(L.group_norm_forward, L.group_norm_backward,
                                   (x, g, b, 32), {}, dout)}
    if torch is not None:
        fns["torch"] = torch_fn(lambda tx, tg, tb: torch.nn.functional.group_norm(tx, 32, tg, tb),
                                [x, g, b], [True, True, True], dout)
    return fns


# name -> (builder, skip numpy?)
def cases(quick):
    rng = np.random.default_rng(0)
    if quick:
        return {
            "conv3x3 64->64 1x64x32x32": (case_conv(rng, 32, 64), False),
            "roi_align 64 rois 64ch 14x14": (case_roi_align(rng, 64, 64, 32), False),
            "deconv 2x2 64->64 16x14x14": (case_deconv(rng, 16, 64), False),
            "focal loss 128px 80 cls": (case_focal(rng, 128), False),
            "group_norm 1x64x32x32 G=32": (case_group_norm(rng, 32, 64), False),
        }
    return {
        "conv3x3 256->256 1x256x64x64": (case_conv(rng, 64), False),
        "roi_align 256 rois 256ch 14x14": (case_roi_align(rng, 256), False),
        "roi_align 1000 rois 256ch 14x14": (case_roi_align(rng, 1000), True),
        "deconv 2x2 256->256 64x14x14": (case_deconv(rng), False),
        "focal loss 512px 80 cls": (case_focal(rng), False),
        "group_norm 1x256x64x64 G=32": (case_group_norm(rng), False),
    }


def agreement(fns):
    """Largest difference of minimask (cpu) against torch over the output and
    every gradient, each relative to the tensor's largest magnitude."""
    with minimask.using_backend("cpu"):
        ours = fns["minimask"]()
    theirs = [t.detach().cpu().numpy() for t in fns["torch"]("cpu")()]
    assert len(ours) == len(theirs), (len(ours), len(theirs))
    worst = 0.0
    for a, b in zip(ours, theirs):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape, (a.shape, b.shape)
        worst = max(worst, float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)))
    return worst


def time_case(fns, lib, backends, repeats, cuda):
    """Times of one library's closures: minimask on each backend, or torch."""
    row, best = {}, {}
    if lib == "minimask":
        for backend in backends:
            n, warm = (1, 0) if backend == "numpy" else (repeats, 1)
            with minimask.using_backend(backend):
                row[backend], best[backend] = median_time(fns["minimask"], n, warmup=warm)
        if cuda:
            from numba import cuda as nb_cuda
            with minimask.using_backend("cuda"):
                row["cuda"], best["cuda"] = median_time(fns["minimask"].on_device(), repeats,
                                                        warmup=2, sync=nb_cuda.synchronize)
    elif "torch" in fns:
        row["torch"], best["torch"] = median_time(fns["torch"]("cpu"), repeats)
        if cuda and torch.cuda.is_available():
            row["torch_cuda"], best["torch_cuda"] = median_time(
                fns["torch"]("cuda"), repeats, warmup=2, sync=torch.cuda.synchronize)
    return row, best


def worker(lib, quick, repeats, no_numpy, cuda):
    """Time every case (and the scaling sweeps) for one library, in this
    process only, and print the result as JSON on the last line.

    The two libraries run in separate processes: each keeps its own thread
    pool (Numba's OpenMP layer and OpenBLAS; torch's own OpenMP runtime),
    and idle pools spin for a while after a parallel region. In one process
    on a few cores, each would steal the cores the other one is timed on.
    """
    import numba
    if torch is not None:
        torch.set_num_threads(numba.get_num_threads())
    backends = ([] if no_numpy else ["numpy"]) + ["cpu"]
    seconds, minima, skipped = {}, {}, []
    for name, (fns, skip_numpy) in cases(quick).items():
        case_backends = [b for b in backends if not (b == "numpy" and skip_numpy)]
        if lib == "minimask" and len(case_backends) < len(backends):
            skipped.append(name)
        seconds[name], minima[name] = time_case(fns, lib, case_backends, repeats, cuda)
        print(f"  {lib}: timed {name}", file=sys.stderr, flush=True)
    scale = scaling(quick, lib)
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel Numba region ran in this process
        layer = None
    print(json.dumps({"seconds": seconds, "min_seconds": minima, "numpy_skipped": skipped,
                      "scaling_s": scale, "threading_layer": layer}))


def run_worker(lib, args, repeats):
    cmd = [sys.executable, __file__, "--worker", lib, "--repeats", str(repeats)]
    cmd += ["--quick"] * args.quick + ["--no-numpy"] * args.no_numpy + ["--cuda"] * args.cuda
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def second_start_seconds(runs=3):
    """A new process, from start to the first `cpu` conv call returning (the
    njit cache on disk is what makes this quick). Median of ``runs``."""
    code = ("import numpy as np, minimask; from minimask.layers import conv2d_forward;"
            "conv2d_forward(np.ones((1,8,8,8),np.float32), np.ones((8,8,3,3),np.float32), None, padding=1)")
    env = dict(os.environ, MINIMASK_BACKEND="cpu")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)  # fills the cache
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def scaling(quick, lib, repeats=3):
    """Seconds of fwd+bwd (minimask cpu, or torch) against RoI count and map size."""
    rng = np.random.default_rng(1)
    roi_counts = [16, 64, 256] if quick else [16, 64, 256, 1000]
    sizes = [16, 32, 64] if quick else [16, 32, 64, 128]
    key = "cpu" if lib == "minimask" else "torch"
    out = {"rois": {"n": roi_counts, key: []}, "conv": {"size": sizes, key: []}}
    if lib == "torch" and torch is None:
        return out
    sweeps = [("rois", [case_roi_align(rng, n, 64 if quick else 256) for n in roi_counts]),
              ("conv", [case_conv(rng, s, 64 if quick else 256) for s in sizes])]
    for what, fn_list in sweeps:
        for fns in fn_list:
            if lib == "minimask":
                with minimask.using_backend("cpu"):
                    out[what][key].append(median_time(fns["minimask"], repeats)[0])
            else:
                out[what][key].append(median_time(fns["torch"]("cpu"), repeats)[0])
    return out


def plot(record, path):
    import matplotlib
    matplotlib.use("Agg")
    from minimask.viz.speed import plot_benchmark

    plot_benchmark(record).savefig(path, dpi=110)


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per case (default 5, quick 3)")
    parser.add_argument("--cuda", action="store_true", help="also time the cuda backend")
    parser.add_argument("--no-numpy", action="store_true", help="skip the slow NumPy reference")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--figures", default=str(ROOT / "figures"))
    parser.add_argument("--worker", choices=["minimask", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    if args.worker:
        return worker(args.worker, args.quick, repeats, args.no_numpy, args.cuda)

    import numba
    threads = numba.get_num_threads()
    with_torch = torch is not None
    if with_torch:
        torch.set_num_threads(threads)
        print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {threads} threads")
    else:
        print("torch / torchvision are not installed: comparing cpu with the NumPy reference only")
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"{cpu_name()}, numba {numba.__version__} ({threads} threads), "
          f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")

    agree = {}
    if with_torch:
        for name, (fns, _) in cases(args.quick).items():
            agree[name] = agreement(fns)
            assert agree[name] < AGREE_RTOL, \
                f"{name}: minimask and torch differ by {agree[name]:.2e} (relative): not the same work"
            print(f"  {name}: minimask agrees with torch to {agree[name]:.1e}", flush=True)
    ours = run_worker("minimask", args, repeats)
    results, minima, skipped = ours["seconds"], ours["min_seconds"], ours["numpy_skipped"]
    scale = ours["scaling_s"]
    if with_torch:
        theirs = run_worker("torch", args, repeats)
        for name in results:
            results[name].update(theirs["seconds"][name])
            minima[name].update(theirs["min_seconds"][name])
        for key in scale:
            scale[key].update(theirs["scaling_s"][key])
    print(f"numba threading layer: {ours['threading_layer']}")

    cols = list(dict.fromkeys(k for r in results.values() for k in r))
    ratio_cols = [("cpu", "numpy"), ("cpu", "torch"), ("cuda", "torch_cuda")]
    ratio_cols = [rc for rc in ratio_cols if rc[0] in cols and rc[1] in cols]
    head = f"{'case':34s}" + "".join(f"{c + ' ms':>13s}" for c in cols) + \
        "".join(f"{a + '/' + b:>15s}" for a, b in ratio_cols)
    print("\n" + head + "\n" + "-" * len(head))
    for name, row in results.items():
        line = f"{name:34s}" + "".join(
            f"{row[c] * 1e3:13.2f}" if c in row else f"{'skipped':>13s}" for c in cols)
        line += "".join(f"{row[a] / row[b]:15.3f}" if a in row and b in row else f"{'-':>15s}"
                        for a, b in ratio_cols)
        print(line)
    if skipped:
        print("numpy skipped (takes about a minute; linear in the RoI count): "
              + ", ".join(skipped))

    start = second_start_seconds()
    print(f"\nsecond start (new process to first cpu conv call returning): {start:.2f} s")
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "quick" if args.quick else "full"
    record = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": cpu_name(),
              "cores": os.cpu_count(), "threads": threads,
              "threading_layer": ours["threading_layer"],
              "load_average_before": [round(v, 2) for v in load_before],
              "load_average_after": [round(v, 2) for v in load_after],
              "python": platform.python_version(), "numpy": np.__version__,
              "numba": numba.__version__,
              "torch": torch.__version__ if with_torch else None,
              "torchvision": torchvision.__version__ if with_torch else None,
              "repeats": repeats, "seconds": results, "min_seconds": minima,
              "numpy_skipped": skipped, "agreement_with_torch": agree,
              "second_start_s": start, "scaling_s": scale}
    json_path = out / f"layers_{tag}.json"
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    fig_path = figures / f"benchmark_layers_{tag}.png"
    plot(record, fig_path)
    print(f"wrote {json_path} and {fig_path}")


if __name__ == "__main__":
    main()
