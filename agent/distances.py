"""Euclidean distances between feature sets: matrix products to find candidates, exact distances to decide.

Pure functions, float64 on CPU (callers pass ``[n, d]`` and ``[m, d]`` feature tensors).

:func:`squared` expands ``|a_i - b_j|^2 = |a_i|^2 + |b_j|^2 - 2 a_i . b_j`` after centring both sets on
``b``'s mean: one ``[n, d] @ [d, m]`` product, several times faster on CPU than the direct differences
(``torch.cdist(..., compute_mode="donot_use_mm_for_euclid_dist")``), with an error of a few ``1e-16``
of the data's squared scale.

A k-NN ball test (``dist <= radius``) needs the exact distance only for the pairs that can be inside a
ball. :func:`iter_pairs_within` screens a block of the expanded matrix against the radii with a relative
margin (:data:`SCREEN_RTOL`, far above the expansion's error), then recomputes the few candidates by the
direct differences (:func:`exact_pairs`) and decides on those: the same pairs as a direct computation,
at the cost of one matrix product and a handful of exact pairs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

#: Relative margin of the screen on squared distances (the expansion's error is ~1e-16 of the scale).
SCREEN_RTOL = 1e-6
#: Default memory budget (bytes) of one block of the expanded matrix.
DEFAULT_BLOCK_BYTES = 64 * 2**20


def squared(a: torch.Tensor, b: torch.Tensor, centre: torch.Tensor | None = None) -> torch.Tensor:
    """``float64 [len(a), len(b)]`` squared Euclidean distances by the matmul expansion, both sets
    centred on ``centre`` (default ``b``'s mean). Not clamped: an entry can be a rounding below 0."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    c = b.mean(0) if centre is None else centre.to(torch.float64)
    a, b = a - c, b - c
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :]
    return sq.addmm_(a, b.T, alpha=-2.0)


def _slack(centre: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """Absolute margin of the screen: the expansion's rounding on the largest centred squared norms."""
    scale = sum(float(((x - centre) ** 2).sum(1).max()) for x in (a, b) if len(x))
    return 64 * torch.finfo(torch.float64).eps * scale


def exact_pairs(a: torch.Tensor, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """``|a_i - b_j|`` for the listed index pairs, from the direct differences (float64 ``[len(i)]``)."""
    diff = a[i].to(torch.float64) - b[j].to(torch.float64)
    return torch.linalg.vector_norm(diff, dim=1)


def iter_pairs_within(a: torch.Tensor, b: torch.Tensor, *, col_radius: torch.Tensor | None = None,
                      row_radius: torch.Tensor | None = None, block_bytes: int = DEFAULT_BLOCK_BYTES,
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every pair ``(i, j)`` with ``|a_i - b_j| <= max(col_radius[j], row_radius[i])`` (a missing radius
    counts as 0), with its exact distance, one block of rows of ``a`` at a time: yields ``(i, j, d)``
    (int64, int64, float64; ``i`` global, ordered by ``i`` then ``j``). A block's expanded matrix uses
    at most ``block_bytes``."""
    if col_radius is None and row_radius is None:
        raise ValueError("pairs_within needs col_radius or row_radius")
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    n, m = len(a64), len(b64)
    centre = b64.mean(0)
    slack = _slack(centre, a64, b64)
    col = None if col_radius is None else col_radius.to(torch.float64)[None, :]
    row = None if row_radius is None else row_radius.to(torch.float64)[:, None]
    # the screen's squared thresholds, per column and per row (radii >= 0: max commutes with squaring)
    col2 = None if col is None else col * col * (1.0 + SCREEN_RTOL) + slack
    row2 = None if row is None else row * row * (1.0 + SCREEN_RTOL) + slack
    step = max(1, int(block_bytes) // max(1, m * 8))
    for s in range(0, n, step):
        sq = squared(a64[s:s + step], b64, centre)
        if col2 is not None and row2 is not None:
            cand = sq <= torch.maximum(col2, row2[s:s + step])
        else:
            cand = sq <= (col2 if col2 is not None else row2[s:s + step])
        i, j = cand.nonzero(as_tuple=True)
        del sq, cand
        i = i + s
        d = exact_pairs(a64, b64, i, j)
        lim = torch.zeros_like(d)
        if col is not None:
            lim = torch.maximum(lim, col[0, j])
        if row is not None:
            lim = torch.maximum(lim, row[i, 0])
        keep = d <= lim
        yield i[keep], j[keep], d[keep]


def pairs_within(a: torch.Tensor, b: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All blocks of :func:`iter_pairs_within` at once: ``(i, j, d)``."""
    parts = list(iter_pairs_within(a, b, **kwargs))
    if not parts:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone(), torch.zeros(0, dtype=torch.float64)
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]


def kth_nearest(a: torch.Tensor, k: int, *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> torch.Tensor:
    """Distance from every row of ``a`` to its ``k``-th nearest row counting itself (``k = 1``: itself,
    0), exact: ``float64 [n]``, as ``torch.cdist(a, a).kthvalue(k)`` by direct differences.

    Per block of rows: the expanded squared distances give each row's ``k``-th smallest; every entry
    within the screen's margin of it (so every true ``k`` nearest) is recomputed exactly, and the
    ``k``-th smallest of those is the answer."""
    a64 = a.to(torch.float64)
    n = len(a64)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    centre = a64.mean(0)
    slack = _slack(centre, a64, a64)
    out = torch.empty(n, dtype=torch.float64)
    step = max(1, int(block_bytes) // max(1, n * 8))
    for s in range(0, n, step):
        sq = squared(a64[s:s + step], a64, centre)
        kth = sq.topk(k, dim=1, largest=False).values[:, -1:]
        i, j = (sq <= kth.clamp_min(0.0) * (1.0 + SCREEN_RTOL) + slack).nonzero(as_tuple=True)
        exact = torch.full_like(sq, torch.inf)
        exact[i, j] = exact_pairs(a64, a64, i + s, j)
        out[s:s + step] = exact.topk(k, dim=1, largest=False).values[:, -1]
    return out
