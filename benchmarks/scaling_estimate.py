"""An estimate on paper, not a measurement: how data-parallel training of
the tiny model would scale to 8, 64 and 256 ranks across machines.

    python benchmarks/scaling_estimate.py      # reads results/train_throughput.json

Inputs, measured on this machine by ``bench_train_throughput.py``:
* the compute time of one image on one single-threaded rank (the median
  ``1 rank, 1 thread`` step divided by its batch);
* the allreduce buffer (every gradient + 8 scalars, float32), in bytes.

Model (stated, not measured):
* one allreduce per step, after the whole backward pass (minimask does not
  overlap communication with computation);
* a ring allreduce over all ``n`` ranks, whose slowest links are the
  network's: ``t = 2 (n - 1) / n * bytes / bandwidth + 2 (n - 1) * alpha``;
* link bandwidth at 80% of the nominal rate; per-message latency alpha of
  30 us on 10 Gbit/s Ethernet (TCP) and 3 us on a 100 Gbit/s RDMA fabric;
* a rank computing ``b`` images per step takes ``b`` times the per-image
  time (the small layers do not get cheaper per image in bigger batches).

Prints, per link and rank count: the allreduce time, the efficiency
(compute / (compute + allreduce)) with 1 and 4 images per rank, and the
images per rank - and so the global batch - needed for 90% efficiency.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINKS = {"10 Gbit/s Ethernet": (10e9, 30e-6), "100 Gbit/s RDMA": (100e9, 3e-6)}
RANKS = (8, 64, 256)
USABLE = 0.8


def ring_seconds(n: int, nbytes: float, bits_per_s: float, alpha: float) -> float:
    return 2 * (n - 1) / n * nbytes / (USABLE * bits_per_s / 8) + 2 * (n - 1) * alpha


def main():
    results = json.loads((ROOT / "benchmarks" / "results" / "train_throughput.json").read_text())
    rows = {r["variant"]: r for r in results["rows"]}
    single = rows["1 rank, 1 thread"]
    per_image = single["median_step_s"] / results["batch"]
    nbytes = next(r["gradient_bytes"] for r in results["rows"] if r.get("ranks", 1) > 1)
    print(f"measured {results['date']}: {per_image * 1e3:.1f} ms per image on one "
          f"single-threaded rank; allreduce buffer {nbytes / 1e6:.2f} MB")
    print("| link | ranks | allreduce | efficiency, 1 image/rank | 4 images/rank "
          "| images/rank for 90% | global batch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for link, (bandwidth, alpha) in LINKS.items():
        for n in RANKS:
            t = ring_seconds(n, nbytes, bandwidth, alpha)
            eff = [b * per_image / (b * per_image + t) for b in (1, 4)]
            need = max(1, math.ceil(9 * t / per_image))
            print(f"| {link} | {n} | {t * 1e3:.1f} ms | {eff[0]:.0%} | {eff[1]:.0%} | {need} "
                  f"| {need * n} |")


if __name__ == "__main__":
    main()
