"""A DDP training script for tests/test_distributed_killed.py, launched with torchrun: rank 1 dies
mid-run (``os._exit``) after the step-4 sweep and snapshot; torchrun then stops rank 0 as it does in
production. Usage: ``python -m torch.distributed.run --nproc_per_node 2 dist_killed_rank.py RUN_DIR``."""

from __future__ import annotations

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist
from scope_helpers import Denoiser, mixture, sampler, train_step

from emascope import attach

DIE_AT = 6


def main(run_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(Denoiser())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data, g = mixture(500, seed=10 + rank), torch.Generator().manual_seed(rank)
    with attach(model, opt, run_dir=run_dir, sampler=sampler, reference=mixture(100, 3), score_every=4,
                num_samples=60, batch_size=30, decays=(0.9, 0.99), heartbeat_interval=0.3):
        for step in range(1, 1000):
            train_step(model, opt, data, g)
            if rank == 1 and step == DIE_AT:
                os._exit(17)  # killed: no cleanup, no close
            time.sleep(0.02)


if __name__ == "__main__":
    main(sys.argv[1])
