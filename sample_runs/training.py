"""What the sample scripts share: the flow-matching training loop with the agent attached, and the
command line (``python -m emascope.samples.tree2d`` / ``digits``).

Steps are optimizer steps. The loop is an ordinary PyTorch loop: the agent follows it through the
optimizer's step hook, nothing in the loop calls emascope.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emascope.samples.flow import flow_matching_loss

Progress = Callable[[int, int], None]


def cosine_lr(step: int, steps: int, warmup: int = 0) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then cosine from 1 to 0 at ``steps``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


def train_flow(model: nn.Module, opt: torch.optim.Optimizer, scope: Any, *, steps: int,
               draw_batch: Callable[[torch.Generator], torch.Tensor], generator: torch.Generator,
               progress: Progress | None = None, lr_scale: Callable[[int], float] | None = None) -> None:
    """``steps`` flow-matching steps on batches from ``draw_batch(generator)``, inside ``with scope``
    (closed at the end; on an exception it is closed without a final sweep). ``lr_scale(step)``:
    multiplier of each parameter group's initial learning rate at optimizer step ``step`` (0-based)."""
    base = [g["lr"] for g in opt.param_groups]
    with scope:
        model.train()
        for step in range(steps):
            if lr_scale is not None:
                for g, lr in zip(opt.param_groups, base, strict=True):
                    g["lr"] = lr * lr_scale(step)
            loss = flow_matching_loss(model, draw_batch(generator), generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()  # the agent's optimizer hook updates the bank (and scores every score_every)
            if progress is not None:
                progress(step + 1, steps)


def sample_parser(sample: str, description: str, defaults: Any) -> argparse.ArgumentParser:
    """The options every sample script takes; ``defaults`` is the sample's config class."""
    p = argparse.ArgumentParser(prog=f"python -m emascope.samples.{sample}", description=description)
    p.add_argument("--run-dir", default=f"runs/{sample}", help=f"run directory to write (default runs/{sample})")
    p.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    p.add_argument("--score-every", type=int, default=defaults.score_every, help="steps between stages")
    p.add_argument("--num-samples", type=int, default=defaults.num_samples, help="samples per variant per stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --run-dir")
    return p


def run_sample(sample: str, args: argparse.Namespace, config_cls: type,
               train: Callable[..., Path], **train_kwargs: Any) -> int:
    """Build the config from the common options, train, print a summary; returns the exit code
    (2 with a message for a bad setting or a run directory that already holds a run)."""
    try:
        cfg = config_cls(steps=args.steps, score_every=args.score_every, num_samples=args.num_samples,
                         seed=args.seed)
    except ValueError as exc:
        print(f"{sample}: {exc}", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        train(args.run_dir, cfg, overwrite=args.overwrite, **train_kwargs)
    except ValueError as exc:  # e.g. the run directory already holds a run
        print(f"{sample}: {exc}", file=sys.stderr)
        return 2
    print(f"{sample}: {cfg.steps} steps in {time.time() - t0:.0f} s -> {args.run_dir}")
    print(f"settings: {asdict(cfg)}")
    return 0


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    return parser.parse_args(list(sys.argv[1:] if argv is None else argv))
