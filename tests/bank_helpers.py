"""Small models, random training trajectories and float64 reference EMAs for the EMABank tests.

The references here are written from the equations in issue #2 / docs/design.md, not from
agent/ema_math.py, so the tests compare the bank with an independent implementation.
"""

from __future__ import annotations

import torch
from torch import nn

EPS32 = float(torch.finfo(torch.float32).eps)


class TinyNet(nn.Module):
    """Linear -> BatchNorm -> Linear: parameters, float buffers and an int buffer."""

    def __init__(self, d_in: int = 6, d_hidden: int = 12, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.bn = nn.BatchNorm1d(d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class TiedNet(nn.Module):
    """Embedding whose weight is tied to the output projection (as in language models)."""

    def __init__(self, vocab: int = 11, dim: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(self.emb(idx))))


def make_tiny(seed: int = 0, **kw) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kw)


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def random_step(model: nn.Module, gen: torch.Generator, scale: float = 0.1) -> None:
    """One "optimizer step": every trainable parameter takes a random step (a random walk)."""
    for p in model.parameters():
        if p.requires_grad:
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.add_((noise * scale).to(p.dtype))


class ReferenceEMA:
    """Float64 EMAs of named tensors, one per decay, updated every ``m`` steps with ``d**m``.

    ``bias_correction=False``: starts from the tensors at construction.
    ``bias_correction=True``: zero start, read out as ``z / (1 - (d**m)**n)`` (Adam style).
    """

    def __init__(self, tensors: dict[str, torch.Tensor], decays, update_every: int = 1,
                 bias_correction: bool = False) -> None:
        self.decays = [float(d) for d in decays]
        self.m = update_every
        self.bc = bias_correction
        self.t = 0
        self.n = 0
        start = {k: v.detach().double().clone() for k, v in tensors.items()}
        self.avg = {d: {k: (torch.zeros_like(v) if bias_correction else v.clone()) for k, v in start.items()}
                    for d in self.decays}

    def step(self, tensors: dict[str, torch.Tensor], finite: bool = True) -> None:
        self.t += 1
        if self.t % self.m != 0 or not finite:
            return
        self.n += 1
        for d in self.decays:
            b = d ** self.m
            for k, v in tensors.items():
                a = self.avg[d][k]
                self.avg[d][k] = b * a + (1.0 - b) * v.detach().double()

    def value(self, d: float) -> dict[str, torch.Tensor]:
        if not self.bc:
            return self.avg[d]
        den = 1.0 - (d ** self.m) ** self.n
        return {k: v / den for k, v in self.avg[d].items()}


class ReferenceBEMA:
    """Direct float64 BEMA (arXiv 2508.00180) from the formulas in issue #2, with the burn-in ``tau``
    and update frequency ``phi`` of the paper (TRL's ``update_after`` / ``update_freq``).

    The bank sees every ``m``-th step only. Before ``tau`` the output is the live weights; at
    ``t = tau > 0``: ``theta_0 = EMA = theta_tau``; at ``t = tau + k phi`` (k >= 1, ``phi`` default
    ``m``): ``EMA_t = (1 - beta_t) EMA + beta_t theta_t``, ``beta_t = max((rho + gamma t)**-kappa,
    beta_min)``; read out at step ``t`` as ``EMA + alpha_t (theta_t - theta_0)``,
    ``alpha_t = (rho + gamma t)**-eta``.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], *, kappa=0.5, eta=0.2, rho=10.0, gamma=1.0,
                 beta_min=0.0, tau: int = 0, phi: int | None = None, update_every: int = 1) -> None:
        self.kappa, self.eta, self.rho, self.gamma, self.beta_min = kappa, eta, rho, gamma, beta_min
        self.m, self.tau, self.phi = update_every, tau, phi or update_every
        self.t = 0
        self.theta0 = {k: v.detach().double().clone() for k, v in tensors.items()}
        self.ema = {k: v.clone() for k, v in self.theta0.items()}

    def step(self, tensors: dict[str, torch.Tensor], finite: bool = True) -> None:
        self.t += 1
        if self.t % self.m != 0 or not finite or self.t < self.tau:
            return
        if self.t == self.tau:
            self.theta0 = {k: v.detach().double().clone() for k, v in tensors.items()}
            self.ema = {k: v.clone() for k, v in self.theta0.items()}
            return
        if (self.t - self.tau) % self.phi:
            return
        beta = max((self.rho + self.gamma * self.t) ** (-self.kappa), self.beta_min)
        for k, v in tensors.items():
            self.ema[k] = (1.0 - beta) * self.ema[k] + beta * v.detach().double()

    def value(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.t < self.tau:
            return {k: v.detach().double() for k, v in tensors.items()}
        alpha = (self.rho + self.gamma * self.t) ** (-self.eta)
        return {k: self.ema[k] + alpha * (v.detach().double() - self.theta0[k]) for k, v in tensors.items()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in b)


def max_abs(a: dict[str, torch.Tensor]) -> float:
    return max(float(v.double().abs().max()) for v in a.values())
