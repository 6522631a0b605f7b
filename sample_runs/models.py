"""The two small velocity models of the sample runs (flow matching, see sample_runs/flow.py).

Both are called as ``model(x_t, t)`` with ``t`` of shape ``[n]`` in [0, 1] and return the
predicted velocity, same shape as ``x_t``. Neither has buffers: every tensor is a parameter, so
the EMA bank averages the whole model.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def time_features(t: torch.Tensor, num_frequencies: int) -> torch.Tensor:
    """Sinusoidal features of ``t`` [n]: ``sin/cos(pi * 2**k * t)``, k < num_frequencies -> [n, 2F]."""
    freqs = math.pi * 2.0 ** torch.arange(num_frequencies, device=t.device, dtype=t.dtype)
    ang = t[:, None] * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], dim=1)


class MLPDenoiser(nn.Module):
    """Velocity MLP for low-dimensional points: [x, time features] -> ``depth`` SiLU layers -> v."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 4, num_frequencies: int = 8) -> None:
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1 or num_frequencies < 1:
            raise ValueError(f"dim, hidden, depth and num_frequencies must be >= 1, got "
                             f"{dim}, {hidden}, {depth}, {num_frequencies}")
        self.dim = dim
        self.num_frequencies = num_frequencies
        layers: list[nn.Module] = []
        width = dim + 2 * num_frequencies
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, time_features(t.to(x.dtype), self.num_frequencies)], dim=1))


class ImageMLPDenoiser(nn.Module):
    """Velocity MLP for small images: flattens ``[n, C, H, W]`` to ``[n, C*H*W]``, runs an
    :class:`MLPDenoiser` on it and reshapes back. On 8x8 digits a wide MLP learns the data faster per
    CPU second than a convolutional net (dense matrix products, no 8x8 convolutions)."""

    def __init__(self, shape: tuple[int, int, int] = (1, 8, 8), hidden: int = 1024, depth: int = 4,
                 num_frequencies: int = 8) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.mlp = MLPDenoiser(dim=math.prod(self.shape), hidden=hidden, depth=depth,
                               num_frequencies=num_frequencies)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.flatten(1), t).view(len(x), *self.shape)


class ConvDenoiser(nn.Module):
    """Velocity CNN for small grayscale images [n, 1, 8, 8]: conv blocks with time-conditioned
    per-channel shifts (FiLM-style bias), no down-sampling (8x8 is small enough)."""

    def __init__(self, channels: int = 64, num_blocks: int = 4, num_frequencies: int = 8) -> None:
        super().__init__()
        if channels < 1 or num_blocks < 1 or num_frequencies < 1:
            raise ValueError(f"channels, num_blocks and num_frequencies must be >= 1, got "
                             f"{channels}, {num_blocks}, {num_frequencies}")
        self.num_frequencies = num_frequencies
        self.inp = nn.Conv2d(1, channels, 3, padding=1)
        self.time = nn.Sequential(nn.Linear(2 * num_frequencies, channels), nn.SiLU(),
                                  nn.Linear(channels, channels * num_blocks))
        self.blocks = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(num_blocks))
        self.norms = nn.ModuleList(nn.GroupNorm(8 if channels % 8 == 0 else 1, channels)
                                   for _ in range(num_blocks))
        self.out = nn.Conv2d(channels, 1, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shifts = self.time(time_features(t.to(x.dtype), self.num_frequencies))
        shifts = shifts.view(len(x), len(self.blocks), -1, 1, 1)
        h = self.inp(x)
        for i, (conv, norm) in enumerate(zip(self.blocks, self.norms, strict=True)):
            h = h + conv(self.act(norm(h) + shifts[:, i]))  # residual block, time as a bias
        return self.out(self.act(h))
