"""Shared pieces of the agent tests: a tiny MLP denoiser on 2-D data, its sampler and training step.

Real training, no mocks: Adam on a 4-mode Gaussian mixture, denoising loss over a few noise
levels, and a deterministic few-step sampler driven only by the generator it is given.
"""

from __future__ import annotations

import torch
from torch import nn

SIGMAS = (1.5, 0.8, 0.4, 0.15, 0.0)


def mixture(n: int, seed: int) -> torch.Tensor:
    """``n`` points of a 4-mode 2-D Gaussian mixture (float32 ``[n, 2]``)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    idx = torch.randint(0, 4, (n,), generator=g)
    return centres[idx] + 0.15 * torch.randn(n, 2, generator=g)


class Denoiser(nn.Module):
    """``D(x, sigma)`` -> estimate of the clean point. Has a dropout layer, so train/eval matters."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Dropout(0.1), nn.Linear(width, width),
                                 nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1).expand(len(x), 1)
        return x + self.net(torch.cat([x, s], dim=1))


def sampler(model: nn.Module, n: int, generator: torch.Generator) -> torch.Tensor:
    """Deterministic DDIM-style sampler: all randomness comes from ``generator``."""
    x = SIGMAS[0] * torch.randn(n, 2, generator=generator)
    for s, s_next in zip(SIGMAS[:-1], SIGMAS[1:], strict=True):
        x0 = model(x, s)
        x = x0 + (s_next / s) * (x - x0)
    return x


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, data: torch.Tensor,
               g: torch.Generator, batch: int = 64) -> float:
    """One denoising step on a random batch (data/noise from ``g``, dropout from the global generator)."""
    x = data[torch.randint(0, len(data), (batch,), generator=g)]
    sigma = torch.tensor(SIGMAS[:-1])[torch.randint(0, len(SIGMAS) - 1, (batch,), generator=g)]
    noisy = x + sigma[:, None] * torch.randn(x.shape, generator=g)
    loss = ((model(noisy, sigma) - x) ** 2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def val_loss(model: nn.Module, data: torch.Tensor, sigma: float = 0.4, seed: int = 123) -> float:
    """Denoising loss on held-out data at one noise level (fixed noise)."""
    g = torch.Generator().manual_seed(seed)
    noisy = data + sigma * torch.randn(data.shape, generator=g)
    with torch.no_grad():
        return float(((model(noisy, sigma) - data) ** 2).mean())


def batch_generator(seed: int, batch: int) -> torch.Generator:
    """The generator of sample batch ``batch`` of a sweep seeded with ``seed``, re-derived from the
    documented convention (docs/run-format.md, ``sample_seeding: "batch_sha256"``), not from emascope."""
    import hashlib

    digest = hashlib.sha256(f"{int(seed)}:{int(batch)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def redraw(model: nn.Module, sampler, num_samples: int, batch_size: int, seed: int) -> torch.Tensor:
    """A sweep's samples drawn again: batches of ``batch_size``, batch ``b`` from ``batch_generator``."""
    sizes = [min(batch_size, num_samples - i) for i in range(0, num_samples, batch_size)]
    with torch.no_grad():
        return torch.cat([sampler(model, n, batch_generator(seed, b)) for b, n in enumerate(sizes)])
