"""emascope.uncertainty: half-sample intervals against known truths, replicates against independent
recomputation, pairing, ties; the agent's intervals, comparisons, noise floor and racing end to end.

Coverage tests: over 200 repetitions with fixed seeds, the 95% interval must cover the truth a number
of times inside the two-sided 99.9% binomial band of Binomial(200, 0.95) ([179, 198]): a test of
the method, not of one lucky draw.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.special import gammaln
from scipy.stats import binom
from torch_fidelity.metric_prc import prc_features_to_metric

from emascope import distances as D
from emascope import metrics as M
from emascope import uncertainty as U

torch.set_num_threads(1)
REPS = 200
LEVEL = 0.95
LOW, HIGH = binom.ppf(0.0005, REPS, LEVEL), binom.ppf(0.9995, REPS, LEVEL)


def _covers(value: float, reps: np.ndarray, n: int, truth: float, metric: str | None = None) -> bool:
    lo, hi = U.Estimate(value, reps, n).interval(LEVEL, metric)
    return lo <= truth <= hi


def _c4(n: int) -> float:
    """E[s] / sigma for the sample standard deviation (ddof=1) of n Gaussian draws."""
    return math.sqrt(2.0 / (n - 1)) * math.exp(gammaln(n / 2) - gammaln((n - 1) / 2))


# ---------------------------------------------------------------------------------------------- coverage


@pytest.mark.parametrize("method", ["exact", "linear"])
def test_fd_interval_covers_the_analytic_expectation_in_1d(method):
    """1-D Gaussians: E[FD_hat] = (mu - mu_r)^2 + s^2/n + s^2 + sr^2 - 2 sr s c4(n) exactly (the sample
    variance is unbiased, the sample standard deviation has mean c4(n) s)."""
    n, mu, s, mu_r, sr = 400, 0.3, 1.2, 0.0, 1.0
    truth = (mu - mu_r) ** 2 + s * s / n + s * s + sr * sr - 2 * sr * s * _c4(n)
    ref = {"mu": np.array([mu_r]), "sigma": np.array([[sr * sr]])}
    masks = U.half_sample_masks(n, 100, seed=0)
    g = torch.Generator().manual_seed(1)
    hits = 0
    for _ in range(REPS):
        x = mu + s * torch.randn(n, 1, generator=g, dtype=torch.float64)
        var = float(x.var())  # 1-D FD written out (torch-fidelity's statistics need d >= 2)
        value = (float(x.mean()) - mu_r) ** 2 + var + sr * sr - 2 * sr * math.sqrt(var)
        hits += _covers(value, U.fd_replicates(x, ref, masks, method=method), n, truth, "fd")
    print("coverage of 200:", hits)
    assert LOW <= hits <= HIGH, hits


@pytest.mark.parametrize("method", ["exact", "linear"])
def test_fd_interval_covers_the_population_distance_in_4d(method):
    """4-D Gaussians against a reference given by its exact moments: the interval covers the closed-form
    FD of the two populations (n large enough that the estimator's bias is small next to its noise)."""
    n, d = 1500, 4
    a = torch.tensor([[1.0, 0.3, 0, 0], [0, 1.1, 0.2, 0], [0, 0, 0.9, 0], [0.1, 0, 0, 1.2]], dtype=torch.float64)
    mu = torch.full((d,), 0.3, dtype=torch.float64)
    cov_g = a @ a.T
    ref = {"mu": np.zeros(d), "sigma": np.eye(d)}
    root = U.sqrtm_psd(cov_g)
    truth = float(mu @ mu + torch.trace(cov_g) + d - 2 * torch.linalg.eigvalsh(root @ root).clamp_min(0).sqrt().sum())
    masks = U.half_sample_masks(n, 100, seed=0)
    g = torch.Generator().manual_seed(2)
    hits = 0
    for _ in range(REPS):
        x = mu + torch.randn(n, d, generator=g, dtype=torch.float64) @ a.T
        value = M.frechet_distance_from_statistics(M.frechet_statistics(x), ref)
        hits += _covers(value, U.fd_replicates(x, ref, masks, method=method), n, truth, "fd")
    print("coverage of 200:", hits)
    assert LOW <= hits <= HIGH, hits


def _union_length(centres: np.ndarray, radii: np.ndarray, lo: float, hi: float) -> float:
    """Length of (union of [c - r, c + r]) within [lo, hi], by merging sorted intervals."""
    iv = sorted(zip(centres - radii, centres + radii, strict=True))
    total, cur_a, cur_b = 0.0, None, None
    for a, b in iv:
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += max(0.0, min(cur_b, hi) - max(cur_a, lo))
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None:
        total += max(0.0, min(cur_b, hi) - max(cur_a, lo))
    return total


def _structure(x, ref, masks, k=3):
    return U.neighbour_structure(x, ref, masks, prc_k=k, ref_radii_prc=M.knn_radii(ref, k), dc_k=5,
                                 ref_radii_dc=M.knn_radii(ref, 5))


@pytest.mark.parametrize("d", [2, 16, 64])
def test_knn_structure_values_equal_the_metrics_bit_for_bit(d):
    """A sweep with intervals reads the four k-NN metrics from the structure of their intervals: they
    must be the metrics' own values exactly, also with duplicated points, a collapsed cluster and
    gridded data (ties everywhere), in the KD-tree (d <= 8) and the blockwise paths."""
    g = torch.Generator().manual_seed(d)
    for case in range(6):
        n, m = 240 + 30 * case, 260
        gen = torch.randn(n, d, generator=g, dtype=torch.float64) * 1.1 + 0.2
        ref = torch.randn(m, d, generator=g, dtype=torch.float64)
        if case % 2:
            gen[: n // 3] = gen[0]
            gen[n // 3: n // 2] = ref[: n // 2 - n // 3]
        if case >= 4:
            gen, ref = torch.round(gen * 2) / 2, torch.round(ref * 2) / 2
        rp, rd = M.knn_radii(ref, 3), M.knn_radii(ref, 5)
        s = U.neighbour_structure(gen, ref, U.half_sample_masks(n, 10, seed=1), prc_k=3, ref_radii_prc=rp,
                                  dc_k=5, ref_radii_dc=rd)
        assert U.prdc_values(s) == {**M.precision_recall(gen, ref, ref_radii=rp),
                                    **M.density_coverage(gen, ref, ref_radii=rd)}, case


def test_knn_replicates_when_no_generated_ball_reaches_the_reference():
    """Generated points far from every reference point: no pair for recall, precision, density or
    coverage in any half-sample. Every replicate is 0, as the metrics are, in both routes."""
    g = torch.Generator().manual_seed(4)
    for d in (2, 16):
        ref = torch.randn(80, d, generator=g, dtype=torch.float64)
        gen = torch.randn(60, d, generator=g, dtype=torch.float64) * 0.1 + 1e3
        masks = U.half_sample_masks(60, 16, seed=0)
        s = _structure(gen, ref, masks)
        assert len(s.rec_i) == 0 and len(s.cov_i) == 0
        reps = U.prdc_replicates(s, masks)
        assert all(not np.any(reps[k]) for k in ("precision", "recall", "density", "coverage"))
        assert U.prdc_values(s) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    assert U.count_bits(torch.zeros(0, 2, dtype=torch.int64), 100).tolist() == [0] * 100


def test_precision_and_recall_intervals_cover_known_overlaps():
    """1-D: reference U[0, 1] (fixed), generated U[0.5, 1.5]. Precision's truth is exact: the share of
    U[0.5, 1.5] inside the union of the reference's k-NN balls. Recall's truth (the expected share of
    the fixed reference inside the generated k-NN balls) is computed independently by brute force,
    averaging a plain numpy recall over 1000 fresh generated sets."""
    n, m, k = 400, 300, 3
    g = torch.Generator().manual_seed(3)
    ref = torch.rand(m, 1, generator=g, dtype=torch.float64)
    r_ref = M.knn_radii(ref, k).numpy()
    p_truth = _union_length(ref[:, 0].numpy(), r_ref, 0.5, 1.5)  # / |[0.5, 1.5]| = 1
    y = ref[:, 0].numpy()
    rng = np.random.default_rng(4)
    rec = []
    for _ in range(1000):
        xs = np.sort(rng.uniform(0.5, 1.5, n))
        # in 1-D the k nearest other points are among the k on each side of a sorted point
        pad = np.concatenate([np.full(k, -np.inf), xs, np.full(k, np.inf)])
        near = np.stack([np.abs(pad[k + j: k + j + n] - xs) for j in range(-k, k + 1) if j], 1)
        rad = np.sort(near, axis=1)[:, k - 1]
        rec.append(float(((y[:, None] >= (xs - rad)[None]) & (y[:, None] <= (xs + rad)[None])).any(1).mean()))
    r_truth = float(np.mean(rec))
    assert 0.45 < p_truth < 0.55 and 0.45 < r_truth < 0.55  # the known overlap: half of each
    masks = U.half_sample_masks(n, 100, seed=0)
    hits = {"precision": 0, "recall": 0}
    for _ in range(REPS):
        x = 0.5 + torch.rand(n, 1, generator=g, dtype=torch.float64)
        s = _structure(x, ref, masks, k)
        values, reps = U.prdc_values(s), U.prdc_replicates(s, masks)
        hits["precision"] += _covers(values["precision"], reps["precision"], n, p_truth)
        hits["recall"] += _covers(values["recall"], reps["recall"], n, r_truth)
    print("coverage of 200:", hits)
    assert all(LOW <= h <= HIGH for h in hits.values()), hits


def test_coverage_interval_covers_in_high_dimension():
    """Coverage in 32-d, generated N(0.25, 1.15^2) against a fixed N(0, 1) reference: most reference
    balls are reached by a few samples or none, where half-samples see too little spread (their
    intervals covered 70-74% at 64-d). The delete-1 jackknife's interval covers the mean coverage
    within the binomial band."""
    n, d = 300, 32
    g = torch.Generator().manual_seed(8)
    ref = torch.randn(n, d, generator=g, dtype=torch.float64)
    rp, rd = M.knn_radii(ref, 3), M.knn_radii(ref, 5)
    masks = U.half_sample_masks(n, 20, seed=0)  # (precision/recall/density ride along; unused here)

    def coverage(x):
        s = U.neighbour_structure(x, ref, masks, ref_radii_prc=rp, ref_radii_dc=rd)
        return U.prdc_values(s)["coverage"], U.prdc_replicates(s, masks)["coverage"]

    def draw():
        return torch.randn(n, d, generator=g, dtype=torch.float64) * 1.15 + 0.25

    truth = float(np.mean([coverage(draw())[0] for _ in range(400)]))
    assert 0.2 < truth < 0.8  # the regime where coverage's variance lies in the unreached balls
    hits = 0
    for _ in range(REPS):
        value, reps = coverage(draw())
        lo, hi = U.Estimate(value, reps, n, kept=n - 1).interval(LEVEL, "coverage")
        hits += lo <= truth <= hi
    print("coverage of 200:", hits)
    assert LOW <= hits <= HIGH, hits


# ---------------------------------------------------------------------------------------------- replicates


def _rows(masks, b):
    return masks[b].nonzero().squeeze(1)


def test_half_sample_masks_and_the_jackknife_formula():
    m = U.half_sample_masks(101, 40, seed=3)
    assert m.shape == (40, 101) and m.dtype == torch.bool and (m.sum(1) == 50).all()
    assert torch.equal(m, U.half_sample_masks(101, 40, seed=3))            # same (n, seed): same halves
    assert not torch.equal(m, U.half_sample_masks(101, 40, seed=4))
    assert not torch.equal(U.half_sample_masks(100, 40, seed=3), m[:, :100])  # n is part of the seed
    x = np.random.default_rng(0).normal(size=40)
    r, d = 50, 51
    loop = sum((v - x.mean()) ** 2 for v in x) * r / (d * len(x))
    assert U.jackknife_variance(x, 101) == pytest.approx(loop, rel=1e-12)
    # a mean: the half-sample variance is the textbook s^2 / n (finite-population correction 1/2)
    v = torch.randn(400, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reps = U.mean_replicates(v, U.half_sample_masks(400, 4000, seed=0))
    assert U.jackknife_variance(reps, 400) == pytest.approx(float(v.var()) / 400, rel=0.08)
    with pytest.raises(ValueError, match="at least 4"):
        U.half_sample_masks(3, 10)
    with pytest.raises(ValueError, match="level"):
        U.z_value(1.0)


def test_replicates_equal_the_metric_recomputed_on_each_half():
    """Every replicate is the metric of the kept rows, computed independently: torch-fidelity's FD,
    precision/recall and IS, emascope's density/coverage, a float64 loop for the KID U-statistic."""
    g = torch.Generator().manual_seed(5)
    gen = torch.randn(120, 3, generator=g, dtype=torch.float64) * 1.2 + 0.2
    ref = torch.randn(90, 3, generator=g, dtype=torch.float64)
    gen[100:110] = ref[:10]  # generated points on reference points: distances tie with radii
    masks = U.half_sample_masks(120, 12, seed=1)
    stats = M.frechet_statistics(ref)
    fd = U.fd_replicates(gen, stats, masks, method="exact")
    kid = U.kid_replicates(gen, ref, masks)
    for dim_big in (False, True):  # KD-tree and blockwise neighbour structures
        old = D.KDTREE_MAX_DIM
        D.KDTREE_MAX_DIM = 0 if dim_big else 8
        try:
            s = _structure(gen, ref, masks)
        finally:
            D.KDTREE_MAX_DIM = old
        prdc = U.prdc_replicates(s, masks)
        assert s.short_lists == 0
        for b in range(len(masks)):
            x = gen[_rows(masks, b)]
            tf = prc_features_to_metric(x, ref, prc_neighborhood=3, prc_batch_size=1000, save_cpu_ram=False,
                                        verbose=False)
            dc = M.density_coverage(x, ref, k=5)
            assert prdc["precision"][b] == pytest.approx(tf["precision"], abs=1e-6)  # float32 mean there
            assert prdc["recall"][b] == pytest.approx(tf["recall"], abs=1e-6)
            assert prdc["density"][b] == pytest.approx(dc["density"], abs=1e-12)
            pr = M.precision_recall(x, ref, neighborhood=3)  # exact distances: the same counts exactly
            assert (prdc["precision"][b], prdc["recall"][b]) == (pr["precision"], pr["recall"])
        # coverage deletes one sample at a time: replicate i is coverage without row i
        assert prdc["coverage"].shape == (len(gen),)
        for i in (0, 7, 63, len(gen) - 1):
            rest = torch.cat([gen[:i], gen[i + 1:]])
            assert prdc["coverage"][i] == pytest.approx(M.density_coverage(rest, ref, k=5)["coverage"], abs=1e-12)
    y = ref.numpy()
    for b in range(len(masks)):
        x = gen[_rows(masks, b)]
        assert fd[b] == pytest.approx(M.frechet_distance(x, ref), rel=1e-9)
        xs, r, mm, dim = x.numpy(), len(x), len(y), x.shape[1]

        def k(a, c, dim=dim):
            return (a @ c / dim + 1.0) ** 3

        xx = sum(k(xs[i], xs[j]) for i in range(r) for j in range(r) if i != j) / (r * (r - 1))
        yy = sum(k(y[i], y[j]) for i in range(mm) for j in range(mm) if i != j) / (mm * (mm - 1))
        xy = sum(k(xs[i], y[j]) for i in range(r) for j in range(mm)) / (r * mm)
        assert kid[b] == pytest.approx(xx + yy - 2 * xy, rel=1e-9, abs=1e-12)
    # with every row kept: torch-fidelity's own values (IS keeps its splits)
    full = torch.ones(2, 120, dtype=torch.bool)
    for method in ("exact", "linear"):
        assert U.fd_replicates(gen, stats, full, method=method)[0] == pytest.approx(M.frechet_distance(gen, ref),
                                                                                   rel=1e-9)
    logits = torch.randn(120, 7, generator=g, dtype=torch.float64) * 2
    assert U.isc_replicates(logits, full, seed=9)[0] == pytest.approx(
        M.inception_score(logits, seed=9)["isc_mean"], rel=1e-12)
    # the kernel-matrix path of KID agrees with the feature-map path
    wide = torch.randn(40, 6, generator=g, dtype=torch.float64)
    m40 = U.half_sample_masks(40, 5, seed=2)
    ref6 = torch.randn(30, 6, generator=g, dtype=torch.float64)
    via_matrix = U.kid_replicates(wide, ref6, m40)  # (6 + 1)^3 = 343 > 40 rows: kernel blocks
    phi = U.poly_feature_map(wide, 1 / 6)
    quad = ((m40.double() @ phi) ** 2).sum(1) - m40.double() @ (phi * phi).sum(1)
    cross = phi @ U.poly_feature_map(ref6, 1 / 6).sum(0)
    direct = quad / (20 * 19) + U.kid_reference_term(ref6) - 2 * (m40.double() @ cross) / (20 * 30)
    np.testing.assert_allclose(via_matrix, direct.numpy(), rtol=1e-9)


def test_linearized_fd_replicates_track_the_exact_ones_at_a_fraction_of_the_cost():
    """Eq. U-4 against the FD recomputed on every half (float64, torch-fidelity's covariance
    convention): same standard error within 10% and replicates correlated (their mean differs by the
    half-sample bias of the square-root term, which the spread does not see); with every row kept it
    is torch-fidelity's FD (test above); ``auto`` takes it only when a half has more rows than features."""
    g = torch.Generator().manual_seed(11)
    for n, d in ((600, 8), (800, 96)):
        ref = torch.randn(n, d, generator=g, dtype=torch.float64)
        gen = torch.randn(n, d, generator=g, dtype=torch.float64) * 1.15 + 0.2
        stats = M.frechet_statistics(ref)
        masks = U.half_sample_masks(n, 60, seed=3)
        exact = U.fd_replicates(gen, stats, masks, method="exact")
        linear = U.fd_replicates(gen, stats, masks, method="linear")
        np.testing.assert_array_equal(U.fd_replicates(gen, stats, masks), linear)  # auto: r > d
        se_e, se_l = math.sqrt(U.jackknife_variance(exact, n)), math.sqrt(U.jackknife_variance(linear, n))
        assert se_l == pytest.approx(se_e, rel=0.10), (n, d, se_e, se_l)
        assert np.corrcoef(exact, linear)[0, 1] > 0.9
    # collapsed samples (no spread at all): the tangent is not finite, auto falls back to the exact halves
    flat = torch.full((200, 8), 0.5, dtype=torch.float64)
    st8 = M.frechet_statistics(torch.randn(200, 8, generator=g, dtype=torch.float64))
    m200 = U.half_sample_masks(200, 10, seed=4)
    auto = U.fd_replicates(flat, st8, m200)
    assert np.isfinite(auto).all()
    np.testing.assert_array_equal(auto, U.fd_replicates(flat, st8, m200, method="exact"))
    # more features than rows in a half: the tangent does not exist, auto stays exact
    x = torch.randn(20, 12, generator=g, dtype=torch.float64)
    st = M.frechet_statistics(torch.randn(30, 12, generator=g, dtype=torch.float64))
    m20 = U.half_sample_masks(20, 8, seed=1)
    np.testing.assert_array_equal(U.fd_replicates(x, st, m20), U.fd_replicates(x, st, m20, method="exact"))
    with pytest.raises(ValueError, match="method"):
        U.fd_replicates(x, st, m20, method="taylor")


def test_paired_difference_is_tighter_and_ties_are_ties():
    """Common random numbers: two variants that share the same noise differ by much less than either
    varies; identical variants are a tie (difference 0, standard error 0); a clearly shifted one is not."""
    g = torch.Generator().manual_seed(6)
    noise = torch.randn(600, 1, generator=g, dtype=torch.float64)
    masks = U.half_sample_masks(600, 100, seed=0)
    a = U.Estimate(float(noise.mean()), U.mean_replicates(noise[:, 0], masks), 600)
    b_vals = noise[:, 0] + 0.02 + 0.01 * torch.randn(600, generator=g, dtype=torch.float64)
    b = U.Estimate(float(b_vals.mean()), U.mean_replicates(b_vals, masks), 600)
    diff, se, paired = U.paired_difference(b, a)
    assert paired and se < 0.05 * a.se
    best, comps = U.compare_to_best({"a": a, "a_again": U.Estimate(a.value, a.replicates.copy(), 600), "b": b},
                                    "lower")
    assert best in ("a", "a_again")
    assert comps["a"].worse is False and comps["a_again"].worse is False  # identical: a tie
    assert comps["b"].worse is True and comps["b"].lo > 0                 # shifted by 0.02: significant
    # unpaired (different n): the standard errors add up
    c = U.Estimate(b.value, U.mean_replicates(b_vals[:500], U.half_sample_masks(500, 100, seed=0)), 500)
    _, se_c, paired_c = U.paired_difference(c, a)
    assert not paired_c and se_c == pytest.approx(math.hypot(c.se, a.se))
    # a variant scored on fewer samples (dropped by a race) is compared with the best, never chosen as it
    assert U.best_of({"full": U.Estimate(1.0, n=600), "dropped": U.Estimate(0.1, n=300)}, "lower") == "full"


def test_black_box_replicates_call_the_hook_on_halves():
    calls = []

    def hook(x):
        calls.append(len(x))
        return {"m": float(x.mean()), "bad": "text"}

    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    reps = U.black_box_replicates(hook, x, U.half_sample_masks(50, 30, seed=0), max_calls=7)
    assert calls == [25] * 7 and set(reps) == {"m"} and len(reps["m"]) == 7


# ---------------------------------------------------------------------------------------------- racing


def test_racing_schedule_and_decisions():
    from emascope import racing

    assert racing.schedule(16, 0.125) == [2, 4, 8, 16]
    assert racing.schedule(8, 0.125) == [1, 2, 4, 8]
    assert racing.schedule(5, 0.3) == [2, 4, 5]
    assert racing.schedule(3, 1.0) == [3]
    with pytest.raises(ValueError):
        racing.schedule(0, 0.5)
    assert racing.drop_z(0.95, 3) == pytest.approx(U.z_value(1 - 0.05 / 3))

    # three variants sharing the same noise: "good" and "same" identical, "bad" worse by 0.5 sd
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1600, generator=g, dtype=torch.float64)
    shift = {"good": 0.0, "same": 0.0, "bad": 0.5, "awful": 5.0}
    calls = []

    def score_round(alive, batches):
        n = batches * 100
        calls.append((tuple(alive), n))
        masks = U.half_sample_masks(n, 100, seed=0)
        return {v: U.Estimate(float(noise[:n].mean()) + shift[v],
                              U.mean_replicates(noise[:n] + shift[v], masks), n) for v in alive}

    res = racing.race(list(shift), racing.schedule(16, 0.125), score_round, "lower", 0.95)
    dropped = res.dropped()
    assert dropped["awful"][0] == 0 and dropped["bad"][0] == 0  # both hopeless after 200 samples
    assert res.survivors == ["good", "same"] and res.batches == {"good": 16, "same": 16, "bad": 2, "awful": 2}
    assert calls[0] == (("good", "same", "bad", "awful"), 200) and calls[-1] == (("good", "same"), 1600)
    summary = racing.race_summary(res, "m", 100, 1600)
    assert [r["n"] for r in summary["rounds"]] == [200, 400, 800, 1600]
    assert summary["rounds"][0]["dropped"] == ["awful", "bad"]


# ---------------------------------------------------------------------------------------------- the agent


def _events(run_dir, type_=None):
    out = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [e for e in out if type_ is None or e["type"] == type_]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(run_dir, *, lr=1e-2, steps=30, sample_metrics=None, **kw):
    from scope_helpers import Denoiser, mixture, sampler, train_step

    from emascope import attach

    torch.manual_seed(0)
    model = Denoiser()
    opt = torch.optim.SGD(model.parameters(), lr=lr) if lr == 0 else torch.optim.Adam(model.parameters(), lr=lr)
    data, g = mixture(1000, seed=1), torch.Generator().manual_seed(0)
    kw = {"decays": (0.9, 0.999999), "num_samples": 400, "batch_size": 100, "kid_subset_size": 100, **kw}
    with attach(model, opt, run_dir=run_dir, sampler=sampler, reference=mixture(400, seed=3), score_every=steps,
                sample_metrics=sample_metrics, score_at_close=False, **kw) as scope:
        for _ in range(steps):
            train_step(model, opt, data, g)
    return scope


def test_identical_variants_tie_and_a_collapsed_one_does_not(tmp_path):
    """lr = 0: every EMA of a model that never moves is the model itself, so raw and 0.9 are the same
    samples: a tie on every metric (difference 0). Trained: 0.999999 is still the initial weights and
    is significantly worse than the best on FD."""
    _run(tmp_path / "frozen", lr=0)
    comp = _events(tmp_path / "frozen", "comparison")[-1]
    assert comp["level"] == 0.95 and comp["method"] == "half_sample" and comp["replicates"] == 100
    for metric in ("fd", "precision", "recall", "density", "coverage", "kid_mean"):
        entry = comp["metrics"][metric]
        assert {v["worse"] for v in entry["variants"].values()} == {False}, metric
        assert {v["diff"] for v in entry["variants"].values()} == {0.0}, metric
    _run(tmp_path / "trained", steps=200)
    comp = _events(tmp_path / "trained", "comparison")[-1]["metrics"]["fd"]
    assert comp["best"] in ("raw", "0.9") and comp["variants"]["0.999999"]["worse"] is True
    assert comp["variants"]["0.999999"]["paired"] is True and comp["n"] == 400
    recs = [r for r in _metrics(tmp_path / "trained") if r["metric"] == "fd"]
    assert all(r["lo"] <= r["value"] <= r["hi"] and r["n"] == 400 for r in recs)


def test_noise_floor_and_per_sample_metrics(tmp_path):
    """The noise floor is scored once (a reference split without exact samples); a sample_metrics
    value returned per sample is recorded as its mean with an interval and costs no extra call; a
    plain number gets one from extra calls on halves; a (value, se) pair keeps its se."""
    calls = []

    def hook(x):
        calls.append(len(x))
        r = x.double().norm(dim=1)
        return {"radius": r, "radius_mean": float(r.mean()), "given": (1.5, 0.25)}

    _run(tmp_path / "r", sample_metrics=hook, bootstrap_calls=5,
         evaluate=lambda model: {"val": (0.5, 0.1), "plain": 2.0},
         metric_directions={"val": "lower", "plain": "lower", "radius": "lower"})
    floor = _events(tmp_path / "r", "noise_floor")
    assert len(floor) == 1 and floor[0]["source"] == "reference_split" and floor[0]["n"] == 200
    assert floor[0]["n_reference"] == 200 and floor[0]["level"] == 0.95
    assert {"fd", "precision", "recall", "coverage", "radius", "radius_mean"} <= set(floor[0]["metrics"])
    # per variant: 1 call on all 400 samples + 5 on halves; the floor: 1 + 5 on the 200 reference items
    assert calls == [200] + [100] * 5 + [400, *[200] * 5] * 3
    recs = {(r["variant"], r["metric"]): r for r in _metrics(tmp_path / "r")}
    per_sample, plain, given = recs[("0.9", "radius")], recs[("0.9", "radius_mean")], recs[("0.9", "given")]
    assert per_sample["value"] == pytest.approx(plain["value"], rel=1e-12)
    assert per_sample["se"] > 0 and plain["se"] > 0 and per_sample["n"] == 400
    assert given["value"] == 1.5 and given["se"] == 0.25 and given["hi"] == pytest.approx(1.5 + 1.96 * 0.25, rel=1e-3)
    val, plain_eval = recs[("0.9", "val")], recs[("0.9", "plain")]
    assert val["value"] == 0.5 and val["se"] == 0.1 and "n" not in val  # evaluate: (value, se), no samples
    assert plain_eval["value"] == 2.0 and "se" not in plain_eval
    comp = _events(tmp_path / "r", "comparison")[-1]["metrics"]
    assert comp["val"]["variants"]["0.9"]["paired"] is False and comp["radius"]["variants"]["0.9"]["paired"] is True
    exact = torch.randn(500, 2, generator=torch.Generator().manual_seed(9))
    _run(tmp_path / "e", exact_samples=exact, uncertainty=False)
    floor = _events(tmp_path / "e", "noise_floor")[0]
    assert floor["source"] == "exact" and floor["n"] == 400 and floor["n_reference"] == 400
    assert floor["metrics"]["fd"]["se"] is None  # intervals off: values only
    assert not _events(tmp_path / "e", "comparison")
    assert all("se" not in r for r in _metrics(tmp_path / "e"))


def test_intervals_change_no_metric_value(tmp_path):
    """The same run scored with and without intervals: every metric value, and every value of the
    noise floor, is the same, bit for bit (with intervals the k-NN metrics come from their intervals'
    structure and KID keeps its kernels for its interval)."""
    _run(tmp_path / "on", steps=60, uncertainty=True)
    _run(tmp_path / "off", steps=60, uncertainty=False)
    on = {(r["step"], r["variant"], r["metric"]): r["value"] for r in _metrics(tmp_path / "on")}
    off = {(r["step"], r["variant"], r["metric"]): r["value"] for r in _metrics(tmp_path / "off")}
    assert on == off and len(on) >= 3 * 7  # raw, 0.9, 0.999999 x fd, kid x 2, precision .. coverage
    floor_on, floor_off = (_events(tmp_path / x, "noise_floor")[0]["metrics"] for x in ("on", "off"))
    assert {k: v["value"] for k, v in floor_on.items()} == {k: v["value"] for k, v in floor_off.items()}
    assert floor_on["recall"]["se"] > 0 and floor_off["recall"]["se"] is None
    assert {"precision", "recall", "density", "coverage", "kid_mean"} <= {k[2] for k in on}


def test_racing_sweep_keeps_the_full_sweeps_survivors_and_draws_less(tmp_path):
    """The same training run scored with and without racing: the variants that survive the race hold
    exactly the full sweep's samples (same values, same intervals), the final best is the full
    sweep's, the collapsed decay stops after the first round, and fewer samples are drawn."""
    kw = dict(steps=200, decays=(0.5, 0.9, 0.99, 0.999999), num_samples=800, batch_size=100)
    _run(tmp_path / "full", **kw)
    _run(tmp_path / "race", racing=True, racing_metric="fd", racing_first=0.125, **kw)
    done = _events(tmp_path / "race", "score_done")[-1]
    rounds = done["racing"]["rounds"]
    assert done["racing"]["metric"] == "fd" and [r["n"] for r in rounds] == [100, 200, 400, 800]
    assert "0.999999" in rounds[0]["dropped"]
    assert done["samples_drawn"] < done["samples_full"] == 5 * 800
    survivors = rounds[-1]["variants"]
    full = {(r["variant"], r["metric"]): r for r in _metrics(tmp_path / "full")}
    race = {(r["variant"], r["metric"]): r for r in _metrics(tmp_path / "race")}
    for (v, m), r in race.items():
        if v in survivors:
            for key in ("value", "se", "lo", "hi", "n"):
                want = full[(v, m)].get(key)
                assert r.get(key) == (want if want is None else pytest.approx(want, rel=1e-9, abs=1e-12)), (v, m, key)
        else:
            assert r["n"] < 800
    cf = _events(tmp_path / "full", "comparison")[-1]["metrics"]["fd"]
    cr = _events(tmp_path / "race", "comparison")[-1]["metrics"]["fd"]
    assert cr["best"] == cf["best"] and cr["variants"]["0.999999"]["worse"] is True
    assert cr["variants"]["0.999999"]["n"] == 100  # the decision of the round that dropped it


def test_a_reference_too_small_to_split_gives_a_notice_not_an_error(tmp_path):
    """A reference of 8 items with nearest_k = 5 cannot be split into a sample and a k-NN reference:
    the noise floor is skipped with a notice naming the sizes, the variants are still scored, and no
    error is recorded."""
    from scope_helpers import Denoiser, mixture, sampler

    from emascope import attach

    model = Denoiser()
    with attach(model, None, run_dir=tmp_path / "r", sampler=sampler, reference=mixture(8, seed=3), decays=(0.9,),
                num_samples=16, batch_size=16, score_every=None, snapshot_every=None) as scope:
        scope.score_now()
    events = [json.loads(line) for line in (tmp_path / "r" / "events.jsonl").read_text().splitlines()]
    assert not [e for e in events if e["type"] == "error"], events
    (notice,) = [e for e in events if e["type"] == "notice" and e.get("where") == "noise_floor"]
    assert "8 items" in notice["message"] and "nearest_k=5" in notice["message"]
    assert not [e for e in events if e["type"] == "noise_floor"]
    assert {r["variant"] for r in _metrics(tmp_path / "r") if r["metric"] == "fd"} == {"raw", "0.9"}


def test_the_scale_bench_runs_and_prints_its_side_by_side_row():
    """Smoke test of ``bench/uncertainty.py --scale`` (no time is asserted)."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench" / "uncertainty.py"
    out = subprocess.run([sys.executable, str(bench), "--scale", "120", "--scale-dim", "16", "--scale-exact", "2"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert "Half values at scale: n = m = 120, d = 16" in out
    row = out.strip().splitlines()[-1]
    assert row.startswith("|") and row.count("|") == 6 and "x**" in row
