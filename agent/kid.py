"""Kernel Inception Distance with torch on the feature device: torch-fidelity's estimator and subsets.

KID (Binkowski et al. 2018, "Demystifying MMD GANs", Eq. 2 with the cubic polynomial kernel) is the
mean over ``S`` random subsets of the unbiased MMD^2 estimate between ``m`` generated and ``m``
reference features:

    k(x, y)   = (gamma * x.y + coef0) ** degree          gamma = 1 / d, coef0 = 1, degree = 3
    MMD^2_s   = (sum_{i != j in G_s} k(g_i, g_j) + sum_{i != j in R_s} k(r_i, r_j)) / (m (m - 1))
                - 2 * sum_{i in G_s, j in R_s} k(g_i, r_j) / m^2

``G_s`` and ``R_s`` are drawn exactly as torch-fidelity's ``kid_features_to_metric`` draws them
(``np.random.RandomState(seed)``, then for each subset ``choice(n_gen, m)`` and ``choice(n_ref, m)``
without replacement), so the values equal torch-fidelity's to float64 rounding (tested to 1e-6).
``kid_mean`` is the mean of the S values, ``kid_std`` their population standard deviation.

Why not torch-fidelity or torchmetrics directly: torch-fidelity builds three ``m x m`` kernel
matrices per subset in numpy (100 subsets: most of a small model's sweep); torchmetrics'
``KernelInceptionDistance`` draws its subsets with ``torch.randperm`` from the *global* generator
(other subsets than torch-fidelity's, and it would move the training job's random stream from a
background thread) and recomputes the reference kernels for every variant. Here every kernel
value is computed once per variant, subset sums are indicator-matrix products
(``sum_{i in A, j in B} K_ij = a^T K b``), and the reference side (its subsets and their kernel sums)
is computed once and shared by every variant scored against the same reference (:class:`KIDPlan`).
In low dimension the kernel sums go through the kernel's explicit feature map instead (``(d + 1)^3``
numbers per point: 27 for 2-D features), and subsets that are the whole set are summed once.

Memory: blocks of at most ``block_bytes`` of the kernel matrix plus ``[S, n]`` float64 accumulators.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from emascope.distances import rows_per_block

#: Memory budget (bytes) of one block of kernel values built at a time.
DEFAULT_BLOCK_BYTES = 64 * 2**20
#: Key under which :meth:`KIDPlan.values` leaves a variant's :class:`KIDKernels` in its ``keep`` dict.
KERNELS_KEY = "kid_kernels"


def subset_indices(n_gen: int, n_ref: int, subset_size: int, subsets: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The subsets of torch-fidelity's ``kid_features_to_metric``: ``(gen [S, m], ref [S, m])`` int64.

    One ``np.random.RandomState(seed)``; subset ``s`` draws ``choice(n_gen, m, replace=False)``
    then ``choice(n_ref, m, replace=False)``, in that order.
    """
    rng = np.random.RandomState(seed)
    gen = np.empty((subsets, subset_size), dtype=np.int64)
    ref = np.empty((subsets, subset_size), dtype=np.int64)
    for s in range(subsets):
        gen[s] = rng.choice(n_gen, subset_size, replace=False)
        ref[s] = rng.choice(n_ref, subset_size, replace=False)
    return gen, ref


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, *, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> torch.Tensor:
    """``k(x, y) = (gamma * x.y + coef0) ** degree`` for all pairs: ``[len(x), len(y)]``; gamma = 1/d."""
    g = 1.0 / x.shape[1] if gamma is None else gamma
    k = x @ y.T
    return k.mul_(g).add_(coef0).pow_(degree)  # in place: the same values as the expression, 3x faster


