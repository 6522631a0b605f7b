"""Uncertainty of the sample-quality metrics: half-sample resampling over the generated samples.

Pure functions over features (torch-fidelity style): no models, no files, no global state. The
generated samples of a variant are never redrawn; only their features (already in memory at sweep
time) are resampled.

**Method.** A *replicate* keeps a random half of the ``n`` generated samples
(``r = n // 2`` rows, drawn without replacement) and recomputes the statistic on that half exactly as
on the whole set (moments of the kept rows, k-NN radii among the kept rows, ...). With ``d = n - r``
rows deleted, the delete-d jackknife (Shao & Wu 1989; Shao & Tu 1995, sec. 2.3) estimates the
variance of the full-sample statistic from ``B`` such replicates ``theta_b``:

    v = r / (d B) * sum_b (theta_b - mean_b theta_b)^2                          (Eq. U-1)

(``r / d = 1`` for even ``n``). Unlike the with-replacement bootstrap it stays consistent for the
non-smooth k-NN statistics (precision, recall, density, coverage): a duplicated point would shrink
its own k-NN ball to nothing. The standard error is ``se = sqrt(v)`` and the interval at confidence
``level`` is the normal one

    value +- z se,   z = Phi^-1((1 + level) / 2)   (1.96 at level 0.95)          (Eq. U-2)

clipped to the metric's range (:data:`BOUNDS`). For FD/FID the half's value is computed with its
matrix square-root term linearized around the full sample (Eq. U-4, :func:`fd_linear_replicates`:
one eigen-decomposition instead of ``B``) whenever a half has more rows than features. Coverage
deletes one sample at a time instead of keeping halves (Eq. U-1 with ``r = n - 1``,
:func:`coverage_delete_one`): halves miss most of its variance in high dimension. FD/FID, a
squared distance whose estimate is right-skewed, gets its interval on the square-root scale and
squared back (Eq. U-3,
:data:`SQRT_METRICS`): ``(sqrt(value) +- z se_sqrt)^2`` with ``se_sqrt`` from Eq. U-1 over
``sqrt(theta_b)``; its ``se`` stays the one of the value itself.

**Conditioning.** The reference set is held fixed: an interval is the sampling noise of the
generated samples (what ``num_samples`` controls, and what redrawing them with other seeds would
move). The reference set's own noise is shown by the *noise floor* (the reference scored against a
disjoint part of itself, or exact samples), not by these intervals.

**Pairing (common random numbers).** The halves depend only on ``(seed, n)`` (:func:`half_sample_masks`),
so every variant scored on ``n`` samples at a stage is resampled on the same halves. Variants are
drawn with the same sampling seeds, so sample ``i`` of two variants comes from the same noise; the
difference of two variants is then resampled pairwise (Eq. U-1 over ``theta_b(A) - theta_b(B)``),
which is much tighter than either value's interval (:func:`paired_difference`).

Conventions: ``gen`` are features of generated samples ``[n, d]``, ``ref`` of reference data
``[m, d]`` (as in :mod:`emascope.metrics`); everything is float64 on CPU; a replicate array is
``float64 [B]``; ``masks`` are ``bool [B, n]`` with exactly ``n // 2`` True per row.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from emascope import distances as D
from emascope.kid import KIDKernels, poly_feature_map, polynomial_kernel, use_feature_map

#: Confidence level of every interval emascope records unless configured otherwise.
DEFAULT_LEVEL = 0.95
#: Half-sample replicates per variant and stage.
DEFAULT_REPLICATES = 100
#: Memory budget (bytes) of one block of pairwise distances / kernel values built at a time.
DEFAULT_BLOCK_BYTES = 64 * 2**20
#: Range of the built-in metrics: intervals are clipped to it.
BOUNDS: dict[str, tuple[float, float]] = {
    "fid": (0.0, math.inf), "fd": (0.0, math.inf), "precision": (0.0, 1.0), "recall": (0.0, 1.0),
    "coverage": (0.0, 1.0), "density": (0.0, math.inf), "isc_mean": (1.0, math.inf),
}
#: Metrics that are themselves spreads over subsets/splits: they get no interval.
SPREAD_METRICS = ("kid_std", "isc_std")
#: Squared distances: interval on the square-root scale (Eq. U-3).
SQRT_METRICS = ("fd", "fid")
#: Metrics whose replicates delete one sample each (delete-1 jackknife, ``n`` replicates, ``n - 1``
#: kept) instead of keeping halves: coverage (:func:`coverage_delete_one`).
DELETE_ONE_METRICS = ("coverage",)


# ----------------------------------------------------------------------------------------------
# the resampling scheme


def z_value(level: float) -> float:
    """``Phi^-1((1 + level) / 2)``: the normal quantile of a two-sided interval at ``level``."""
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level!r}")
    return NormalDist().inv_cdf(0.5 + float(level) / 2.0)


def mask_seed(seed: int, n: int) -> int:
    """Seed of the halves of ``n`` samples at sampling seed ``seed`` (first 8 bytes of
    ``sha256(f"halves:{seed}:{n}")``, little-endian, top bit cleared)."""
    digest = hashlib.sha256(f"halves:{int(seed)}:{int(n)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def half_sample_masks(n: int, replicates: int = DEFAULT_REPLICATES, seed: int = 0) -> torch.Tensor:
    """``bool [replicates, n]``: row ``b`` keeps a random half (``n // 2`` rows, without replacement).

    Deterministic in ``(n, replicates, seed)``: two sets of ``n`` samples resampled with the same
    ``(replicates, seed)`` get the same halves (the pairing of :func:`paired_difference`).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 4:
        raise ValueError(f"half-sample resampling needs at least 4 samples, got n={n!r}")
    if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 2:
        raise ValueError(f"replicates must be an integer >= 2, got {replicates!r}")
    gen = torch.Generator().manual_seed(mask_seed(seed, n))
    keep = torch.rand(replicates, n, generator=gen).argsort(dim=1)[:, : n // 2]
    masks = torch.zeros(replicates, n, dtype=torch.bool)
    masks.scatter_(1, keep, True)
    return masks


def jackknife_variance(replicates: np.ndarray | torch.Tensor, n: int, kept: int | None = None) -> float:
    """Eq. U-1: ``r / (d B) sum_b (theta_b - mean theta)^2`` with ``r`` kept (default ``n // 2``, the
    half-samples; ``n - 1`` for the delete-1 jackknife of :data:`DELETE_ONE_METRICS`) and ``d = n - r``
    deleted rows. Non-finite replicates are left out; NaN if fewer than half of them are finite."""
    x = np.asarray(replicates, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size < 2 or 2 * x.size < np.asarray(replicates).size or n < 2:
        return math.nan
    r = n // 2 if kept is None else int(kept)
    if not 1 <= r < n:
        return math.nan
    return float(r / (n - r) * np.mean((x - x.mean()) ** 2))


@dataclass
class Estimate:
    """A metric value with its uncertainty.

    ``value``: the metric on all ``n`` samples. ``replicates``: its values on the half-samples of
    :func:`half_sample_masks` (``None`` when the uncertainty came from elsewhere), or, with
    ``kept = n - 1``, on ``n`` samples less one each (:data:`DELETE_ONE_METRICS`). ``extra_var``:
    variance not captured by the replicates (KID's subset noise, a user's own standard error),
    added to Eq. U-1's. ``n``: samples the value was computed on. ``kept``: rows each replicate
    keeps (``None``: ``n // 2``).
    """

    value: float
    replicates: np.ndarray | None = None
    n: int | None = None
    extra_var: float | None = None
    kept: int | None = None

    @property
    def se(self) -> float | None:
        """Standard error: ``sqrt(Eq. U-1 + extra_var)``; ``None`` when unknown."""
        extra = 0.0 if self.extra_var is None else float(self.extra_var)
        if self.replicates is None:
            var = extra if self.extra_var is not None else math.nan
        else:
            var = jackknife_variance(self.replicates, self.n or 0, self.kept) + extra
        return math.sqrt(var) if math.isfinite(var) and var >= 0 else None

    def interval(self, level: float = DEFAULT_LEVEL, metric: str | None = None) -> tuple[float, float] | None:
        """Eq. U-2 (Eq. U-3 for :data:`SQRT_METRICS`), clipped to :data:`BOUNDS` of ``metric``;
        ``None`` without a standard error."""
        if metric in SQRT_METRICS and self.replicates is not None and math.isfinite(self.value) and self.value >= 0:
            root = np.sqrt(np.clip(np.asarray(self.replicates, dtype=np.float64), 0.0, None))
            var = jackknife_variance(root, self.n or 0, self.kept)
            if math.isfinite(var):
                z, c = z_value(level), math.sqrt(self.value)
                return max(0.0, c - z * math.sqrt(var)) ** 2, (c + z * math.sqrt(var)) ** 2
        return normal_interval(self.value, self.se, level, metric)


def normal_interval(value: float, se: float | None, level: float = DEFAULT_LEVEL,
                    metric: str | None = None) -> tuple[float, float] | None:
    """Eq. U-2: ``value +- z se`` clipped to ``BOUNDS[metric]``; ``None`` if ``se`` is unknown."""
    if se is None or not math.isfinite(se) or not math.isfinite(value):
        return None
    z = z_value(level)
    lo, hi = value - z * se, value + z * se
    bounds = BOUNDS.get(metric or "")
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return lo, hi


def _masks_f64(masks: torch.Tensor) -> tuple[torch.Tensor, int]:
    if masks.dtype != torch.bool or masks.dim() != 2:
        raise ValueError(f"masks must be bool [B, n], got {masks.dtype} {tuple(masks.shape)}")
    kept = masks.sum(1)
    if not bool((kept == kept[0]).all()) or int(kept[0]) < 2:
        raise ValueError("every mask row must keep the same number (>= 2) of samples")
    return masks.to(torch.float64), int(kept[0])


def _check(name: str, x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    if not torch.is_tensor(x) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [n, d], got {type(x).__name__} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    if n is not None and len(x) != n:
        raise ValueError(f"{name} has {len(x)} rows but the masks cover {n} samples")
    return x.detach().to("cpu", torch.float64)


# ----------------------------------------------------------------------------------------------
# Frechet distance (Heusel et al. 2017) of each half-sample, from resampled moment sums


def sqrtm_psd(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues clipped at 0), float64."""
    a = torch.as_tensor(np.asarray(a), dtype=torch.float64)
    a = 0.5 * (a + a.T)
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_from_moments(mu: torch.Tensor, cov: torch.Tensor, mu_ref: torch.Tensor, cov_ref: torch.Tensor,
                         sqrt_cov_ref: torch.Tensor | None = None) -> torch.Tensor:
    """FD = ``|mu - mu_ref|^2 + tr(S + S_ref) - 2 tr((S_ref^1/2 S S_ref^1/2)^1/2)`` for a batch
    ``mu [B, d]``, ``cov [B, d, d]`` (Heusel et al. 2017; the trace of ``(S S_ref)^1/2`` taken as the
    sum of square roots of the eigenvalues of the symmetric ``S_ref^1/2 S S_ref^1/2``)."""
    root = sqrtm_psd(cov_ref) if sqrt_cov_ref is None else sqrt_cov_ref
    inner = root @ cov @ root
    inner = 0.5 * (inner + inner.transpose(-1, -2))
    tr_sqrt = torch.linalg.eigvalsh(inner).clamp_min(0).sqrt().sum(-1)
    diff = mu - mu_ref
    return (diff * diff).sum(-1) + cov.diagonal(dim1=-2, dim2=-1).sum(-1) + torch.trace(cov_ref) - 2 * tr_sqrt


def fd_replicates(gen: torch.Tensor, ref_stats: Mapping[str, Any], masks: torch.Tensor, *,
                  sqrt_cov_ref: torch.Tensor | None = None, method: str = "auto",
                  block_bytes: int = DEFAULT_BLOCK_BYTES) -> np.ndarray:
    """FD of every half-sample of ``gen`` against the fixed reference statistics ``{"mu", "sigma"}``.

    ``method="exact"``: the FD of each half recomputed (moment sums resampled: ``S1_b = sum_i m_bi x_i``
    as one ``[B, n] @ [n, d]`` product, ``S2_b = sum_i m_bi x_i x_i^T`` as ``X_b^T X_b`` on the kept rows;
    covariances with ``r - 1`` as torch-fidelity), cost ``B (r d^2 + d^3)``: ~5 min per variant on one
    CPU thread at Inception's ``d = 2048`` and 5,000 samples (``bench/uncertainty.py --scale``).
    ``method="linear"``: Eq. U-4 (:func:`fd_linear_replicates`), cost ``n d^2 + d^3`` (one
    decomposition): 13x faster at ``d = 64``, 34x at ``d = 2048``; standard errors within 4% of the
    exact ones on Gaussian features (same coverage, ``--calibration``), 6% lower on the shipped digits
    run's features. ``"auto"``: linear when every half has more rows than features (``r > d``: the
    half covariances are regular, the tangent exists), exact otherwise, and exact whenever the tangent
    is not finite (a generated set with no spread at all: collapsed samples).
    """
    if method not in ("auto", "exact", "linear"):
        raise ValueError(f"method must be 'auto', 'exact' or 'linear', got {method!r}")
    m, r = _masks_f64(masks)
    x = _check("gen", gen, masks.shape[1])
    d = x.shape[1]
    mu_ref = torch.as_tensor(np.asarray(ref_stats["mu"]), dtype=torch.float64)
    cov_ref = torch.as_tensor(np.asarray(ref_stats["sigma"]), dtype=torch.float64)
    root = sqrtm_psd(cov_ref) if sqrt_cov_ref is None else sqrt_cov_ref.to(torch.float64)
    if method == "linear" or (method == "auto" and r > d):
        linear = fd_linear_replicates(x, masks, mu_ref, cov_ref, root)
        if method == "linear" or bool(torch.isfinite(linear).all()):
            return linear.numpy()
    centre = x.mean(0)
    xc = x - centre
    s1 = m @ xc                                                           # [B, d]
    idx = masks.nonzero()[:, 1].view(len(masks), r)                       # kept rows, [B, r]
    step = max(1, int(block_bytes) // max(1, r * d * 8))
    blocks = []
    for b in range(0, len(idx), step):
        kept = xc[idx[b:b + step]]                                        # [step, r, d]
        blocks.append(kept.transpose(1, 2) @ kept)
    s2 = torch.cat(blocks)
    mean = s1 / r
    cov = (s2 - r * mean[:, :, None] * mean[:, None, :]) / (r - 1)
    return frechet_from_moments(mean + centre, cov, mu_ref, cov_ref, root).numpy()


def fd_linear_replicates(x: torch.Tensor, masks: torch.Tensor, mu_ref: torch.Tensor, cov_ref: torch.Tensor,
                         sqrt_cov_ref: torch.Tensor) -> torch.Tensor:
    """Eq. U-4: FD of every half-sample with its square-root term linearized around the full sample.

    With ``R = S_ref^1/2``, ``M = R S R`` (``S``: covariance of all ``n`` rows) and ``H = R M^-1/2 R``
    (the gradient of ``2 tr(M^1/2)`` in ``S``: ``d tr(M^1/2) = tr(M^-1/2 R dS R) / 2``),

        theta_b = |mu_b - mu_ref|^2 + tr((I - H) S_b) + tr(S_ref) - 2 tr(M^1/2) + tr(H S)     (Eq. U-4)

    The mean term and the trace are exact for each half; only ``tr((R S_b R)^1/2)`` is replaced by its
    tangent at ``S``, whose error is second order in ``S_b - S`` (relative size ``~ sqrt(d / n)``, the
    regime of the method's calibration table). ``tr((I - H) S_b)`` is exact from per-row quadratic forms
    ``q_i = (x_i - c)^T (I - H) (x_i - c)``: ``(sum_kept q_i - r (mu_b - c)^T (I - H) (mu_b - c)) / (r - 1)``.
    ``M``'s eigenvalues are floored at ``1e-12`` of the largest. Returns ``float64 [B]``.
    """
    m, r = _masks_f64(masks)
    d = x.shape[1]
    c = x.mean(0)
    xc = x - c
    cov = xc.T @ xc / (len(x) - 1)
    inner = sqrt_cov_ref @ cov @ sqrt_cov_ref
    w, v = torch.linalg.eigh(0.5 * (inner + inner.T))
    w = w.clamp_min(float(w.max().clamp_min(0.0)) * 1e-12)
    tr_sqrt = w.clamp_min(0.0).sqrt().sum()
    h = sqrt_cov_ref @ ((v * w.rsqrt()) @ v.T) @ sqrt_cov_ref
    g = torch.eye(d, dtype=torch.float64) - 0.5 * (h + h.T)               # I - H, symmetric
    q = ((xc @ g) * xc).sum(1)                                            # [n]
    mean_b = (m @ xc) / r                                                 # mu_b - c, [B, d]
    tr_gs = (m @ q - r * ((mean_b @ g) * mean_b).sum(1)) / (r - 1)
    diff = mean_b + (c - mu_ref)
    const = torch.trace(cov_ref) - 2.0 * tr_sqrt + (h * cov).sum()
    return (diff * diff).sum(1) + tr_gs + const


# ----------------------------------------------------------------------------------------------
# KID (Binkowski et al. 2018): unbiased MMD^2, cubic polynomial kernel, from kernel subset sums


def kid_reference_term(ref: torch.Tensor, *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> float:
    """``sum_{j != j'} k(y_j, y_j') / (m (m - 1))``: the reference's own term of the unbiased MMD^2."""
    y = _check("ref", ref)
    m, gamma = len(y), 1.0 / y.shape[1]
    if use_feature_map(y.shape[1], m):
        phi = poly_feature_map(y, gamma)
        total = float((phi.sum(0) ** 2).sum() - (phi * phi).sum())
        return total / (m * (m - 1))
    total, step = 0.0, D.rows_per_block(m, block_bytes)
    for i in range(0, m, step):
        blk = polynomial_kernel(y[i:i + step], y, gamma=gamma)
        total += float(blk.sum()) - float(blk.diagonal(offset=i).sum())
    return total / (m * (m - 1))


def kid_replicates(gen: torch.Tensor, ref: torch.Tensor, masks: torch.Tensor, *,
                   ref_term: float | None = None, kernels: KIDKernels | None = None,
                   block_bytes: int = DEFAULT_BLOCK_BYTES) -> np.ndarray:
    """Unbiased MMD^2 (KID's kernel) between every half-sample of ``gen`` and all of ``ref``:

    ``MMD^2_b = sum_{i != i' kept} k(x_i, x_i') / (r (r - 1)) + T_ref - 2 sum_{i kept, j} k(x_i, y_j) / (r m)``

    The generated-generated sum is a quadratic form ``m_b^T K m_b - sum_i m_bi k(x_i, x_i)``. When the
    kernel's explicit feature map is small (``(d + 1)^3 <= n``, :func:`poly_feature_map`) it is
    ``|sum_i m_bi phi(x_i)|^2`` and the cross sums are ``phi(x_i) . sum_j phi(y_j)`` (cost
    ``(B + 1) n (d + 1)^3``); otherwise ``K`` is built in row blocks and ``M K`` accumulated (cost
    ``n^2 (d + B) + n m d``). These are replicates of the full two-sample U-statistic, whose variance
    is that of KID's subset average up to the subset noise (added by the caller from ``kid_std``).
    ``kernels``: the variant's kernel values as the KID metric kept them (:meth:`emascope.kid.KIDPlan.values`);
    then no kernel value is computed again.
    """
    m, r = _masks_f64(masks)
    x = _check("gen", gen, masks.shape[1])
    y = _check("ref", ref)
    d = x.shape[1]
    if y.shape[1] != d:
        raise ValueError(f"feature dimensions differ: gen has {d}, ref has {y.shape[1]}")
    gamma = 1.0 / d
    if ref_term is None:
        ref_term = kid_reference_term(y, block_bytes=block_bytes)
    diag = ((x * x).sum(1) * gamma + 1.0) ** 3
    if kernels is not None and kernels.gen.shape == (len(x), len(x)) and kernels.cross_sums.shape == (len(x),):
        kg = kernels.gen.to("cpu", torch.float64)
        diag, cross = kg.diagonal(), kernels.cross_sums.to("cpu", torch.float64)
        quad = ((m @ kg) * m).sum(1)
    elif use_feature_map(d, len(x)):
        phi = poly_feature_map(x, gamma)
        cross = phi @ poly_feature_map(y, gamma).sum(0)
        quad = ((m @ phi) ** 2).sum(1)
    else:
        cross = torch.zeros(len(x), dtype=torch.float64)
        step = D.rows_per_block(len(y), block_bytes)
        for i in range(0, len(x), step):
            cross[i:i + step] = polynomial_kernel(x[i:i + step], y, gamma=gamma).sum(1)
        mk = torch.zeros(len(m), len(x), dtype=torch.float64)
        step = D.rows_per_block(len(x), block_bytes)
        for i in range(0, len(x), step):
            mk += m[:, i:i + step] @ polynomial_kernel(x[i:i + step], x, gamma=gamma)
        quad = (mk * m).sum(1)
    gg = (quad - m @ diag) / (r * (r - 1))
    return (gg + ref_term - 2.0 * (m @ cross) / (r * len(y))).numpy()


# ----------------------------------------------------------------------------------------------
# Inception Score (Salimans et al. 2016) of each half-sample, torch-fidelity's splits kept


def isc_replicates(logits: torch.Tensor, masks: torch.Tensor, *, splits: int = 10, seed: int = 2020) -> np.ndarray:
    """IS ``= mean_s exp(mean_{i in s} KL(p(y|x_i) || p_s(y)))`` of every half-sample.

    Each sample stays in the split torch-fidelity puts it in (``isc_features_to_metric``: a
    ``RandomState(seed)`` permutation cut into ``splits`` chunks); a replicate keeps the kept
    members of every split. With all rows kept this is torch-fidelity's ``isc_mean``.
    """
    m, _ = _masks_f64(masks)
    lg = _check("logits", logits, masks.shape[1])
    n = len(lg)
    splits = max(1, min(int(splits), n))
    perm = torch.as_tensor(np.random.RandomState(int(seed)).permutation(n))
    p, logp = lg.softmax(1), lg.log_softmax(1)
    plogp = (p * logp).sum(1)
    scores = []
    for s in range(splits):
        idx = perm[s * n // splits:(s + 1) * n // splits]
        ms = m[:, idx]
        cnt = ms.sum(1).clamp_min(1.0)
        pbar = (ms @ p[idx]) / cnt[:, None]
        kl = (ms @ plogp[idx]) / cnt - (pbar * pbar.clamp_min(1e-300).log()).sum(1)
        scores.append(kl.exp())
    return torch.stack(scores, 1).mean(1).numpy()


# ----------------------------------------------------------------------------------------------
# k-NN metrics: precision/recall (Kynkaanniemi et al. 2019), density/coverage (Naeem et al. 2020)


@dataclass
class NeighbourStructure:
    """What the k-NN metrics of every half-sample need, computed once per variant.

    ``nn_idx``/``nn_dist`` ``[n, L]``: each generated point's ``L`` nearest generated points (itself
    first). ``precision_hit`` ``[n]``: inside some reference k-NN ball (torch-fidelity: ``<=``).
    ``density_count`` ``[n]``: reference balls (``dc_k``, Naeem: ``<``) containing the point.
    ``cov_i``/``cov_j``: pairs (generated i inside reference ball j). ``rec_i``/``rec_j``/``rec_d``:
    pairs (reference j, generated i) closer than the largest radius point ``i`` gets in any replicate.
    ``within``/``rec_s``: in which replicates each pair lies inside ``i``'s ball, as bitsets over the
    replicates (:func:`replicate_balls`): ``within[rec_i, rec_s]``.
    """

    n: int
    m: int
    prc_k: int
    dc_k: int
    nn_idx: torch.Tensor
    nn_dist: torch.Tensor
    precision_hit: torch.Tensor
    density_count: torch.Tensor
    cov_i: torch.Tensor
    cov_j: torch.Tensor
    rec_i: torch.Tensor
    rec_j: torch.Tensor
    rec_d: torch.Tensor
    within: torch.Tensor         # [n, L + 1, W] int64 bitsets over replicates (:func:`replicate_balls`)
    rec_s: torch.Tensor          # [P] int64: the first list position of rec_i at distance >= rec_d
    full_radii: torch.Tensor     # [n] with every row kept (torch-fidelity's)
    short_lists: int = 0         # (replicate, point) pairs whose list held fewer than prc_k + 1 kept rows
    replicate_seconds: float = 0.0  # of the build, the time only the intervals need (replicate radii, rec_q)


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """``[..., B]`` bool -> ``[..., ceil(B / 64)]`` int64 bitsets (bit ``b % 64`` of word ``b // 64``)."""
    b = flags.shape[-1]
    words = -(-b // 64)
    padded = torch.zeros(*flags.shape[:-1], words * 64, dtype=torch.int64)
    padded[..., :b] = flags
    shifts = torch.arange(64, dtype=torch.int64)
    return (padded.view(*flags.shape[:-1], words, 64) << shifts).sum(-1)  # distinct bits: sum is OR


def count_bits(words: torch.Tensor, b: int) -> torch.Tensor:
    """``[r, W]`` int64 bitsets -> ``[b]`` int64: for every bit position, how many rows have it set."""
    if len(words) == 0:
        return torch.zeros(b, dtype=torch.int64)
    raw = np.ascontiguousarray(words.numpy()).view(np.uint8).reshape(len(words), -1)
    return torch.from_numpy(np.unpackbits(raw, axis=1, bitorder="little")[:, :b].sum(0, dtype=np.int64))


def replicate_balls(nn_idx: torch.Tensor, masks: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """Where every kept generated point's k-NN ball radius lies in its list, in each replicate, as bitsets.

    The radius of point ``i`` among the kept rows of replicate ``b`` is the distance to its ``k + 1``-th
    nearest kept point counting itself (torch-fidelity's ``kthvalue(k + 1)``): ``nn_dist[i, l]`` for the
    list position ``l`` of that point (lists ordered by distance); with fewer than ``k + 1`` kept rows
    in the list it is the list's last distance (a slight under-estimate, counted in ``short``).

    Returns ``(within, short)``: ``within [n, L + 1, W]`` int64 bitsets over the ``B`` replicates, bit
    ``b`` of ``within[i, s]`` set iff ``i`` is kept in replicate ``b`` and its radius there is
    ``nn_dist[i, l]`` with ``l >= s`` (``s = 0``: kept). A distance ``d`` to point ``i`` is then inside
    ``i``'s ball in the replicates of ``within[i, searchsorted(nn_dist[i], d)]``. The position is
    ``>= s`` iff at most ``k`` of the first ``s`` list entries are kept: a saturating bit-sliced count
    of kept entries down the list (``k + 1`` bitset operations per list entry, all replicates at once).
    """
    n, L = nn_idx.shape
    kept = pack_bits(masks.T)                                       # [n, W]
    within = torch.zeros(n, L + 1, kept.shape[1], dtype=torch.int64)
    within[:, 0] = kept
    at_least = [torch.zeros_like(kept) for _ in range(k + 1)]       # at_least[t]: > t kept entries so far
    for s in range(1, L):
        e = kept[nn_idx[:, s - 1]]
        for t in range(k, 0, -1):
            at_least[t] |= at_least[t - 1] & e
        at_least[0] |= e
        within[:, s] = kept & ~at_least[k]
    e = kept[nn_idx[:, L - 1]]
    for t in range(k, 0, -1):
        at_least[t] |= at_least[t - 1] & e
    short = int(count_bits(kept & ~at_least[k], len(masks)).sum())
    return within, short


def neighbour_structure(gen: torch.Tensor, ref: torch.Tensor, masks: torch.Tensor, *, prc_k: int = 3,
                        ref_radii_prc: torch.Tensor, dc_k: int = 5, ref_radii_dc: torch.Tensor,
                        block_bytes: int = DEFAULT_BLOCK_BYTES) -> NeighbourStructure:
    """Precompute the neighbour structure of :func:`prdc_replicates`: each generated point's
    ``L = 8 (prc_k + 1)`` nearest generated points, where each ball's radius lies in that list in every
    replicate (:func:`replicate_balls`), then the ball memberships between generated and reference
    points. Low dimensions (``d <=`` :data:`emascope.distances.KDTREE_MAX_DIM`) find the candidates
    with KD-trees (``scipy.spatial.cKDTree``), others with blockwise matrix products
    (:mod:`emascope.distances`); either way the lists are re-sorted on exact distances and every ball
    test is decided on exact distances, as in :mod:`emascope.metrics` (so :func:`prdc_values` equals
    the metrics bit for bit). ``ref_radii_prc``: reference radii ``kthvalue(prc_k + 1)``
    (torch-fidelity's); ``ref_radii_dc``: :func:`emascope.metrics.knn_radii` with ``dc_k``."""
    x = _check("gen", gen, masks.shape[1])
    y = _check("ref", ref)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: gen has {x.shape[1]}, ref has {y.shape[1]}")
    n, m = len(x), len(y)
    if not 1 <= prc_k < n // 2 or not 1 <= dc_k < m:
        raise ValueError(f"need 1 <= prc_k < n/2 and 1 <= dc_k < m (prc_k={prc_k}, dc_k={dc_k}, n={n}, m={m})")
    rr_p = ref_radii_prc.to(torch.float64)
    rr_d = ref_radii_dc.to(torch.float64)
    if len(rr_p) != m or len(rr_d) != m:
        raise ValueError(f"reference radii must have {m} entries")
    L = min(n, 8 * (prc_k + 1))
    if x.shape[1] <= D.KDTREE_MAX_DIM:  # the candidate lists from a KD-tree, as emascope.distances does
        from scipy.spatial import cKDTree

        _, idx = cKDTree(x.numpy()).query(x.numpy(), k=L)
        nn_idx = torch.from_numpy(idx.reshape(n, L)).long()
    else:
        nn_idx = torch.empty(n, L, dtype=torch.int64)
        step = D.rows_per_block(n, block_bytes)
        for i in range(0, n, step):
            sq = D.squared(x[i:i + step], x)
            rows = torch.arange(i, min(i + step, n))
            sq[torch.arange(len(rows)), rows] = -math.inf  # itself in the list, whatever the rounding
            nn_idx[i:i + step] = sq.topk(L, dim=1, largest=False).indices
    nn_idx, nn_dist = _exact_lists(x, nn_idx)
    t = time.perf_counter()
    within, short = replicate_balls(nn_idx, masks, prc_k)
    widest = (within[:, 1:L] != 0).any(-1).sum(1)                       # the largest position any replicate uses
    full = nn_dist[:, prc_k]
    reach = torch.maximum(nn_dist.gather(1, widest[:, None])[:, 0], full)
    t = time.perf_counter() - t
    hit, count, (ci, cj), (ri, rj, rd) = _memberships(x, y, rr_p, rr_d, reach, block_bytes)
    t2 = time.perf_counter()
    # a pair is inside ball i in replicate b iff d <= nn_dist[i, pos] iff pos >= #(list entries < d)
    q = torch.searchsorted(nn_dist[ri], rd[:, None].contiguous(), side="left")[:, 0]
    t += time.perf_counter() - t2
    return NeighbourStructure(n, m, prc_k, dc_k, nn_idx, nn_dist, hit, count, ci, cj, ri, rj, rd, within, q, full,
                              short, t)


def _exact_lists(x: torch.Tensor, nn_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate lists ``[n, L]`` with their exact distances (:func:`emascope.distances.exact_pairs`,
    the function every ball test of :mod:`emascope.metrics` decides on), each row sorted by them: the
    ``k``-th entry is then :func:`emascope.metrics.knn_radii`'s radius, bit for bit."""
    n, L = nn_idx.shape
    rows = torch.arange(n).repeat_interleave(L)
    dist = D.exact_pairs(x, x, rows, nn_idx.reshape(-1)).reshape(n, L)
    dist, order = dist.sort(dim=1, stable=True)
    return nn_idx.gather(1, order), dist


def _memberships(x: torch.Tensor, y: torch.Tensor, rr_p: torch.Tensor, rr_d: torch.Tensor,
                       reach: torch.Tensor, block_bytes: int) -> tuple:
    """Ball memberships from the pairs inside any ball (:func:`emascope.distances.pairs_within`: KD-tree
    or matmul-screened candidates, exact distances), with torch-fidelity's ``<=`` for precision and
    recall and Naeem's ``<`` for density/coverage, as in :mod:`emascope.metrics`."""
    n = len(x)
    i, j, d = D.pairs_within(x, y, col_radius=torch.maximum(rr_p, rr_d), row_radius=reach,
                             block_bytes=block_bytes)
    hit = torch.zeros(n, dtype=torch.bool)
    hit[i[d <= rr_p[j]]] = True
    inside = d < rr_d[j]
    ci, cj = i[inside], j[inside]
    count = torch.zeros(n, dtype=torch.float64).index_add_(0, ci, torch.ones(len(ci), dtype=torch.float64))
    ok = d <= reach[i]
    return hit, count, (ci, cj), (i[ok], j[ok], d[ok])


def _any_per_ref(flags: torch.Tensor, j: torch.Tensor, m: int) -> torch.Tensor:
    """``[B, P]`` pair flags -> ``[B]`` share of the ``m`` reference points with a flagged pair."""
    acc = torch.zeros(flags.shape[0], m, dtype=torch.float32)
    acc.index_add_(1, j, flags.to(torch.float32))
    return (acc > 0).sum(1, dtype=torch.float64) / m


def prdc_replicates(s: NeighbourStructure, masks: torch.Tensor) -> dict[str, np.ndarray]:
    """Precision, recall and density of every half-sample, and coverage's delete-1 values, from the structure:

    - precision_b = kept points inside some reference ball / r (reference balls fixed);
    - density_b = sum over kept points of the reference balls holding them / (dc_k r);
    - coverage: by deleting one sample at a time instead (:func:`coverage_delete_one`, ``[n]``);
    - recall_b = reference points inside the ball of a kept point, radius = the point's k-NN
      distance among the kept points (:func:`replicate_balls`) / m.
    """
    mf, r = _masks_f64(masks)
    out = {"precision": (mf @ s.precision_hit.to(torch.float64)) / r,
           "density": (mf @ s.density_count) / (s.dc_k * r)}
    # recall: the replicates in which each pair is inside its ball, OR-ed per reference point
    reach = s.within[s.rec_i, s.rec_s]                                   # [P, W] bitsets
    order = torch.argsort(s.rec_j, stable=True)
    covered = torch.zeros(0, reach.shape[1], dtype=torch.int64)
    if len(order):
        j = s.rec_j[order]
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), (j[1:] != j[:-1]).nonzero()[:, 0] + 1])
        covered = torch.from_numpy(np.bitwise_or.reduceat(reach[order].numpy(), starts.numpy(), axis=0))
    out["recall"] = count_bits(covered, len(masks)).to(torch.float64) / s.m
    out["coverage"] = coverage_delete_one(s)
    return {k: v.numpy() for k, v in out.items()}


def coverage_delete_one(s: NeighbourStructure) -> torch.Tensor:
    """Coverage with sample ``i`` deleted, for every ``i`` (``float64 [n]``; Eq. U-1 with ``r = n - 1``).

    Coverage counts the reference balls some generated sample reached. Half-samples cannot see a
    ball no sample reached this time although another draw would, and in high dimension much of
    coverage's variance is there: their intervals cover 70-74% at 64-d (``bench/uncertainty.py
    --calibration``). Deleting one sample at a time is the delete-1 jackknife, whose variance is
    conservative in expectation for any symmetric statistic (Efron & Stein 1981): 92-93% at 64-d,
    98-99% at 2- and 16-d. Deleting ``i`` uncovers exactly the balls ``i`` alone reached:
    ``coverage_(i) = coverage - #{j : c_j = 1, i in ball j} / m`` (``c_j``: samples in ball ``j``).
    """
    c = torch.bincount(s.cov_j, minlength=s.m)
    full = float((c >= 1).sum()) / s.m
    alone = (c == 1)[s.cov_j]
    lost = torch.bincount(s.cov_i[alone], minlength=s.n).to(torch.float64)
    return full - lost / s.m


def prdc_values(s: NeighbourStructure) -> dict[str, float]:
    """The four k-NN metrics with every row kept: equal, bit for bit, to
    :func:`emascope.metrics.precision_recall` and :func:`emascope.metrics.density_coverage` with the
    same reference radii (the same exact distances decide every ball test), so a sweep with
    intervals takes its values from here instead of computing them twice (tested)."""
    ok = s.rec_d <= s.full_radii[s.rec_i]
    return {"precision": float(s.precision_hit.double().mean()),
            "recall": float(_any_per_ref(ok[None], s.rec_j, s.m)[0]),
            "density": float(s.density_count.sum()) / (s.dc_k * s.n),
            "coverage": float(_any_per_ref(torch.ones(1, len(s.cov_i), dtype=torch.bool), s.cov_j, s.m)[0])}


# ----------------------------------------------------------------------------------------------
# user metrics over the samples


def mean_replicates(values: torch.Tensor | np.ndarray, masks: torch.Tensor) -> np.ndarray:
    """Mean of per-sample values ``[n]`` over every half-sample (``[B, n] @ [n]``)."""
    m, r = _masks_f64(masks)
    v = torch.as_tensor(np.asarray(values, dtype=np.float64)).reshape(-1)
    if len(v) != masks.shape[1]:
        raise ValueError(f"per-sample values have {len(v)} entries, expected {masks.shape[1]}")
    return ((m @ v) / r).numpy()


def black_box_replicates(fn: Callable[[torch.Tensor], Mapping[str, Any]], samples: torch.Tensor,
                         masks: torch.Tensor, *, max_calls: int,
                         time_budget: float | None = None) -> dict[str, np.ndarray]:
    """Call ``fn`` on the kept samples of the first half-samples (at most ``max_calls`` calls, and
    no new call once ``time_budget`` seconds are spent); returns ``{name: replicates}`` for every
    name that came back as a finite number in every call (at least 2). Exceptions propagate."""
    out: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    calls = 0
    for row in masks[: max(0, int(max_calls))]:
        if time_budget is not None and calls >= 2 and time.perf_counter() - t0 > time_budget:
            break
        res = fn(samples[row])
        calls += 1
        for k, v in dict(res).items():
            try:
                out.setdefault(str(k), []).append(float(v))
            except (TypeError, ValueError):
                out.setdefault(str(k), []).append(math.nan)
    return {k: np.asarray(v) for k, v in out.items()
            if len(v) == calls and calls >= 2 and all(math.isfinite(x) for x in v)}


# ----------------------------------------------------------------------------------------------
# comparisons


@dataclass
class Comparison:
    """``diff`` = value(variant) - value(best) in the metric's units, its standard error, the
    interval at the comparison's level, the samples it rests on, and whether the variant is
    significantly worse than the best (``None``: unknown, no standard error)."""

    diff: float
    se: float | None
    lo: float | None
    hi: float | None
    n: int | None
    worse: bool | None
    paired: bool


def paired_difference(a: Estimate, b: Estimate) -> tuple[float, float | None, bool]:
    """``(value_a - value_b, se, paired)``. Paired (Eq. U-1 over ``theta_b(a) - theta_b(b)``) when both
    carry replicates of the same halves (same ``n``, ``kept`` and replicate count; delete-1 replicates
    pair sample ``i`` of both, drawn from the same seed); otherwise the unpaired
    ``sqrt(se_a^2 + se_b^2)``. ``extra_var`` of both is added either way (conservative for KID)."""
    diff = a.value - b.value
    if (a.replicates is not None and b.replicates is not None and a.n == b.n and a.n and a.kept == b.kept
            and len(a.replicates) == len(b.replicates)):
        var = jackknife_variance(np.asarray(a.replicates) - np.asarray(b.replicates), a.n, a.kept)
        var += (a.extra_var or 0.0) + (b.extra_var or 0.0)
        return diff, (math.sqrt(var) if math.isfinite(var) else None), True
    sa, sb = a.se, b.se
    if sa is None or sb is None:
        return diff, None, False
    return diff, math.sqrt(sa * sa + sb * sb), False


def best_of(estimates: Mapping[str, Estimate], direction: str) -> str | None:
    """The variant with the best finite value among those with the most samples (a racing sweep's
    dropped variants, scored on fewer samples, are compared with the best, never chosen as it);
    the first one on ties."""
    if direction not in ("lower", "higher"):
        raise ValueError(f"direction must be 'lower' or 'higher', got {direction!r}")
    finite = [(v, e.value, e.n or 0) for v, e in estimates.items() if e.value is not None and math.isfinite(e.value)]
    most = max((n for *_, n in finite), default=0)
    finite = [(v, x) for v, x, n in finite if n == most]
    if not finite:
        return None
    pick = min if direction == "lower" else max
    return pick(finite, key=lambda kv: kv[1])[0]


def is_worse(diff: float, se: float | None, direction: str, z: float) -> bool | None:
    """Whether ``diff = value - best`` is significantly on the bad side at normal quantile ``z``."""
    if se is None or not math.isfinite(se) or not math.isfinite(diff):
        return None
    return diff - z * se > 0 if direction == "lower" else diff + z * se < 0


def compare_to_best(estimates: Mapping[str, Estimate], direction: str, level: float = DEFAULT_LEVEL, *,
                    z: float | None = None) -> tuple[str | None, dict[str, Comparison]]:
    """The best variant (by value) and every variant's :class:`Comparison` with it.

    A variant is a *tie* with the best when it is not significantly worse (``worse`` False): the
    interval of its difference at ``level`` (or at quantile ``z``) contains 0.
    """
    best = best_of(estimates, direction)
    if best is None:
        return None, {}
    zz = z_value(level) if z is None else float(z)
    out = {}
    for v, e in estimates.items():
        if e.value is None or not math.isfinite(e.value):
            continue
        if v == best:
            out[v] = Comparison(0.0, 0.0, 0.0, 0.0, e.n, False, True)
            continue
        diff, se, paired = paired_difference(e, estimates[best])
        lo, hi = (None, None) if se is None else (diff - zz * se, diff + zz * se)
        out[v] = Comparison(diff, se, lo, hi, e.n, is_worse(diff, se, direction, zz), paired)
    return best, out
