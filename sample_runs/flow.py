"""Flow matching (rectified flow), the training objective and sampler of both sample models.

Conventions (one function per equation):

- time ``t`` in [0, 1]: ``t = 0`` is data, ``t = 1`` is pure Gaussian noise;
- interpolant (Eq. FM-1): ``x_t = (1 - t) * x_0 + t * eps``;
- velocity target (Eq. FM-2): ``v = d x_t / dt = eps - x_0``;
- the model is called as ``model(x_t, t)`` with ``t`` of shape ``[n]`` and predicts ``v``;
- :class:`Preconditioned` wraps a raw network ``F`` the EDM way (Karras et al. 2022, Eq. 7,
  rewritten for this interpolant, Eq. FM-5): ``x0_hat = c_skip x_t + c_out F(c_in x_t, t)`` and
  ``v = (x_t - x0_hat) / t``, so ``F`` always sees and predicts unit-variance quantities;
- sampling integrates ``dx/dt = v(x, t)`` from ``t = 1`` down to ``t = 0`` with Heun's method
  (Eq. FM-3) on a grid that is denser near the data end (Eq. FM-4).

All randomness comes from an explicit ``torch.Generator`` so that runs and samples are
reproducible and every EMA variant can be sampled with the same noise.
"""

from __future__ import annotations

import torch
from torch import nn


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eq. FM-1: ``x_t = (1 - t) x_0 + t eps``; ``t`` has shape ``[n]`` and broadcasts."""
    tt = t.reshape(-1, *([1] * (x0.dim() - 1)))
    return (1.0 - tt) * x0 + tt * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Eq. FM-2: the conditional velocity ``eps - x_0``."""
    return eps - x0


def sample_times(n: int, generator: torch.Generator, *, device: torch.device | str = "cpu",
                 logit_mean: float = -1.2, logit_std: float = 1.2) -> torch.Tensor:
    """Training times ``t`` from a logit-normal law: ``logit(t) ~ N(logit_mean, logit_std^2)``.

    For this interpolant ``x_t / (1 - t) = x_0 + sigma eps`` with ``sigma = t / (1 - t)``, so
    ``logit(t) = log(sigma)`` and the defaults are EDM's log-normal noise levels (P_mean = -1.2,
    P_std = 1.2, Karras et al. 2022), which weight the low-noise end where thin structure is learned.
    """
    z = torch.randn(n, generator=generator, device=device)
    return torch.sigmoid(logit_mean + logit_std * z)


def precond_coefficients(t: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """Eq. FM-5: ``c_in, c_skip, c_out`` for ``x_t = (1 - t) x_0 + t eps`` with data std ``sigma_data``.

    ``Var[x_t] = (1 - t)^2 sigma_data^2 + t^2``; ``c_in = 1 / sqrt(Var)``; the x_0-optimal skip is
    ``c_skip = (1 - t) sigma_data^2 / Var`` and the residual std ``c_out = t sigma_data / sqrt(Var)``.
    """
    var = (1.0 - t) ** 2 * sigma_data ** 2 + t ** 2
    return var.rsqrt(), (1.0 - t) * sigma_data ** 2 / var, t * sigma_data * var.rsqrt()


class Preconditioned(nn.Module):
    """EDM-style wrapper: ``forward(x_t, t)`` returns the velocity, ``net`` is the trained network."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.net = net
        self.sigma_data = float(sigma_data)

    def _coef(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shape = (-1, *([1] * (x.dim() - 1)))
        return tuple(c.reshape(shape) for c in precond_coefficients(t.to(x.dtype), self.sigma_data))

    def denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x0_hat = c_skip x_t + c_out F(c_in x_t, t)``."""
        c_in, c_skip, c_out = self._coef(x, t)
        return c_skip * x + c_out * self.net(c_in * x, t)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1))).clamp_min(1e-4)
        return (x - self.denoise(x, t)) / tt


def flow_matching_loss(model: nn.Module, x0: torch.Tensor, generator: torch.Generator, *,
                       logit_mean: float = -1.2, logit_std: float = 1.2) -> torch.Tensor:
    """Training loss (a scalar) for one batch of data ``x0``; times from :func:`sample_times`.

    For a :class:`Preconditioned` model: EDM's loss, the MSE between ``F(c_in x_t, t)`` and its
    target ``(x_0 - c_skip x_t) / c_out``. Otherwise: the MSE between ``model(x_t, t)`` and the
    velocity target (Eq. FM-2).
    """
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = sample_times(len(x0), generator, device=x0.device, logit_mean=logit_mean,
                     logit_std=logit_std).to(x0.dtype)
    xt = interpolate(x0, eps, t)
    if isinstance(model, Preconditioned):
        c_in, c_skip, c_out = model._coef(x0, t)
        return (model.net(c_in * xt, t) - (x0 - c_skip * xt) / c_out).square().mean()
    return (model(xt, t) - velocity_target(x0, eps)).square().mean()


def time_grid(num_steps: int, rho: float = 2.0, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """Eq. FM-4: ``t_i = (1 - i / num_steps) ** rho`` for i = 0..num_steps (1 -> 0, denser near 0)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    i = torch.arange(num_steps + 1, dtype=torch.float64, device=device)
    return (1.0 - i / num_steps) ** rho


@torch.no_grad()
def sample_heun(model: nn.Module, noise: torch.Tensor, num_steps: int = 16, rho: float = 2.0) -> torch.Tensor:
    """Eq. FM-3: integrate ``dx/dt = v(x, t)`` from ``noise`` at t=1 to t=0 with Heun's method.

    The last step (to t = 0) is a plain Euler step, as in EDM. Deterministic given ``noise``.
    """
    ts = time_grid(num_steps, rho, device=noise.device).to(noise.dtype)
    x = noise
    n = len(noise)
    for i in range(num_steps):
        t_cur, t_next = ts[i], ts[i + 1]
        dt = t_next - t_cur
        v_cur = model(x, t_cur.expand(n))
        x_euler = x + dt * v_cur
        if i < num_steps - 1:
            v_next = model(x_euler, t_next.expand(n))
            x = x + dt * 0.5 * (v_cur + v_next)
        else:
            x = x_euler
    return x
