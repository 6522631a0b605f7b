"""emascope.metrics against independent references: prdc, float64 loops, scipy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
from prdc import compute_prdc
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from emascope import metrics as M

PASSTHROUGH = "emascope-test-passthrough"
FEAT_DIM = 6


class _Passthrough(FeatureExtractorBase):
    """torch-fidelity extractor whose "features" are the first FEAT_DIM columns of each row and whose
    "logits" are the rest, so ``calculate_metrics`` scores exactly the features we score."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)

    @staticmethod
    def get_provided_features_list():
        return ("feat", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits" if metric == "isc" else "feat"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return None

    def forward(self, x):
        parts = {"feat": x[:, :FEAT_DIM], "logits": x[:, FEAT_DIM:]}
        return tuple(parts[name] for name in self.features_list)


if PASSTHROUGH not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(PASSTHROUGH, _Passthrough)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def _sets(n_gen=300, n_ref=400, d=6, seed=0, shift=0.3):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n_ref, d, generator=g)
    gen = torch.randn(n_gen, d, generator=g) * 1.3 + shift
    return gen, ref


def _density_coverage_loop(gen: np.ndarray, ref: np.ndarray, k: int) -> tuple[float, float]:
    """Naeem et al. 2020 by the definition, float64 double loop."""
    gen, ref = gen.astype(np.float64), ref.astype(np.float64)
    radii = []
    for x in ref:
        d = np.sort(np.sqrt(((ref - x) ** 2).sum(1)))
        radii.append(d[k])  # d[0] = 0 is the point itself
    radii = np.array(radii)
    count, covered = 0, 0
    for y in gen:
        count += int((np.sqrt(((ref - y) ** 2).sum(1)) < radii).sum())
    for i, x in enumerate(ref):
        covered += int(np.sqrt(((gen - x) ** 2).sum(1)).min() < radii[i])
    return count / (k * len(gen)), covered / len(ref)


@pytest.mark.parametrize("k", [3, 5])
def test_density_coverage_matches_prdc_and_loop(k):
    gen, ref = _sets()
    ours = M.density_coverage(gen, ref, k=k)
    ref_pkg = compute_prdc(real_features=ref.numpy(), fake_features=gen.numpy(), nearest_k=k)
    loop = _density_coverage_loop(gen.numpy(), ref.numpy(), k)
    assert ours["density"] == pytest.approx(float(ref_pkg["density"]), abs=1e-12)
    assert ours["coverage"] == pytest.approx(float(ref_pkg["coverage"]), abs=1e-12)
    assert (ours["density"], ours["coverage"]) == pytest.approx(loop, abs=1e-12)
    # a clearly different distribution: coverage drops
    far = M.density_coverage(gen + 5.0, ref, k=k)
    assert far["coverage"] < 0.2 < ours["coverage"]


def test_density_coverage_blocks_give_same_answer_and_radii_reuse():
    gen, ref = _sets(n_gen=257, n_ref=311, seed=3)
    full = M.density_coverage(gen, ref, k=5)
    tiny = M.density_coverage(gen, ref, k=5, block_bytes=8 * 311 * 7)  # 7 rows per block
    radii = M.knn_radii(ref, 5)
    reused = M.density_coverage(gen, ref, k=5, ref_radii=radii)
    assert tiny == full == reused
    assert M.rows_per_block(311, 8 * 311 * 7) == 7


def test_precision_recall_matches_prdc_definition():
    gen, ref = _sets(seed=1)
    ours = M.precision_recall(gen, ref, neighborhood=3)
    pkg = compute_prdc(real_features=ref.numpy(), fake_features=gen.numpy(), nearest_k=3)
    # prdc uses "<", torch-fidelity "<="; with continuous data there are no ties
    assert ours["precision"] == pytest.approx(float(pkg["precision"]), abs=1e-6)
    assert ours["recall"] == pytest.approx(float(pkg["recall"]), abs=1e-6)


