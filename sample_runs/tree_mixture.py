"""A 2-D tree-shaped Gaussian mixture with an exact log-density (after Karras et al. 2024,
"Guiding a Diffusion Model with a Bad Version of Itself", whose toy is a tree of this kind).

Shape: a trunk that splits recursively into two branches per node. Every branch is a chain of
elongated Gaussians laid along its segment (long axis along the branch). The probability mass of
all branches at depth ``k`` is half that at depth ``k - 1``, so each of the ``2**k`` branches at
depth ``k`` holds ``~4**-k`` of the mass: deep ("tail") branches are rare.

Units: coordinates are dimensionless, the mixture is rescaled so its overall standard deviation
is about 1 (what a flow-matching model with unit Gaussian noise expects). All math is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: 99% quantile of a chi-square with 2 degrees of freedom: a point is "on" a component when its
#: squared Mahalanobis distance to the component is below this.
CHI2_2DOF_99 = -2.0 * math.log(0.01)


@dataclass(frozen=True)
class TreeMixture:
    """Mixture components: ``means`` [M, 2], ``scale_tril`` [M, 2, 2] (Cholesky factors of the
    covariances), ``log_weights`` [M] (normalised), ``depth`` [M] (branch depth, trunk = 0)."""

    means: torch.Tensor
    scale_tril: torch.Tensor
    log_weights: torch.Tensor
    depth: torch.Tensor

    @property
    def num_components(self) -> int:
        return len(self.means)

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())

    def depth_mass(self) -> torch.Tensor:
        """True probability mass per depth, float64 ``[max_depth + 1]`` (sums to 1)."""
        w = self.log_weights.exp()
        return torch.zeros(self.max_depth + 1, dtype=torch.float64).index_add_(0, self.depth, w)

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log N(x | mu_m, Sigma_m)`` for every point and component, float64 ``[n, M]``."""
        x = _as_points(x)
        diff = x[:, None, :] - self.means[None]                       # [n, M, 2]
        # y = L^-1 diff per component, so the squared Mahalanobis distance is |y|^2.
        y = torch.einsum("mij,nmj->nmi", torch.linalg.inv(self.scale_tril), diff)
        log_det = self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # log sqrt(det Sigma)
        return -0.5 * y.square().sum(-1) - log_det[None] - math.log(2.0 * math.pi)

    def log_prob(self, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """Exact log-density ``log sum_m w_m N(x | mu_m, Sigma_m)``, float64 ``[n]``."""
        x = _as_points(x)
        out = [torch.logsumexp(self.component_log_prob(c) + self.log_weights[None], dim=1)
               for c in x.split(chunk)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` exact samples, float32 ``[n, 2]``; all randomness from ``generator`` (CPU)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        comp = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        x = self.means[comp] + (self.scale_tril[comp] @ z[..., None]).squeeze(-1)
        return x.float()

    def assign(self, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """Depth of the branch each point lies on, ``-1`` for points on no component.

        A point lies on the most likely component (highest ``w_m N(x | m)``) when its squared
        Mahalanobis distance to it is below :data:`CHI2_2DOF_99`. int64 ``[n]``.
        """
        x = _as_points(x)
        out = []
        for c in x.split(chunk):
            lp = self.component_log_prob(c)
            best = (lp + self.log_weights[None]).argmax(dim=1)
            log_det = self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            maha2 = -2.0 * (lp.gather(1, best[:, None]).squeeze(1) + log_det[best] + math.log(2 * math.pi))
            out.append(torch.where(maha2 <= CHI2_2DOF_99, self.depth[best], torch.full_like(best, -1)))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def _as_points(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"expected points of shape [n, 2], got {tuple(x.shape)}")
    return x.detach().to("cpu", torch.float64)


def make_tree(depth: int = 4, components_per_branch: int = 3, *, trunk_length: float = 1.6,
              length_ratio: float = 0.72, split_angle_deg: float = 32.0, width: float = 0.08,
              width_ratio: float = 0.8) -> TreeMixture:
    """Build the tree: a trunk plus ``depth`` levels of binary splits.

    ``trunk_length``: length of the trunk before rescaling; each child is ``length_ratio`` times
    its parent and turns by ``+-split_angle_deg`` degrees; ``width``: the Gaussians' std across
    the branch (times ``width_ratio`` per depth). The std along the branch is chosen so that
    neighbouring Gaussians of a chain overlap. Finally the whole mixture is centred and scaled
    to an overall standard deviation of about 1.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if components_per_branch < 1:
        raise ValueError(f"components_per_branch must be >= 1, got {components_per_branch}")
    if not 0 < length_ratio <= 1:
        raise ValueError(f"length_ratio must be in (0, 1], got {length_ratio}")
    means, trils, weights, depths = [], [], [], []
    # (start point, direction angle in radians, length, depth)
    stack = [((0.0, 0.0), math.pi / 2, trunk_length, 0)]
    while stack:
        (x0, y0), ang, length, k = stack.pop()
        dx, dy = math.cos(ang), math.sin(ang)
        along = length / components_per_branch * 0.55
        across = width * width_ratio ** k
        rot = torch.tensor([[dx, -dy], [dy, dx]], dtype=torch.float64)
        cov = rot @ torch.diag(torch.tensor([along ** 2, across ** 2], dtype=torch.float64)) @ rot.T
        tril = torch.linalg.cholesky(cov)
        branch_weight = 0.5 ** k / 2 ** k  # depth mass halves; split evenly over 2**k branches
        for i in range(components_per_branch):
            f = (i + 0.5) / components_per_branch
            means.append((x0 + f * length * dx, y0 + f * length * dy))
            trils.append(tril)
            weights.append(branch_weight / components_per_branch)
            depths.append(k)
        if k < depth:
            end = (x0 + length * dx, y0 + length * dy)
            turn = math.radians(split_angle_deg)
            for s in (-1.0, 1.0):
                stack.append((end, ang + s * turn, length * length_ratio, k + 1))
    mu = torch.tensor(means, dtype=torch.float64)
    tril = torch.stack(trils)
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    # Standardise: overall mean 0 and the larger axis std 1 (law of total variance).
    centre = (w[:, None] * mu).sum(0)
    cov_total = (w[:, None, None] * (tril @ tril.transpose(1, 2))).sum(0) + \
        (w[:, None, None] * ((mu - centre)[:, :, None] * (mu - centre)[:, None, :])).sum(0)
    scale = 1.0 / math.sqrt(float(cov_total.diagonal().max()))
    return TreeMixture(means=(mu - centre) * scale, scale_tril=tril * scale, log_weights=w.log(),
                       depth=torch.tensor(depths, dtype=torch.int64))


def mean_log_likelihood(tree: TreeMixture, samples: torch.Tensor) -> float:
    """Mean of ``log p_true(x)`` over the samples (nats per sample; higher = closer to the data)."""
    return float(tree.log_prob(samples).mean())


def tail_share(tree: TreeMixture, points: torch.Tensor, tail_depth: int) -> float:
    """Share of ``points`` lying on branches of depth >= ``tail_depth`` (see :meth:`assign`)."""
    if len(points) == 0:
        raise ValueError("tail_share needs at least one point")
    return float((tree.assign(points) >= tail_depth).double().mean())


def tail_coverage(tree: TreeMixture, samples: torch.Tensor, tail_depth: int, true_share: float) -> float:
    """Tail coverage ``= tail_share(samples) / true_share`` (dimensionless, 1 = exact).

    ``tail_share(x)`` is the fraction of points ``x`` that lie on a component of depth
    ``>= tail_depth``, where a point lies on component ``m* = argmax_m w_m N(x | mu_m, Sigma_m)``
    if its squared Mahalanobis distance to ``m*`` is at most :data:`CHI2_2DOF_99` (the 99%
    quantile of chi-square with 2 dof), and on no component otherwise (:meth:`TreeMixture.assign`).
    ``true_share`` is the same fraction for exact samples of the mixture (the same gate, so its
    misses cancel in the ratio). Below 1 the rare deep branches are under-covered (soft mode
    collapse), above 1 over-covered; off-tree samples count as not on the tail.
    """
    if not true_share > 0:
        raise ValueError(f"true_share must be > 0, got {true_share}")
    return tail_share(tree, samples, tail_depth) / true_share
