"""The matmul screen + exact decision of emascope.distances against direct differences (float64)."""

from __future__ import annotations

import pytest
import torch

from emascope import distances as D
from emascope import metrics as M


def _direct(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a.double(), b.double(), compute_mode="donot_use_mm_for_euclid_dist")


def _brute(a, b, col=None, row=None):
    dist = _direct(a, b)
    lim = torch.zeros_like(dist)
    if col is not None:
        lim = torch.maximum(lim, col[None, :].double())
    if row is not None:
        lim = torch.maximum(lim, row[:, None].double())
    i, j = (dist <= lim).nonzero(as_tuple=True)
    return i, j, dist[i, j]


@pytest.mark.parametrize("block_bytes", [64 * 2**20, 3000])  # one block, and blocks of a few rows
def test_pairs_within_equal_the_direct_computation(block_bytes):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 10, generator=g, dtype=torch.float64)
    b = torch.randn(200, 10, generator=g, dtype=torch.float64) * 1.1 + 0.1
    col = M.knn_radii(b, 5)
    row = torch.rand(300, generator=g, dtype=torch.float64) * 3.0
    for kw in ({"col_radius": col}, {"row_radius": row}, {"col_radius": col, "row_radius": row}):
        i, j, d = D.pairs_within(a, b, block_bytes=block_bytes, **kw)
        bi, bj, bd = _brute(a, b, kw.get("col_radius"), kw.get("row_radius"))
        assert torch.equal(i, bi) and torch.equal(j, bj)
        torch.testing.assert_close(d, bd, rtol=1e-13, atol=0.0)
    with pytest.raises(ValueError, match="radius"):
        D.pairs_within(a, b)


def test_exact_ties_far_from_the_origin_are_decided_exactly():
    """Integer points offset by 1e4 (the expansion then loses ~1e-8 absolute on squared distances) with
    radii equal to distances between them: every tie counts as inside (``<=``), as by direct differences,
    and density/coverage (``<``) leave them out."""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-3, 4, (150, 3), generator=g).double() + 1e4
    b = torch.randint(-3, 4, (120, 3), generator=g).double() + 1e4
    col = _direct(a, b).diagonal().clone()  # radius of b_j = |a_j - b_j|: at least one tie per ball
    i, j, d = D.pairs_within(a, b, col_radius=col)
    bi, bj, bd = _brute(a, b, col)
    assert torch.equal(i, bi) and torch.equal(j, bj) and torch.equal(d, bd)
    ties = int((bd == col[bj]).sum())
    assert ties > 100, ties  # the case is really made of ties
    # density / coverage against a direct-difference count with the same strict inequality
    dc = M.density_coverage(a, b, k=5, ref_radii=col)
    inside = _direct(a, b) < col[None, :]
    assert dc["density"] == pytest.approx(float(inside.sum()) / (5 * len(a)), abs=0)
    assert dc["coverage"] == pytest.approx(float(inside.any(0).sum()) / len(b), abs=0)