def test_precision_recall_batched_never_builds_full_matrix(monkeypatch):
    from emascope import distances

    gen, ref = _sets(n_gen=500, n_ref=600, d=16, seed=2)  # above KDTREE_MAX_DIM: the blockwise route
    widths = []
    real_squared = distances.squared

    def spy(a, b, *args, **kw):
        widths.append(a.shape[0] * b.shape[0])
        return real_squared(a, b, *args, **kw)

    full = prc_features_to_metric(gen.double(), ref.double(), prc_neighborhood=3, verbose=False)
    monkeypatch.setattr(distances, "squared", spy)
    small = M.precision_recall(gen, ref, neighborhood=3, block_bytes=8 * 600 * 50)
    assert widths and max(widths) <= 50 * 600  # blocks of at most 50 rows, never 500 x 600 / 600 x 600
    assert small["precision"] == pytest.approx(full["precision"])
    assert small["recall"] == pytest.approx(full["recall"])


def test_precision_recall_equals_torch_fidelity_and_shares_reference_radii():
    """Against torch-fidelity's own ``prc_features_to_metric`` (which recomputes every distance with
    ``torch.cdist``) on sets of 2 to 64 dimensions: the same counts (torch-fidelity returns float32
    shares); passing the reference radii changes nothing."""
    g = torch.Generator().manual_seed(11)
    for n, m, d in [(300, 400, 2), (500, 450, 64), (200, 260, 8), (420, 380, 16)]:
        gen = torch.randn(n, d, generator=g, dtype=torch.float64) * 1.1 + 0.2
        ref = torch.randn(m, d, generator=g, dtype=torch.float64)
        tf = prc_features_to_metric(gen, ref, prc_neighborhood=3, save_cpu_ram=True, prc_batch_size=10_000,
                                    verbose=False)
        ours = M.precision_recall(gen, ref, neighborhood=3)
        assert round(ours["precision"] * n) == round(float(tf["precision"]) * n)
        assert round(ours["recall"] * m) == round(float(tf["recall"]) * m)
        assert M.precision_recall(gen, ref, neighborhood=3, ref_radii=M.knn_radii(ref, 3)) == ours
    with pytest.raises(ValueError, match="ref_radii"):
        M.precision_recall(gen, ref, ref_radii=torch.ones(3))


def test_frechet_distance_matches_scipy_sqrtm():
    gen, ref = _sets(d=5, seed=4)
    g, r = gen.double().numpy(), ref.double().numpy()
    mu1, mu2 = g.mean(0), r.mean(0)
    s1, s2 = np.cov(g, rowvar=False), np.cov(r, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert M.frechet_distance(gen, ref) == pytest.approx(expected, rel=1e-8)
    assert M.frechet_distance(ref, ref) == pytest.approx(0.0, abs=1e-8)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m = len(x)
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())


def test_kid_matches_float64_mmd_and_caps_subset():
    gen, ref = _sets(n_gen=120, n_ref=150, d=4, seed=5)
    out = M.kid(gen, ref, subset_size=1000, subsets=3, seed=7)
    assert out["kid_subset_size"] == 120  # capped at the smaller set
    rng = np.random.RandomState(7)
    g, r = gen.double().numpy(), ref.double().numpy()
    vals = []
    for _ in range(3):
        a = g[rng.choice(len(g), 120, replace=False)]
        b = r[rng.choice(len(r), 120, replace=False)]
        vals.append(_mmd2_unbiased(a, b))
    assert out["kid_mean"] == pytest.approx(np.mean(vals), rel=1e-9)
    assert out["kid_std"] == pytest.approx(np.std(vals), rel=1e-6, abs=1e-12)
    same = M.kid(ref[:75], ref[75:], subsets=5)
    assert abs(same["kid_mean"]) < out["kid_mean"]


