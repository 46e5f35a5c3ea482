"""Usage: PYTHONPATH=. NUMBA_NUM_THREADS=1 nice -n 15 python benchmarks/time_p2_step.py 60

One training step (loss + SGD) of the tiny preset, batch 2, 128 px, on
the cpu backend: roi_min_level 3 against 2, interleaved, medians."""
import sys, time
import numpy as np
import minimask
from minimask.data import CLASSES, ShapesDataset
from minimask.data.batch import make_batch
from minimask.model import Config, RetinaMask
from minimask.nn import SGD
from minimask.train import TrainSettings

minimask.configure_process()
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 6
data = ShapesDataset(seed=0, num_images=64, size=128)
s = TrainSettings(batch_size=2)
models = {}
for lvl in (3, 2):
    kw = dict(roi_min_level=lvl, canonical_level=4)
    m = RetinaMask(Config.preset("tiny", num_classes=len(CLASSES), **kw))
    models[lvl] = (m, SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4))
times = {3: [], 2: []}
rois = {3: [], 2: []}
with minimask.using_backend("cpu"):
    for step in range(steps + 2):
        images, targets = make_batch(data, step, s)
        for lvl, (m, opt) in models.items():
            t0, c0 = time.perf_counter(), time.process_time()
            out = m.loss(images, targets)
            opt.step()
            dt = (time.perf_counter() - t0, time.process_time() - c0)
            if step >= 2:       # the first two: Numba compiling / warming up
                times[lvl].append(dt)
                rois[lvl].append(np.bincount(m.pooler.levels_of(
                    np.concatenate([t["boxes"] for t in targets])), minlength=6))
for lvl in (3, 2):
    t = np.array(times[lvl]) * 1000
    print(f"roi_min_level={lvl} over {len(t)} steps: wall median {np.median(t[:, 0]):.0f} ms "
          f"(min {t[:, 0].min():.0f}); CPU time median {np.median(t[:, 1]):.0f} ms "
          f"(min {t[:, 1].min():.0f}); gt RoIs per level P0..P5 {np.sum(rois[lvl], 0).tolist()}")
t3, t2 = np.array(times[3]), np.array(times[2])
r = t2 / t3
print(f"paired per-step ratio (level 2 / level 3): wall median {np.median(r[:, 0]):.2f}, "
      f"CPU median {np.median(r[:, 1]):.2f}; ratio of the minima: wall "
      f"{t2[:, 0].min() / t3[:, 0].min():.2f}, CPU {t2[:, 1].min() / t3[:, 1].min():.2f}")
