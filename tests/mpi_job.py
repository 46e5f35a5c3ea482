"""Jobs that tests/test_distributed.py runs under ``mpiexec -n 2``:

    python tests/mpi_job.py gradient OUT   # one averaged gradient, float64
    python tests/mpi_job.py train OUT      # params per rank; a run, and a resumed run

Each rank writes what the test compares into OUT (rank 0 the shared files)."""
import sys
from pathlib import Path

import numpy as np

from minimask import distributed
from minimask.data.synthetic import ShapesDataset
from minimask.model import Config, RetinaMask
from minimask.train import TrainSettings, train

DATA = ShapesDataset(seed=5, num_images=6, size=64)


def micro_config(**kw):
    base = dict(stem_channels=4, stem_kernel=3, blocks=(1, 1, 1, 1), widths=(4, 8, 8, 8),
                fpn_channels=8, head_convs=1, mask_convs=1, anchor_sizes=(8, 16, 32, 64, 128),
                canonical_size=16, mask_size=8, num_classes=4, dtype="float64", seed=2)
    base.update(kw)
    return Config(**base).validated()


def perturbed_model():
    """The micro model moved away from its initial weights (the same on every rank)."""
    model = RetinaMask(micro_config())
    rng = np.random.default_rng(0)
    for p in model.parameters():
        p.value += 0.01 * rng.standard_normal(p.value.shape)
    return model


def run_settings(out, iters, resume=False):
    return TrainSettings(iters=iters, batch_size=2, lr=0.01, warmup_iters=1, log_every=1,
                         checkpoint_every=2, out=str(out), progress=False, resume=resume)


def main(job, out):
    out = Path(out)
    comm = distributed.world()
    rank = comm.rank
    if job == "gradient":
        model = perturbed_model()
        s = TrainSettings(batch_size=3, seed=1)
        losses, stop = distributed.DataParallel(model, DATA, s, comm).loss(step=4)
        np.savez(out / f"gradient{rank}.npz", stop=stop, **losses,
                 **{n: p.grad for n, p in model.named_parameters()})
    elif job == "train":
        cfg = micro_config(dtype="float32")
        model = train(DATA, run_settings(out / "a", 4), cfg, comm=comm)
        np.savez(out / f"params{rank}.npz", **{n: p.value for n, p in model.named_parameters()})
        train(DATA, run_settings(out / "b", 2), cfg, comm=comm)
        train(DATA, run_settings(out / "b", 4, resume=True), comm=comm)
    else:
        raise SystemExit(f"unknown job {job!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
