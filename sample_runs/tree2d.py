"""Sample 1, ``tree2d``: a small flow-matching MLP on the 2-D tree mixture, with the agent attached.

```bash
python -m emascope.samples.tree2d --run-dir runs/tree2d          # 8000 Adam steps on CPU, 8 stages
emascope dashboard runs/tree2d
```

The training loop below is an ordinary PyTorch loop; emascope is attached to it with one
``attach(...)`` call (default decay sweep, identity features -> FD, precision, recall, density,
coverage) plus two metrics only a toy with a known density allows, computed by :class:`TreeMetrics`
through ``attach(sample_metrics=...)``:

- ``log_likelihood``: mean ``log p_true(x)`` of the samples under the exact mixture (nats per
  sample, higher is better);
- ``tail_coverage``: the share of samples lying on deep branches (depth >= ``tail_depth``) divided
  by the true share, see :func:`emascope.samples.tree_mixture.tail_coverage` (1 = the rare branches get
  exactly their mass; < 1 = soft mode collapse; > 1 = over-covered).

Both are computed on exactly the samples the agent scores: the agent hands ``sample_metrics`` the
``num_samples`` points it drew for each variant (the ones its FD, precision, ... and preview come
from), so nothing is drawn twice and every variant is judged on the same noise (common random
numbers). Both are means over the samples, so :class:`TreeMetrics` returns them per sample (one
number per point, emascope's convention for such metrics): the agent records their mean and gets
their intervals from the same half-samples as every other metric, at no extra cost.

The noise floor of every metric comes from ``attach(exact_samples=...)``: ``num_samples`` exact
samples of the mixture, scored by the agent exactly like a variant (what a perfect model gets).

Steps are optimizer steps; decays are EMA decays ``d`` in ``ema <- d * ema + (1 - d) * theta``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emascope import attach
from emascope.config import check_int
from emascope.samples.flow import Preconditioned, sample_heun
from emascope.samples.models import MLPDenoiser
from emascope.samples.training import Progress, parse, run_sample, sample_parser, train_flow
from emascope.samples.tree_mixture import (
    TreeMixture,
    make_tree,
    mean_log_likelihood,
    tail_coverage,
    tail_share,
)

#: Directions of the two custom metrics (run.json ``metric_directions``).
TREE_METRIC_DIRECTIONS = {"log_likelihood": "higher", "tail_coverage": "higher"}


@dataclass
class Tree2DConfig:
    """Settings of the tree2d sample (counts are optimizer steps or numbers of points)."""

    steps: int = 8000             # optimizer steps
    batch_size: int = 512         # training points per step (fresh exact samples each step)
    lr: float = 2e-3              # Adam learning rate (constant)
    hidden: int = 128             # MLP width
    layers: int = 4               # MLP hidden layers
    sigma_data: float = 0.8       # EDM preconditioning: data std (the tree's std is ~0.5 x ~1.0)
    score_every: int = 1000       # scoring stages every this many steps (+ one at the end)
    num_samples: int = 4000       # samples per variant per stage
    sample_batch: int = 1000      # samples per sampler call (batch b drawn with seed hash(seed, b))
    reference_size: int = 4000    # exact mixture samples used as the reference set
    sample_steps: int = 16        # Heun steps of the sampler (31 model calls)
    tail_depth: int = 3           # branches of this depth and deeper are the "tail"
    kid_subset_size: int = 500    # KID subset size (torch-fidelity's 1000 costs ~4x more per variant)
    seed: int = 0                 # training seed; scoring uses seed + 1, the reference seed + 2
    decays: tuple[float, ...] | None = None  # None: emascope's default sweep
    tree: dict[str, Any] = field(default_factory=dict)  # make_tree(**tree)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "hidden", "layers", "score_every", "num_samples", "sample_batch",
                     "reference_size", "sample_steps", "tail_depth", "kid_subset_size"):
            check_int(name, getattr(self, name), 1)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def build_model(cfg: Tree2DConfig) -> Preconditioned:
    """The velocity model: an EDM-preconditioned :class:`MLPDenoiser` on 2-D points."""
    return Preconditioned(MLPDenoiser(dim=2, hidden=cfg.hidden, depth=cfg.layers), sigma_data=cfg.sigma_data)


def make_sampler(sample_steps: int) -> Callable[[nn.Module, int, torch.Generator], torch.Tensor]:
    """The agent's sampler: Gaussian noise from ``generator`` -> Heun ODE solve -> points ``[n, 2]``."""

    def sampler(model: nn.Module, n: int, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(n, 2, generator=generator, device=generator.device)
        return sample_heun(model, noise, num_steps=sample_steps)

    return sampler


class TreeMetrics:
    """``attach(sample_metrics=...)`` hook: log-likelihood and tail coverage of the agent's samples.

    ``true_tail_share`` is measured once on ``true_size`` exact samples with the same gate
    (:meth:`TreeMixture.assign`), so gate effects cancel in the ratio.
    """

    def __init__(self, tree: TreeMixture, cfg: Tree2DConfig, *, true_size: int = 200_000) -> None:
        self.tree, self.cfg = tree, cfg
        exact = tree.sample(true_size, torch.Generator().manual_seed(cfg.seed + 3))
        self.true_tail_share = tail_share(tree, exact, cfg.tail_depth)

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample values of the two metrics for one variant's samples ``x`` (``[n, 2]`` points, CPU):
        ``log_likelihood`` = ``log p_true(x_i)`` (nats) and ``tail_coverage`` = ``1[x_i on a branch of
        depth >= tail_depth] / true_tail_share``; each metric is the mean of its ``[n]`` values
        (:func:`~emascope.samples.tree_mixture.mean_log_likelihood`,
        :func:`~emascope.samples.tree_mixture.tail_coverage`)."""
        on_tail = (self.tree.assign(x) >= self.cfg.tail_depth).double()
        return {"log_likelihood": self.tree.log_prob(x), "tail_coverage": on_tail / self.true_tail_share}

    def means(self, x: torch.Tensor) -> dict[str, float]:
        """The two metrics themselves (the means of :meth:`__call__`)."""
        return {k: float(v.mean()) for k, v in self(x).items()}


def exact_baseline(cfg: Tree2DConfig | None = None,
                   seeds: Sequence[int] = range(10, 16)) -> dict[str, list[float]]:
    """The run's metrics for *exact* mixture samples (``cfg.num_samples`` per seed) against the run's
    reference set: the noise floor of each metric at this sample size (what a perfect model scores).

    Uses the agent's metric functions (``emascope.metrics``) with the same settings as the run.
    """
    from emascope import metrics as M

    cfg = cfg or Tree2DConfig()
    tree = make_tree(**cfg.tree)
    ref = tree.sample(cfg.reference_size, torch.Generator().manual_seed(cfg.seed + 2)).double()
    ref_stats = M.frechet_statistics(ref)
    true_share = TreeMetrics(tree, cfg).true_tail_share
    out: dict[str, list[float]] = {}
    for s in seeds:
        x = tree.sample(cfg.num_samples, torch.Generator().manual_seed(int(s))).double()
        values = {"fd": M.frechet_distance_from_statistics(M.frechet_statistics(x), ref_stats),
                  **M.precision_recall(x, ref), **M.density_coverage(x, ref),
                  "tail_coverage": tail_coverage(tree, x, cfg.tail_depth, true_share),
                  "log_likelihood": mean_log_likelihood(tree, x)}
        for k, v in values.items():
            out.setdefault(k, []).append(float(v))
    return out


def train(run_dir: str | Path, cfg: Tree2DConfig | None = None, *, overwrite: bool = False,
          progress: Progress | None = None, name: str = "tree2d",
          score_at_close: bool = True) -> Path:
    """Train the tree2d model with the agent attached; returns the run directory.

    ``score_at_close=False`` skips the final sweep when training stops before a stage (Ctrl-C).
    ``progress(step, total)`` is called after every optimizer step (for progress bars).
    """
    cfg = cfg or Tree2DConfig()
    torch.manual_seed(cfg.seed)
    tree = make_tree(**cfg.tree)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    reference = tree.sample(cfg.reference_size, torch.Generator().manual_seed(cfg.seed + 2))
    exact = tree.sample(cfg.num_samples, torch.Generator().manual_seed(cfg.seed + 4))  # the noise floor
    scope = attach(model, opt, run_dir=run_dir, name=name, overwrite=overwrite,
                   score_at_close=score_at_close,
                   sampler=make_sampler(cfg.sample_steps), reference=reference, feature_extractor="identity",
                   sample_metrics=TreeMetrics(tree, cfg), metric_directions=TREE_METRIC_DIRECTIONS,
                   exact_samples=exact,
                   score_every=cfg.score_every, score_busy="wait",  # every stage scored, in the background
                   num_samples=cfg.num_samples, batch_size=cfg.sample_batch,
                   kid_subset_size=cfg.kid_subset_size,
                   seed=cfg.seed + 1, decays=cfg.decays)
    train_flow(model, opt, scope, steps=cfg.steps, draw_batch=lambda g: tree.sample(cfg.batch_size, g),
               generator=data_gen, progress=progress)
    return Path(run_dir)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = sample_parser("tree2d", __doc__.split("\n")[0], Tree2DConfig)
    p.add_argument("--exact-baseline", action="store_true",
                   help="print the metrics of exact samples (the noise floor at this sample size) and exit")
    return parse(p, argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.exact_baseline:
        cfg = Tree2DConfig(num_samples=args.num_samples, seed=args.seed)
        for name, values in exact_baseline(cfg).items():
            print(f"{name:>15}: {min(values):.4g} .. {max(values):.4g} (exact samples, {len(values)} seeds)")
        return 0
    return run_sample("tree2d", args, Tree2DConfig, train)


if __name__ == "__main__":
    sys.exit(main())
