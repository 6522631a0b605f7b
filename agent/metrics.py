"""Sample-quality metrics as pure functions over features.

Convention everywhere: ``gen`` are features of *generated* samples ``[n_gen, d]``, ``ref`` are
features of *reference* (real) data ``[n_ref, d]``. Inputs are CPU tensors; they are converted to
float64 here (integer features too). Features holding NaN/Inf are refused with a ``ValueError``:
no metric returns a number computed from them. Nothing in this module touches models, files or
global state.

FID/FD and the Inception Score go through torch-fidelity's own metric functions (``metric_fid``,
``metric_isc``); this module only picks safe arguments for them. Precision/recall is torch-fidelity's
``metric_prc`` estimator with exact distances and reference radii shared between calls (its own
recomputes them for every variant and decides ball edges on ``torch.cdist``'s matrix-product rounding;
tested equal on data without edge ties). KID is torch-fidelity's estimator with torch-fidelity's subsets,
computed with torch on the feature device by :mod:`emascope.kid` (tested equal to
``kid_features_to_metric`` to 1e-6; 10x-100x faster, see that module). Density and coverage (Naeem et al. 2020,
"Reliable Fidelity and Diversity Metrics for Generative Models"), which torch-fidelity lacks, are
implemented here; every k-NN ball test is screened by a matrix product in blocks and decided on
exact distances (:mod:`emascope.distances`), so that no ``N x N`` matrix is ever built.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric

from emascope import distances
from emascope.distances import rows_per_block  # noqa: F401 - part of this module's API
from emascope.kid import KIDPlan

#: Memory budget (bytes) of one block of pairwise distances built at a time.
DEFAULT_BLOCK_BYTES = 64 * 2**20

#: Direction of every built-in metric: ``"lower"`` or ``"higher"`` is better.
METRIC_DIRECTIONS: dict[str, str] = {
    "fid": "lower",
    "fd": "lower",
    "kid_mean": "lower",
    "kid_std": "lower",
    "isc_mean": "higher",
    "isc_std": "lower",
    "precision": "higher",
    "recall": "higher",
    "density": "higher",
    "coverage": "higher",
}


def _check_features(name: str, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(x) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [n, d], got {type(x).__name__} "
                         f"with shape {tuple(getattr(x, 'shape', ()))}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 rows, got {x.shape[0]}")
    x = x.detach().to("cpu", torch.float64)
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        rows = int((~finite).any(dim=1).sum())
        raise ValueError(f"{name} hold non-finite values (NaN/Inf) in {rows} of {len(x)} rows; no score is computed "
                         "(a score of them would look real)")
    return x


def _check_pair(gen: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gen, ref = _check_features("gen", gen), _check_features("ref", ref)
    if gen.shape[1] != ref.shape[1]:
        raise ValueError(f"feature dimensions differ: gen has {gen.shape[1]}, ref has {ref.shape[1]}")
    return gen, ref


# ----------------------------------------------------------------------------------------------
# Frechet distance (Heusel et al. 2017, eq. "FID = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^1/2)")


def frechet_statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """Mean ``mu`` [d] and covariance ``sigma`` [d, d] (float64) via torch-fidelity."""
    return fid_features_to_statistics(_check_features("features", features))


def frechet_distance_from_statistics(stats_gen: dict[str, np.ndarray],
                                     stats_ref: dict[str, np.ndarray]) -> float:
    """Frechet distance between two Gaussians given as ``{"mu", "sigma"}`` (torch-fidelity)."""
    return float(fid_statistics_to_metric(stats_gen, stats_ref, False)["frechet_inception_distance"])


def frechet_distance(gen: torch.Tensor, ref: torch.Tensor) -> float:
    """Frechet distance between Gaussian fits of ``gen`` and ``ref`` (FID on Inception features)."""
    gen, ref = _check_pair(gen, ref)
    return frechet_distance_from_statistics(frechet_statistics(gen), frechet_statistics(ref))


# ----------------------------------------------------------------------------------------------
# Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2, cubic polynomial kernel


def kid_subset_size_for(n_gen: int, n_ref: int, requested: int | None = None) -> int:
    """KID subset size: ``requested`` (default torch-fidelity's 1000) capped at both set sizes.

    torch-fidelity refuses a subset larger than either set; the unbiased estimator needs >= 2.
    """
    size = 1000 if requested is None else int(requested)
    if size < 2:
        raise ValueError(f"kid_subset_size must be >= 2, got {requested!r}")
    size = min(size, int(n_gen), int(n_ref))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples in each set, got n_gen={n_gen}, n_ref={n_ref}")
    return size


def kid(gen: torch.Tensor, ref: torch.Tensor, *, subset_size: int | None = None, subsets: int = 100,
        seed: int = 2020, device: str | torch.device | None = None,
        plan: KIDPlan | None = None, keep: dict[str, Any] | None = None) -> dict[str, float]:
    """KID mean and std over ``subsets`` random subsets: torch-fidelity's ``kid_features_to_metric``
    (same estimator, same subsets), computed with torch on ``device`` (:mod:`emascope.kid`).

    ``subset_size`` is capped by :func:`kid_subset_size_for`. Returns ``kid_mean``, ``kid_std``
    and ``kid_subset_size`` (the size actually used). ``plan``: a :func:`kid_plan` built for this
    ``ref`` and these settings (shares the reference side between calls). ``keep``: receives the
    variant's kernel values for its intervals (:meth:`emascope.kid.KIDPlan.values`).
    """
    gen, ref = _check_pair(gen, ref)
    if plan is None:
        plan = kid_plan(ref, len(gen), subset_size=subset_size, subsets=subsets, seed=seed, device=device)
    return plan(gen, keep)


def kid_plan(ref: torch.Tensor, n_gen: int, *, subset_size: int | None = None, subsets: int = 100,
             seed: int = 2020, device: str | torch.device | None = None) -> KIDPlan:
    """The reference side of :func:`kid` for ``n_gen`` generated samples (subsets and reference
    kernel sums), to share between variants; ``subset_size`` capped by :func:`kid_subset_size_for`."""
    ref = _check_features("ref", ref)
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    size = kid_subset_size_for(n_gen, len(ref), subset_size)
    return KIDPlan.build(ref, n_gen, subset_size=size, subsets=int(subsets), seed=int(seed), device=device)


# ----------------------------------------------------------------------------------------------
# Improved precision / recall (Kynkaanniemi et al. 2019): k-NN balls, torch-fidelity's estimator, exact distances


def precision_recall(gen: torch.Tensor, ref: torch.Tensor, *, neighborhood: int = 3,
                     ref_radii: torch.Tensor | None = None,
                     block_bytes: int = DEFAULT_BLOCK_BYTES) -> dict[str, float]:
    """Precision (share of gen inside some ref ball) and recall (share of ref inside some gen ball),
    torch-fidelity's ``prc_features_to_metric`` with exact distances.

    A ball is centred on a point with the radius of its ``neighborhood``-th nearest *other* point of
    its own set (``kthvalue(neighborhood + 1)`` counting itself) and holds the points at distance
    ``<=`` that radius, as in torch-fidelity. torch-fidelity builds every distance with ``torch.cdist``
    (a matrix product: rounding can flip a point lying on a ball's edge) and computes the reference
    radii again for every call; here the radii are exact (:func:`knn_radii`), the pairs inside a ball
    are screened by one matrix product per block of ``block_bytes`` and decided on exact distances
    (:mod:`emascope.distances`), and ``ref_radii`` (:func:`knn_radii` with ``k = neighborhood``) can be
    passed to share the reference side between calls. Equal to torch-fidelity's values on data
    without such edge ties (tested); several times faster.
    """
    gen, ref = _check_pair(gen, ref)
    k = int(neighborhood)
    if k < 1 or k >= min(len(gen), len(ref)):
        raise ValueError(f"neighborhood must be in [1, min(n_gen, n_ref) - 1], got {neighborhood} "
                         f"(n_gen={len(gen)}, n_ref={len(ref)})")
    r_ref = knn_radii(ref, k, block_bytes=block_bytes) if ref_radii is None else ref_radii.to(torch.float64)
    if r_ref.shape != (len(ref),):
        raise ValueError(f"ref_radii must have shape ({len(ref)},), got {tuple(r_ref.shape)}")
    r_gen = knn_radii(gen, k, block_bytes=block_bytes)
    gen_hit = torch.zeros(len(gen), dtype=torch.bool)
    ref_hit = torch.zeros(len(ref), dtype=torch.bool)
    for i, j, d in distances.iter_pairs_within(gen, ref, col_radius=r_ref, row_radius=r_gen,
                                               block_bytes=block_bytes):
        gen_hit[i[d <= r_ref[j]]] = True
        ref_hit[j[d <= r_gen[i]]] = True
    return {"precision": float(gen_hit.double().mean()), "recall": float(ref_hit.double().mean())}


# ----------------------------------------------------------------------------------------------
# Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y))


def inception_score(logits: torch.Tensor, *, splits: int = 10, seed: int = 2020) -> dict[str, float]:
    """Inception Score mean/std over ``splits`` splits (torch-fidelity ``isc_features_to_metric``).

    ``logits`` are unnormalised class scores ``[n, classes]``; ``splits`` is capped at ``n``.
    """
    logits = _check_features("logits", logits)
    splits = max(1, min(int(splits), len(logits)))
    out = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=int(seed))
    return {"isc_mean": float(out["inception_score_mean"]), "isc_std": float(out["inception_score_std"])}


# ----------------------------------------------------------------------------------------------
# Density and coverage (Naeem et al. 2020, eqs. for "density" and "coverage", k nearest neighbours)


def knn_radii(ref: torch.Tensor, k: int = 5, *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> torch.Tensor:
    """Distance of every ref point to its k-th nearest *other* ref point, float64 ``[n_ref]``.

    ``NND_k(X_i)`` of Naeem et al.: the k+1-th smallest distance counting the point itself; exact
    (:func:`emascope.distances.kth_nearest`: a matmul screen, exact distances for the candidates).
    """
    ref = _check_features("ref", ref)
    if k < 1 or k >= len(ref):
        raise ValueError(f"k must be in [1, n_ref - 1], got {k} (n_ref={len(ref)})")
    return distances.kth_nearest(ref, k + 1, block_bytes=block_bytes)


def density_coverage(gen: torch.Tensor, ref: torch.Tensor, *, k: int = 5,
                     ref_radii: torch.Tensor | None = None,
                     block_bytes: int = DEFAULT_BLOCK_BYTES) -> dict[str, float]:
    """Density and coverage of ``gen`` w.r.t. ``ref`` with k-NN balls around the ref points.

    density  = 1/(k M) * sum_j sum_i 1[ |Y_j - X_i| < NND_k(X_i) ]   (M = n_gen, can exceed 1)
    coverage = 1/N     * sum_i 1[ min_j |Y_j - X_i| < NND_k(X_i) ]   (N = n_ref, in [0, 1])

    ``ref_radii`` (from :func:`knn_radii` with the same ``k``) can be passed to skip recomputing
    them for every variant. The pairs inside a ball are screened by a matrix product in blocks of at
    most ``block_bytes`` and decided on exact distances (:func:`emascope.distances.iter_pairs_within`).
    """
    gen, ref = _check_pair(gen, ref)
    radii = knn_radii(ref, k, block_bytes=block_bytes) if ref_radii is None else ref_radii.to(torch.float64)
    if radii.shape != (len(ref),):
        raise ValueError(f"ref_radii must have shape ({len(ref)},), got {tuple(radii.shape)}")
    inside, hit = 0, torch.zeros(len(ref), dtype=torch.bool)
    for _, j, d in distances.iter_pairs_within(gen, ref, col_radius=radii, block_bytes=block_bytes):
        j = j[d < radii[j]]
        inside += len(j)
        hit[j] = True
    return {"density": inside / (k * len(gen)), "coverage": float(hit.sum()) / len(ref)}


def finite_or_none(value: Any) -> float | None:
    """``float(value)`` if finite, else ``None`` (the run format writes NaN/Inf as null)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None
