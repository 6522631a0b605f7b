"""The training script of tests/test_accelerate_launch.py, run by ``accelerate launch`` on 2 CPU processes.

An ``Accelerator`` (gloo process group, DDP) with gradient accumulation, the agent attached on every
rank to the prepared model and optimizer. Each rank trains on its half of every batch; the recipe
(:func:`make_model`, :func:`batches`) is importable so the test can train a single-process
reference on the whole batches. Each rank writes ``result<rank>.json``.
"""

from __future__ import annotations

import json
import os
import sys

import torch

LR = 1e-2
STEPS = 6            # optimizer steps
ACCUMULATION = 2     # micro-batches per optimizer step
PER_RANK = 16        # examples per rank per micro-batch
WORLD = 2
DECAYS = (0.9, 0.99)


def make_model() -> torch.nn.Module:
    from scope_helpers import Denoiser

    torch.manual_seed(0)
    model = Denoiser()
    model.net[2].p = 0.0  # no dropout: every process computes the same function
    return model


def batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Whole micro-batches ``(x, noise, sigma)`` of ``WORLD * PER_RANK`` examples each."""
    from scope_helpers import mixture

    g = torch.Generator().manual_seed(7)
    data = mixture(512, 3)
    out = []
    for _ in range(STEPS * ACCUMULATION):
        x = data[torch.randint(0, len(data), (WORLD * PER_RANK,), generator=g)]
        out.append((x, torch.randn(x.shape, generator=g), 0.2 + torch.rand(len(x), generator=g)))
    return out


def loss_of(model: torch.nn.Module, x: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return ((model(x + sigma[:, None] * noise, sigma) - x) ** 2).mean()


def main(out_dir: str) -> None:
    from accelerate import Accelerator

    from emascope import attach

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATION)
    rank = acc.process_index
    model = make_model()
    model, opt = acc.prepare(model, torch.optim.Adam(model.parameters(), lr=LR))
    scope = attach(model, opt, run_dir=os.path.join(out_dir, "run"), decays=DECAYS, score_every=3,
                   evaluate=lambda m: {"val": float(loss_of(m, *batches()[0]))}, metric_directions={"val": "lower"})
    for x, noise, sigma in batches():
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        with acc.accumulate(model):
            acc.backward(loss_of(model, x[part], noise[part], sigma[part]))
            opt.step()
            opt.zero_grad()
    scope.close()
    result = {"rank": rank, "world": acc.num_processes, "pid": os.getpid(), "backend": torch.distributed.get_backend(),
              "distributed_type": str(acc.distributed_type), "is_writer": scope.is_writer,
              "current_step": scope.current_step, "bank_is_none": scope.bank is None}
    with open(os.path.join(out_dir, f"result{rank}.json"), "w") as f:
        json.dump(result, f)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
