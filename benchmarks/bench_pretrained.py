"""Time of one training step and one prediction of the resnet50-frozenbn
preset (imported-weights setting: stem and layer1 frozen, batch of 1).

    PYTHONPATH=. python benchmarks/bench_pretrained.py --sizes 512 800

Random weights (the time does not depend on their values). A first call at
128 px compiles the kernels, so the numbers below are steady-state. The
machine's load average is printed with them: on a shared machine it says
how much of the CPU the run had. The CPU seconds the process used (all its
threads together) depend far less on the load: on an idle machine with
``c`` cores the wall time lies between CPU / c and CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from minimask.data.synthetic import ShapesDataset
from minimask.model import Config, RetinaMask
from minimask.nn import SGD
from minimask.train import clip_gradients


def one_step(model, optimizer, params, images, targets):
    """What one iteration of ``train`` does: loss + backward, clipping, SGD.
    Returns (wall seconds, CPU seconds of this process, losses)."""
    t, c = time.perf_counter(), time.process_time()
    losses = model.loss(images, targets)
    clip_gradients(params, 10.0)
    optimizer.step()
    return time.perf_counter() - t, time.process_time() - c, losses


def one_prediction(model, images):
    t, c = time.perf_counter(), time.process_time()
    model.predict(images)
    return time.perf_counter() - t, time.process_time() - c


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 800])
    parser.add_argument("--preset", default="resnet50-frozenbn")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    config = Config.preset(args.preset, num_classes=4)
    model = RetinaMask(config)
    params = [p for p in model.parameters() if not getattr(p, "frozen", False)]
    optimizer = SGD(params, lr=1e-4)
    results = {"preset": args.preset, "trainable_stages": config.trainable_stages,
               "cpu_count": os.cpu_count(), "runs": []}
    for size in [128] + list(args.sizes):
        data = ShapesDataset(seed=0, num_images=1, size=size)
        image, target = data[0]
        images, targets = image[None], [target]
        load_before = os.getloadavg()[0]
        pred, pred_cpu = one_prediction(model, images)
        step, step_cpu, losses = one_step(model, optimizer, params, images, targets)
        row = {"size": size, "train_step_s": round(step, 2), "predict_s": round(pred, 2),
               "train_step_cpu_s": round(step_cpu, 2), "predict_cpu_s": round(pred_cpu, 2),
               "loss_total": round(float(losses["total"]), 3),
               "load_avg_1min": round(load_before, 2), "warm_up": size == 128}
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