def poly_feature_map(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """The explicit feature map of :func:`polynomial_kernel` (degree 3, coef0 1):
    ``phi(x) = z (x) z (x) z`` with ``z = [sqrt(gamma) x, 1]``, so ``k(x, y) = <phi(x), phi(y)>``;
    ``[n, (d + 1)^3]``."""
    z = torch.cat([x * math.sqrt(gamma), torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
    return (z[:, :, None, None] * z[:, None, :, None] * z[:, None, None, :]).reshape(len(x), -1)


def _self_kernel(x: torch.Tensor) -> torch.Tensor:
    """``k(x_i, x_i)`` for every row (degree 3, gamma 1/d, coef0 1)."""
    return ((x * x).sum(1) / x.shape[1] + 1.0) ** 3


def use_feature_map(d: int, n: int) -> bool:
    """Whether kernel sums over ``n`` points of dimension ``d`` are cheaper through the feature map
    (``(d + 1)^3`` features per point) than through the ``n x n`` kernel matrix."""
    return (d + 1) ** 3 <= max(n, 64)


def _indicator(idx: np.ndarray, n: int, device: torch.device) -> torch.Tensor:
    """``[S, n]`` float64 0/1 rows: row s has ones at ``idx[s]`` (distinct within a row)."""
    rows = torch.as_tensor(idx, device=device)
    out = torch.zeros(rows.shape[0], n, dtype=torch.float64, device=device)
    return out.scatter_(1, rows, 1.0)


def subset_kernel_sums(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
                       exclude_diagonal: bool = False, block_bytes: int = DEFAULT_BLOCK_BYTES,
                       a_of: torch.Tensor | None = None,
                       on_block: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """``[S]``: for every subset s, ``sum_{i in A_s, j in B_s} k(x_i, y_j)`` with ``A``/``B`` given as
    0/1 indicator rows ``a [U, len(x)]``, ``b [S, len(y)]`` (``a_s^T K b_s``). ``a_of [S]``: the row of
    ``a`` subset ``s`` uses (default: row ``s``; several subsets can share one distinct row). With
    ``exclude_diagonal`` (x is y and a is b) the terms ``i == j`` are left out.

    K is built ``block_bytes`` at a time (rows of x); only ``[U, len(y)]`` accumulates.
    ``on_block(start, k)`` sees every block (rows ``start ..`` of K) as it is built.
    """
    rows = rows_per_block(len(y), block_bytes)
    acc = torch.zeros(a.shape[0], len(y), dtype=torch.float64, device=x.device)
    diag = torch.zeros(a.shape[0], dtype=torch.float64, device=x.device)
    for start in range(0, len(x), rows):
        k = polynomial_kernel(x[start:start + rows], y)
        acc.addmm_(a[:, start:start + rows], k)
        if exclude_diagonal:
            d = k.diagonal(offset=start)  # K[i, i] for the rows i of this block
            diag += a[:, start:start + len(d)] @ d
        if on_block is not None:
            on_block(start, k)
    if a_of is not None:
        acc, diag = acc[a_of], diag[a_of]
    return (acc * b).sum(dim=1) - diag


@dataclass
class KIDKernels:
    """One variant's kernel values, kept by :meth:`KIDPlan.values` for its intervals
    (:func:`emascope.uncertainty.kid_replicates`): ``gen [n, n]`` (generated-generated) and ``cross_sums
    [n]`` (each generated point's kernel sum over every reference point), float64."""

    gen: torch.Tensor
    cross_sums: torch.Tensor


@dataclass
class KIDPlan:
    """The reference side of KID, shared by every variant with the same number of samples.

    Holds the reference features (float64, on ``device``), the subsets (as indicator rows; the
    generated side as its distinct rows plus which one each subset uses: when the subset size is the
    number of samples every subset is all of them) and each reference subset's kernel sum
    ``sum_{i != j in R_s} k(r_i, r_j)``. Build it once with :meth:`build`, then call it on each
    variant's features.

    In low dimension (:func:`use_feature_map`: ``(d + 1)^3 <= n_gen``) every kernel sum goes through
    the kernel's explicit feature map instead of the kernel matrix: ``a^T K b = (Phi^T a) . (Phi^T b)``,
    cost ``n (d + 1)^3`` instead of ``n^2`` per subset row (2-D features: 27 numbers per point);
    ``ref_phi`` then holds each reference subset's feature sum ``Phi_R^T b_s``.
    """

    ref: torch.Tensor
    gen_rows: torch.Tensor          # [U, n_gen] 0/1, the distinct generated subsets
    gen_of: torch.Tensor            # [S] int64: the row of gen_rows subset s uses
    ref_rows: torch.Tensor          # [S, n_ref] 0/1
    ref_sums: torch.Tensor          # [S]
    n_gen: int
    subset_size: int
    block_bytes: int = DEFAULT_BLOCK_BYTES
    ref_phi: torch.Tensor | None = None  # [S, (d + 1)^3] when the plan uses the feature map

    @classmethod
    def build(cls, ref: torch.Tensor, n_gen: int, *, subset_size: int, subsets: int, seed: int,
              device: str | torch.device | None = None, block_bytes: int = DEFAULT_BLOCK_BYTES) -> KIDPlan:
        """Draw the subsets (torch-fidelity's order) and sum the reference kernels once.

        ``device``: where the kernels are computed (``None``: where ``ref`` is). ``ValueError`` for
        a subset size outside ``[2, min(n_gen, n_ref)]`` or ``subsets < 1``.
        """
        n_ref = len(ref)
        if subsets < 1:
            raise ValueError(f"subsets must be >= 1, got {subsets}")
        if not 2 <= subset_size <= min(n_gen, n_ref):
            raise ValueError(f"KID subset size {subset_size} must be in [2, min(n_gen={n_gen}, n_ref={n_ref})]")
        dev = torch.device(device) if device is not None else ref.device
        r = ref.detach().to(dev, torch.float64)
        gi, ri = subset_indices(n_gen, n_ref, subset_size, subsets, seed)
        ref_rows = _indicator(ri, n_ref, dev)
        gen_rows, gen_of = torch.unique(_indicator(gi, n_gen, dev), dim=0, return_inverse=True)
        if use_feature_map(r.shape[1], n_gen):
            ref_phi = ref_rows @ poly_feature_map(r, 1.0 / r.shape[1])
            sums = (ref_phi * ref_phi).sum(1) - ref_rows @ _self_kernel(r)
            return cls(r, gen_rows, gen_of, ref_rows, sums, n_gen, subset_size, block_bytes, ref_phi)
        sums = subset_kernel_sums(r, r, ref_rows, ref_rows, exclude_diagonal=True, block_bytes=block_bytes)
        return cls(r, gen_rows, gen_of, ref_rows, sums, n_gen, subset_size, block_bytes)

    def values(self, gen: torch.Tensor, keep: dict[str, KIDKernels] | None = None) -> torch.Tensor:
        """The S unbiased MMD^2 values (float64 ``[S]``, on the plan's device) for ``gen``.

        ``keep``: when the plan uses the kernel matrix and the generated-generated kernel fits in one
        block (``n^2 * 8 <= block_bytes``),
        ``keep[KERNELS_KEY]`` receives this variant's kernel values (:class:`KIDKernels`) for its
        intervals, so that they are not computed twice."""
        if len(gen) != self.n_gen or gen.dim() != 2 or gen.shape[1] != self.ref.shape[1]:
            raise ValueError(f"this KID plan takes [{self.n_gen}, {self.ref.shape[1]}] features, got "
                             f"{list(gen.shape)}")
        g = gen.detach().to(self.ref.device, torch.float64)
        m = self.subset_size
        if self.ref_phi is not None:  # low dimension: through the feature map (nothing to keep)
            a = self.gen_rows @ poly_feature_map(g, 1.0 / g.shape[1])                     # [U, F]
            gg = ((a * a).sum(1) - self.gen_rows @ _self_kernel(g))[self.gen_of]
            gr = (a[self.gen_of] * self.ref_phi).sum(1)
            return (gg + self.ref_sums) / (m * (m - 1)) - 2.0 * gr / (m * m)
        held = keep is not None and len(g) ** 2 * 8 <= self.block_bytes
        kern = KIDKernels(torch.empty(0), torch.empty(len(g), dtype=torch.float64, device=g.device))

        def hold_gen(start: int, k: torch.Tensor) -> None:
            kern.gen = k  # the whole matrix: one block

        def hold_cross(start: int, k: torch.Tensor) -> None:
            kern.cross_sums[start:start + len(k)] = k.sum(1)

        gg = subset_kernel_sums(g, g, self.gen_rows, self.gen_rows, exclude_diagonal=True,
                                block_bytes=self.block_bytes, on_block=hold_gen if held else None)[self.gen_of]
        gr = subset_kernel_sums(g, self.ref, self.gen_rows, self.ref_rows, block_bytes=self.block_bytes,
                                a_of=self.gen_of, on_block=hold_cross if held else None)
        if held and keep is not None:
            keep[KERNELS_KEY] = kern
        return (gg + self.ref_sums) / (m * (m - 1)) - 2.0 * gr / (m * m)

    def __call__(self, gen: torch.Tensor, keep: dict[str, KIDKernels] | None = None) -> dict[str, float]:
        """``{"kid_mean", "kid_std", "kid_subset_size"}`` for generated features ``gen [n_gen, d]``
        (``keep``: see :meth:`values`)."""
        v = self.values(gen, keep)
        return {"kid_mean": float(v.mean()), "kid_std": float(v.std(correction=0)),
                "kid_subset_size": self.subset_size}


def kid(gen: torch.Tensor, ref: torch.Tensor, *, subset_size: int, subsets: int = 100, seed: int = 2020,
        device: str | torch.device | None = None) -> dict[str, float]:
    """KID of ``gen`` against ``ref`` (one-off; use :class:`KIDPlan` to share the reference side)."""
    return KIDPlan.build(ref, len(gen), subset_size=subset_size, subsets=subsets, seed=seed, device=device)(gen)
