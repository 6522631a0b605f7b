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

In low dimension (``d <=`` :data:`KDTREE_MAX_DIM`) the candidates come from KD-tree range queries
(``scipy.spatial.cKDTree``) instead of the matrix product (an ``n x m`` screen costs far more than the
few pairs inside the balls when ``d`` is 2), with the same relative margin and the same exact decision,
so both routes return the same pairs and the same distances. A search that would list more than
:data:`KDTREE_MAX_PAIRS` candidates (e.g. every point in one spot), or on tensors off the CPU, takes
the blockwise route.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

#: Relative margin of the screen on squared distances (the expansion's error is ~1e-16 of the scale).
SCREEN_RTOL = 1e-6
#: Default memory budget (bytes) of one block of the expanded matrix.
DEFAULT_BLOCK_BYTES = 64 * 2**20


def rows_per_block(n_cols: int, block_bytes: int = DEFAULT_BLOCK_BYTES, itemsize: int = 8) -> int:
    """Rows of an ``[rows, n_cols]`` block of ``itemsize``-byte numbers that fit in ``block_bytes`` (at least 1)."""
    return max(1, int(block_bytes) // max(1, int(n_cols) * itemsize))


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


#: Up to this feature dimension the candidate pairs come from KD-trees (scipy), above it from blocks.
KDTREE_MAX_DIM = 8
#: A KD-tree search with more candidate pairs than this falls back to the blockwise route.
KDTREE_MAX_PAIRS = 4_000_000
#: Relative (and absolute) margin of the KD-tree range queries (scipy's distances vs the exact ones).
TREE_RTOL, TREE_ATOL = 1e-9, 1e-300

#: Bytes of differences :func:`exact_pairs` holds at a time (small enough to stay in a CPU cache).
PAIR_CHUNK_BYTES = 2 * 2**20


def exact_pairs(a: torch.Tensor, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """``|a_i - b_j|`` for the listed index pairs, from the direct differences (float64 ``[len(i)]``).

    Chunks of :data:`PAIR_CHUNK_BYTES` of differences at a time (3x faster than all at once on
    CPU at 64-d); each pair's value is the same whatever the chunking (tested)."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    out = torch.empty(len(i), dtype=torch.float64, device=a.device)
    step = max(64, PAIR_CHUNK_BYTES // (8 * max(1, a.shape[1])))
    for s in range(0, len(i), step):
        diff = torch.index_select(a, 0, i[s:s + step])
        diff.sub_(torch.index_select(b, 0, j[s:s + step]))
        out[s:s + step] = torch.linalg.vector_norm(diff, dim=1)
    return out


def ball_lists_to_pairs(lists: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``query_ball_point``'s lists (one per query point) as ``(query index, found index)`` int64."""
    sizes = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    found = np.concatenate([np.asarray(x, dtype=np.int64) for x in lists]) if sizes.sum() else \
        np.zeros(0, dtype=np.int64)
    return torch.from_numpy(np.repeat(np.arange(len(lists), dtype=np.int64), sizes)), torch.from_numpy(found)


def tree_candidates(tree: Any, queries: np.ndarray, radius: torch.Tensor,
                    limit: int | None = -1) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Points of ``tree`` within ``radius`` (per query, with the :data:`TREE_RTOL` margin) of every
    query point: ``(query index, found index)``; ``None`` when more than ``limit`` pairs (``-1``:
    :data:`KDTREE_MAX_PAIRS`; ``None``: no limit) would be listed."""
    r = radius.to(torch.float64).numpy() * (1 + TREE_RTOL) + TREE_ATOL
    cap = KDTREE_MAX_PAIRS if limit == -1 else limit
    if cap is not None and int(tree.query_ball_point(queries, r=r, return_length=True).sum()) > cap:
        return None
    return ball_lists_to_pairs(tree.query_ball_point(queries, r=r))


def _tree_pairs(a64: torch.Tensor, b64: torch.Tensor, col: torch.Tensor | None, row: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Candidate pairs ``(i, j)`` of :func:`iter_pairs_within` from KD-trees, ordered by ``i`` then ``j``."""
    from scipy.spatial import cKDTree

    parts = []
    if col is not None:
        found = tree_candidates(cKDTree(a64.numpy()), b64.numpy(), col)
        if found is None:
            return None
        parts.append(found[0] + found[1] * len(b64))              # key i * m + j
    if row is not None:
        found = tree_candidates(cKDTree(b64.numpy()), a64.numpy(), row)
        if found is None:
            return None
        parts.append(found[0] * len(b64) + found[1])
    keys = torch.unique(torch.cat(parts)) if len(parts) > 1 else parts[0].sort().values
    return keys // len(b64), keys % len(b64)


def iter_pairs_within(a: torch.Tensor, b: torch.Tensor, *, col_radius: torch.Tensor | None = None,
                      row_radius: torch.Tensor | None = None, block_bytes: int = DEFAULT_BLOCK_BYTES,
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every pair ``(i, j)`` with ``|a_i - b_j| <= max(col_radius[j], row_radius[i])`` (a missing radius
    counts as 0), with its exact distance, one block of rows of ``a`` at a time: yields ``(i, j, d)``
    (int64, int64, float64; ``i`` global, ordered by ``i`` then ``j``). A block's expanded matrix uses
    at most ``block_bytes``; in low dimension (:data:`KDTREE_MAX_DIM`) one block holds every pair,
    found by KD-trees."""
    if col_radius is None and row_radius is None:
        raise ValueError("pairs_within needs col_radius or row_radius")
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    n, m = len(a64), len(b64)
    col = None if col_radius is None else col_radius.to(torch.float64)
    row = None if row_radius is None else row_radius.to(torch.float64)
    if a64.shape[1] <= KDTREE_MAX_DIM and n and m and a64.device.type == "cpu":
        cand = _tree_pairs(a64, b64, col, row)
        if cand is not None:
            i, j = cand
            d = exact_pairs(a64, b64, i, j)
            lim = torch.zeros_like(d)
            if col is not None:
                lim = torch.maximum(lim, col[j])
            if row is not None:
                lim = torch.maximum(lim, row[i])
            keep = d <= lim
            yield i[keep], j[keep], d[keep]
            return
    centre = b64.mean(0)
    slack = _slack(centre, a64, b64)
    col = None if col_radius is None else col_radius.to(torch.float64)[None, :]
    row = None if row_radius is None else row_radius.to(torch.float64)[:, None]
    # the screen's squared thresholds, per column and per row (radii >= 0: max commutes with squaring)
    col2 = None if col is None else col * col * (1.0 + SCREEN_RTOL) + slack
    row2 = None if row is None else row * row * (1.0 + SCREEN_RTOL) + slack
    step = rows_per_block(m, block_bytes)
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
    if a64.shape[1] <= KDTREE_MAX_DIM and a64.device.type == "cpu":
        out = _tree_kth_nearest(a64, k)
        if out is not None:
            return out
    centre = a64.mean(0)
    slack = _slack(centre, a64, a64)
    out = torch.empty(n, dtype=torch.float64)
    step = rows_per_block(n, block_bytes)
    for s in range(0, n, step):
        sq = squared(a64[s:s + step], a64, centre)
        kth = sq.topk(k, dim=1, largest=False).values[:, -1:]
        i, j = (sq <= kth.clamp_min(0.0) * (1.0 + SCREEN_RTOL) + slack).nonzero(as_tuple=True)
        exact = torch.full_like(sq, torch.inf)
        exact[i, j] = exact_pairs(a64, a64, i + s, j)
        out[s:s + step] = exact.topk(k, dim=1, largest=False).values[:, -1]
    return out


def _tree_kth_nearest(a64: torch.Tensor, k: int) -> torch.Tensor | None:
    """:func:`kth_nearest` from a KD-tree: scipy's ``k``-th distance bounds the ball whose points are
    recomputed exactly (every point whose exact distance is at most the exact ``k``-th lies inside);
    ``None`` when that would list more than :data:`KDTREE_MAX_PAIRS` pairs."""
    from scipy.spatial import cKDTree

    x = a64.numpy()
    tree = cKDTree(x)
    dk = torch.from_numpy(np.asarray(tree.query(x, k=[k])[0]).reshape(len(x)))
    found = tree_candidates(tree, x, dk)
    if found is None:
        return None
    i, j = found
    d = exact_pairs(a64, a64, i, j)
    order = np.lexsort((d.numpy(), i.numpy()))                   # by row, then distance
    start = torch.cumsum(torch.bincount(i, minlength=len(x)), 0) - torch.bincount(i, minlength=len(x))
    return d[torch.from_numpy(order)][start + (k - 1)]