def test_inception_score_by_definition():
    logits = torch.randn(200, 10, generator=torch.Generator().manual_seed(0)) * 4
    out = M.inception_score(logits, splits=1)
    p = torch.softmax(logits.double(), 1)
    expected = torch.exp((p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean()).item()
    assert out["isc_mean"] == pytest.approx(expected, rel=1e-10)
    uniform = M.inception_score(torch.zeros(50, 10), splits=5)
    assert uniform["isc_mean"] == pytest.approx(1.0)


def test_bad_inputs_raise_clear_errors():
    gen, ref = _sets()
    with pytest.raises(ValueError, match="feature dimensions differ"):
        M.frechet_distance(gen, ref[:, :3])
    with pytest.raises(ValueError, match="2-D"):
        M.density_coverage(gen[0], ref)
    with pytest.raises(ValueError, match="k must be"):
        M.knn_radii(ref[:4], k=5)
    with pytest.raises(ValueError, match="kid_subset_size"):
        M.kid(gen, ref, subset_size=1)
    with pytest.raises(ValueError, match="neighborhood"):
        M.precision_recall(gen[:3], ref, neighborhood=3)
    assert M.finite_or_none(float("nan")) is None and M.finite_or_none(2) == 2.0


def test_all_metrics_equal_torch_fidelity_calculate_metrics():
    """End to end against torch-fidelity's own pipeline (calculate_metrics, CPU) on the same features."""
    gen, ref = _sets(n_gen=180, n_ref=220, d=FEAT_DIM, seed=6)
    g = torch.Generator().manual_seed(1)
    gen_logits, ref_logits = torch.randn(180, 10, generator=g) * 3, torch.randn(220, 10, generator=g)
    size = M.kid_subset_size_for(len(gen), len(ref))  # torch-fidelity's default 1000 would be refused
    assert size == 180
    tf = torch_fidelity.calculate_metrics(
        input1=_Rows(torch.cat([gen, gen_logits], 1).double()),
        input2=_Rows(torch.cat([ref, ref_logits], 1).double()),
        feature_extractor=PASSTHROUGH, cuda=False, isc=True, fid=True, kid=True, prc=True,
        kid_subset_size=size, kid_subsets=7, cache=False, save_cpu_ram=True, verbose=False)
    assert M.frechet_distance(gen, ref) == pytest.approx(tf["frechet_inception_distance"], rel=1e-12)
    stats = M.frechet_statistics(ref)
    assert M.frechet_distance_from_statistics(M.frechet_statistics(gen), stats) == \
        pytest.approx(tf["frechet_inception_distance"], rel=1e-12)
    k = M.kid(gen, ref, subsets=7)  # default seed is torch-fidelity's rng_seed 2020
    assert k["kid_subset_size"] == size
    assert k["kid_mean"] == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-12)
    assert k["kid_std"] == pytest.approx(tf["kernel_inception_distance_std"], rel=1e-12)
    pr = M.precision_recall(gen, ref)
    # the same counts; torch-fidelity returns the shares as float32
    assert round(pr["precision"] * 180) == round(tf["precision"] * 180)
    assert round(pr["recall"] * 220) == round(tf["recall"] * 220)
    assert pr["precision"] == pytest.approx(tf["precision"], abs=1e-7)
    isc = M.inception_score(gen_logits)  # torch-fidelity's isc_splits 10, shuffle, rng_seed 2020
    assert isc["isc_mean"] == pytest.approx(tf["inception_score_mean"], rel=1e-12)
    assert isc["isc_std"] == pytest.approx(tf["inception_score_std"], rel=1e-12)


def test_kid_subset_size_guard_is_needed_and_reported():
    gen, ref = _sets(n_gen=40, n_ref=500, d=4, seed=8)
    with pytest.raises(Exception, match="KID subset size"):  # torch-fidelity's default 1000 > 40
        kid_features_to_metric(gen.double(), ref.double(), kid_subset_size=1000, verbose=False)
    out = M.kid(gen, ref, subsets=4)
    assert out["kid_subset_size"] == 40
    assert M.kid(gen, ref, subset_size=25, subsets=4)["kid_subset_size"] == 25
    assert M.kid_subset_size_for(5000, 3000) == 1000  # torch-fidelity's default when both sets are big
    with pytest.raises(ValueError, match="at least 2 samples"):
        M.kid_subset_size_for(1, 100)


def test_precision_recall_bigger_than_block_budget_equals_unbatched():
    """A set whose N x N distance matrix is 50x the block budget scores exactly like the full matrix."""
    gen, ref = _sets(n_gen=700, n_ref=650, d=8, seed=9)
    budget = 8 * 700 * 700 // 50
    assert M.rows_per_block(700, budget) < 700 // 10
    full = prc_features_to_metric(gen.double(), ref.double(), prc_neighborhood=3, save_cpu_ram=False,
                                  prc_batch_size=10_000, verbose=False)
    batched = M.precision_recall(gen, ref, neighborhood=3, block_bytes=budget)
    # equal up to a float-rounding tie flipping one point (in practice: exactly equal)
    assert batched["precision"] == pytest.approx(full["precision"], abs=1.01 / 700)
    assert batched["recall"] == pytest.approx(full["recall"], abs=1.01 / 650)
    assert M.precision_recall(gen, ref, neighborhood=3) == pytest.approx(batched, abs=1.01 / 650)
