"""Time training steps of RetinaMask presets on a backend, and count what
crosses between host and device per step.

    python benchmarks/bench_gpu_step.py --backend cuda                # the default cases
    python benchmarks/bench_gpu_step.py --backend cpu --case tiny:64:1 --steps 1

A case is ``preset:image_size:batch``; the defaults are the issue's targets
(tiny at 128 and 256 px, batch 4; resnet50 at 512 px, batch 2). A step is
``model.loss`` (forward, the three losses, the whole backward), gradient
clipping and the SGD update, on synthetic shapes. On "cuda" each step ends
with ``cuda.synchronize()`` so the time is the GPU's, and one extra step is
run with the backend's copy counter on (``Backend.counting_copies``): the
bytes per step that cross PCIe, images included.

With ``--torch`` (and torch + torchvision importable) the same cases also
time torchvision's RetinaNet-ResNet50-FPN (no weights, fp32) training step
on the device, the nearest off-the-shelf network: RetinaNet without the mask
head, with frozen BatchNorm instead of GroupNorm - a yardstick, not the same
network.

The minimask cases run in one child process (the kernels compile once, on
the first) and torch's in another, each under ``--timeout``; a case that
did not finish in time is recorded as such and the finished ones are kept.
Writes one JSON record (``--out``, default ``benchmarks/results/gpu_step.json``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CASES = ["tiny:128:4", "tiny:256:4", "resnet50:512:2"]


def parse_case(text):
    """``"preset:size:batch"`` -> (preset, size, batch), or ValueError."""
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"a case is preset:image_size:batch, got {text!r}")
    preset, size, batch = parts
    try:
        size, batch = int(size), int(batch)
    except ValueError:
        raise ValueError(f"image_size and batch must be integers in {text!r}") from None
    if size < 32 or batch < 1:
        raise ValueError(f"image_size must be >= 32 and batch >= 1 in {text!r}")
    return preset, size, batch


def run_minimask(preset, size, batch, steps, backend):
    import numpy as np

    sys.path.insert(0, str(ROOT))
    import minimask
    from minimask.backend import current_backend
    from minimask.data.synthetic import ShapesDataset
    from minimask.model import Config, RetinaMask
    from minimask.nn import SGD
    from minimask.train import clip_gradients

    minimask.set_backend(backend)
    be = current_backend()
    sync = (lambda: None)
    if be.on_device:
        from minimask._cuda import cuda
        sync = cuda.synchronize
    data = ShapesDataset(seed=0, num_images=batch, size=size)
    images = np.stack([data[i][0] for i in range(batch)])
    targets = [data[i][1] for i in range(batch)]
    model = RetinaMask(Config.preset(preset, num_classes=data.num_classes))
    opt = SGD(model.parameters(), lr=0.001)

    def step():
        losses = model.loss(images, targets)
        clip_gradients(model.parameters(), 10.0)
        opt.step()
        sync()
        return losses

    t0 = time.perf_counter()
    step()                                   # compiles the kernels, moves the weights
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses = step()
        times.append(time.perf_counter() - t0)
    record = {"network": "minimask", "preset": preset, "size": size, "batch": batch,
              "backend": backend, "first_step_s": first,
              "median_step_s": statistics.median(times), "min_step_s": min(times),
              "steps": steps, "parameters": model.num_parameters(),
              "loss": {k: float(losses[k]) for k in ("cls", "box", "mask", "total")}}
    if be.on_device:
        with be.counting_copies() as copies:
            step()
        record["bytes_per_step"] = {
            "images": int(images.astype(model.dtype).nbytes),
            "to_device": sum(c[1] for c in copies if c[0] == "to_device"),
            "to_host": sum(c[1] for c in copies if c[0] == "to_host"),
            "copies": len(copies),
            "largest": max((c[1] for c in copies), default=0)}
    return record


def run_torch(size, batch, steps):
    """torchvision RetinaNet-ResNet50-FPN, random init, one SGD step, fp32."""
    import torch
    import torchvision
    from torchvision.models.detection import retinanet_resnet50_fpn

    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False     # fp32, like minimask
    torch.backends.cudnn.allow_tf32 = False
    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5,
                                   min_size=size, max_size=size).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g).to(device) for _ in range(batch)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, size / 2, size / 2 + 10]], device=device),
                "labels": torch.tensor([1], device=device)} for _ in range(batch)]

    def step():
        losses = model(images, targets)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        torch.cuda.synchronize()

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"network": "torchvision retinanet_resnet50_fpn", "size": size, "batch": batch,
            "backend": "torch-cuda", "torchvision": torchvision.__version__,
            "first_step_s": first, "median_step_s": statistics.median(times),
            "min_step_s": min(times), "steps": steps}


def run_group(args, cases, torch_ref, timeout):
    """All ``cases`` in one child process (the kernels compile once), which
    prints a JSON line per finished case; on a timeout the finished cases are
    kept and the rest are recorded as timed out."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--backend", args.backend,
           "--steps", str(args.steps)] + [x for c in cases for x in ("--case", c)]
    if torch_ref:
        cmd.append("--torch-child")
    error = None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        stdout, stderr = done.stdout, done.stderr
        if done.returncode != 0:
            error = (stderr or stdout).strip().splitlines()[-1:] or ["failed"]
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        error = f"timed out after {timeout} s"
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    for case in cases[len(rows):]:
        rows.append({"case": case, "torch": torch_ref, "error": error or "no result"})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="cuda", choices=["numpy", "cpu", "cuda"])
    p.add_argument("--case", action="append", default=None,
                   help="preset:image_size:batch (repeatable; default: %s)" % " ".join(DEFAULT_CASES))
    p.add_argument("--steps", type=int, default=5, help="timed steps per case (after one warm-up)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds for all minimask cases together")
    p.add_argument("--torch-timeout", type=float, default=120.0,
                   help="seconds for all torchvision cases together")
    p.add_argument("--torch", action="store_true",
                   help="also time torchvision's RetinaNet-R50-FPN on the GPU per case")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_step.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cases = args.case or DEFAULT_CASES
    try:
        parsed = [parse_case(c) for c in cases]
    except ValueError as e:
        p.error(str(e))
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.child:
        for case, (preset, size, batch) in zip(cases, parsed):
            record = (run_torch(size, batch, args.steps) if args.torch_child
                      else run_minimask(preset, size, batch, args.steps, args.backend))
            print(json.dumps({"case": case, **record}), flush=True)
        return 0
    rows = run_group(args, cases, False, args.timeout)
    if args.torch:
        rows += run_group(args, cases, True, args.torch_timeout)
    for row in rows:
        print(json.dumps(row))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"backend": args.backend, "cases": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
