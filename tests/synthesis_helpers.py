"""A real training trajectory with the agent attached (stage and lead-in snapshots on disk) and float64
EMAs computed directly beside it, for the post-hoc synthesis tests.

The references here are written from the equations (an EMA started at the attach weights, EDM2's
power-function EMA with ``beta_t = (1 - 1/t)**(gamma + 1)``), not from emascope's profile module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from scope_helpers import Denoiser, mixture, train_step

from emascope import attach


def gamma_of(sigma_rel: float) -> float:
    """EDM2 Eq. 126 solved independently: the largest real root of g^3 + 7g^2 + (16 - t)g + 12 - t."""
    import numpy as np

    t = sigma_rel ** -2
    return float(max(r.real for r in np.roots([1, 7, 16 - t, 12 - t]) if abs(r.imag) < 1e-9))


@dataclass
class Trajectory:
    run_dir: Path
    steps: int
    names: list[str]
    ema: dict[float, torch.Tensor]          # float64 flat EMA per target decay at the last step
    power: dict[float, torch.Tensor]        # float64 flat power-function EMA per sigma_rel
    extra: dict[str, object] = field(default_factory=dict)

    def flat(self, sd: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([sd[k].double().reshape(-1) for k in self.names])


def train_with_references(run_dir: Path, *, steps: int, score_every: int, decays_ref: list[float],
                          sigma_rels: list[float], width: int = 32, seed: int = 0, **attach_kw) -> Trajectory:
    """Adam on the 2-D mixture denoiser for ``steps`` steps with the agent attached (no scoring
    hooks: stages only write their snapshots), float64 EMAs of ``decays_ref`` and power EMAs of
    ``sigma_rels`` tracked beside it from the attach weights."""
    torch.manual_seed(seed)
    model = Denoiser(width)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    data, g = mixture(2000, seed), torch.Generator().manual_seed(seed)
    names = [k for k, _ in model.named_parameters()]

    def flat() -> torch.Tensor:
        return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])

    th = flat()
    d = torch.tensor(decays_ref, dtype=torch.float64)[:, None]
    ema = th[None].repeat(len(decays_ref), 1)
    gam = [gamma_of(s) for s in sigma_rels]
    pw = th[None].repeat(len(sigma_rels), 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only cost (badly so on a shared machine)
    try:
        scope = attach(model, opt, run_dir=run_dir, score_every=score_every, **attach_kw)
        for t in range(1, steps + 1):
            model.train()
            train_step(model, opt, data, g)
            th = flat()
            ema = d * ema + (1 - d) * th[None]
            if gam:
                beta = torch.tensor([(1 - 1 / t) ** (x + 1) for x in gam], dtype=torch.float64)[:, None]
                pw = beta * pw + (1 - beta) * th[None]
        scope.close()
    finally:
        torch.set_num_threads(threads)
    return Trajectory(run_dir, steps, names, dict(zip(decays_ref, ema, strict=True)),
                      dict(zip(sigma_rels, pw, strict=True)))