def test_squared_distances_match_direct_ones_to_rounding():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(50, 64, generator=g, dtype=torch.float64) * 3 + 7
    b = torch.randn(40, 64, generator=g, dtype=torch.float64) * 3 + 7
    torch.testing.assert_close(D.squared(a, b).clamp_min(0).sqrt(), _direct(a, b), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(D.exact_pairs(a, b, torch.tensor([0, 3]), torch.tensor([5, 1])),
                               _direct(a, b)[[0, 3], [5, 1]], rtol=1e-15, atol=0.0)


@pytest.mark.parametrize("block_bytes", [64 * 2**20, 5000])
def test_kth_nearest_equals_the_direct_kthvalue(block_bytes):
    """Random 64-d points far from the origin, and integer points with many exact ties: the k-th
    nearest distance (counting itself) equals ``cdist(...).kthvalue(k)`` by direct differences."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(400, 64, generator=g, dtype=torch.float64) * 2 + 50
    for k in (1, 4, 6):
        torch.testing.assert_close(D.kth_nearest(a, k, block_bytes=block_bytes),
                                   _direct(a, a).kthvalue(k, dim=1).values, rtol=1e-14, atol=0.0)
    grid = torch.randint(-2, 3, (300, 3), generator=g).double() + 1e4
    assert torch.equal(D.kth_nearest(grid, 6, block_bytes=block_bytes), _direct(grid, grid).kthvalue(6, dim=1).values)
    assert torch.equal(M.knn_radii(grid, 5), _direct(grid, grid).kthvalue(6, dim=1).values)
    with pytest.raises(ValueError, match="k must be"):
        D.kth_nearest(grid, 0)


def test_exact_pairs_do_not_depend_on_the_chunking(monkeypatch):
    """Every pair's distance is the direct difference's norm, bit for bit, whatever the chunk size
    (the k-NN metrics and their intervals' structure compute the same pairs in different batches)."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(300, 40, generator=g, dtype=torch.float64)
    b = torch.randn(200, 40, generator=g, dtype=torch.float64)
    i, j = torch.randint(0, 300, (5000,), generator=g), torch.randint(0, 200, (5000,), generator=g)
    direct = torch.linalg.vector_norm(a[i] - b[j], dim=1)
    assert torch.equal(D.exact_pairs(a, b, i, j), direct)
    for chunk in (8 * 40 * 64, 8 * 40 * 1000):
        monkeypatch.setattr(D, "PAIR_CHUNK_BYTES", chunk)
        assert torch.equal(D.exact_pairs(a, b, i, j), direct)
        assert torch.equal(D.exact_pairs(a, b, i[17:19], j[17:19]), direct[17:19])


@pytest.mark.parametrize("d", [2, 3, 8])
def test_kdtree_and_blockwise_routes_give_the_same_pairs_and_radii(d, monkeypatch):
    """In low dimension the candidates come from KD-trees instead of the matrix-product screen: the
    same pairs, the same distances, the same k-th nearest, bit for bit, also on gridded points full of
    exact ties and on a collapsed set (every point in one spot: too many candidates, blockwise)."""
    g = torch.Generator().manual_seed(d)
    sets = [(torch.randn(400, d, generator=g, dtype=torch.float64), torch.randn(300, d, generator=g,
                                                                                  dtype=torch.float64) * 1.2),
            (torch.randint(-2, 3, (250, d), generator=g).double() + 1e4,
             torch.randint(-2, 3, (200, d), generator=g).double() + 1e4)]
    for a, b in sets:
        col, row = M.knn_radii(b, 3), D.kth_nearest(a, 4)
        tree = [D.pairs_within(a, b, **kw) for kw in ({"col_radius": col}, {"row_radius": row},
                                                      {"col_radius": col, "row_radius": row})]
        kth = [D.kth_nearest(a, k) for k in (1, 2, 5)]
        with monkeypatch.context() as mp:
            mp.setattr(D, "KDTREE_MAX_DIM", 0)
            blocks = [D.pairs_within(a, b, **kw) for kw in ({"col_radius": col}, {"row_radius": row},
                                                            {"col_radius": col, "row_radius": row})]
            assert all(torch.equal(D.kth_nearest(a, k), x) for k, x in zip((1, 2, 5), kth, strict=True))
        for t, bl in zip(tree, blocks, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(t, bl, strict=True))
        bi, bj, bd = _brute(a, b, col, row)
        assert torch.equal(tree[2][0], bi) and torch.equal(tree[2][1], bj)
    collapsed = torch.zeros(300, d, dtype=torch.float64)
    monkeypatch.setattr(D, "KDTREE_MAX_PAIRS", 10_000)  # 300 x 300 candidates: the blockwise route
    assert torch.equal(D.kth_nearest(collapsed, 4), torch.zeros(300, dtype=torch.float64))
    i, j, dist = D.pairs_within(collapsed, collapsed[:7], col_radius=torch.zeros(7, dtype=torch.float64))
    assert len(i) == 300 * 7 and not dist.any()
