"""The sample runs: the tree mixture, flow matching, short end-to-end runs of tree2d and digits
(train with the agent, score, read back with emascope.dashboard.data, export a variant and load it), and
the shipped run directories under sample_runs/runs/."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from scipy import linalg
from scipy.stats import multivariate_normal

from emascope.cli import main as emascope
from emascope.dashboard.data import load_run, sample_files, sample_stages
from emascope.samples import digits, report, tree2d
from emascope.samples.flow import Preconditioned, flow_matching_loss, sample_heun, time_grid
from emascope.samples.tree_mixture import make_tree, mean_log_likelihood, tail_coverage, tail_share

RUNS = Path(__file__).resolve().parents[1] / "sample_runs" / "runs"
ALL_VARIANTS = {"raw", "0.5", "0.9", "0.99", "0.999", "0.9993", "0.9995", "0.9997", "0.9999", "0.99999",
                "0.999999"}


@pytest.fixture(autouse=True)
def _few_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def redraw(model, sampler, num_samples: int, batch_size: int, seed: int,
           seeding: str | None = "batch_sha256") -> torch.Tensor:
    """The agent's samples, drawn again independently, by the convention run.json's
    ``settings.sample_seeding`` names (docs/run-format.md): ``"batch_sha256"``, batch ``b`` from a
    fresh CPU generator seeded with the first 8 bytes of sha256(f"{seed}:{b}") (little-endian, top bit
    cleared); ``None`` (runs written before the key existed), every batch from one generator."""
    sizes = [min(batch_size, num_samples - i) for i in range(0, num_samples, batch_size)]
    stream = torch.Generator().manual_seed(int(seed))
    out = []
    with torch.no_grad():
        for b, n in enumerate(sizes):
            if seeding is None:
                gen = stream
            else:
                assert seeding == "batch_sha256", seeding
                digest = hashlib.sha256(f"{int(seed)}:{b}".encode()).digest()
                gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
            out.append(sampler(model, n, gen).cpu())
    return torch.cat(out)


def frechet_distance_scipy(a: np.ndarray, b: np.ndarray) -> float:
    """Independent float64 Frechet distance (Heusel et al. 2017) with scipy's sqrtm."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ---------------------------------------------------------------------------------------------- the toy


def test_tree_log_prob_matches_scipy_mixture():
    tree = make_tree()
    x = tree.sample(50, torch.Generator().manual_seed(1)).double()
    x = torch.cat([x, torch.tensor([[3.0, -2.0], [0.0, 0.0]], dtype=torch.float64)])
    w = tree.log_weights.exp().numpy()
    cov = (tree.scale_tril @ tree.scale_tril.transpose(1, 2)).numpy()
    mu = tree.means.numpy()
    dens = sum(w[m] * multivariate_normal(mu[m], cov[m]).pdf(x.numpy()) for m in range(tree.num_components))
    np.testing.assert_allclose(tree.log_prob(x).numpy(), np.log(dens), rtol=1e-9, atol=1e-9)


def test_tree_density_integrates_to_one_and_mass_halves_per_depth():
    tree = make_tree()
    mass = tree.depth_mass().numpy()
    np.testing.assert_allclose(mass[1:] / mass[:-1], 0.5, rtol=1e-12)
    assert tree.max_depth == 4 and tree.num_components == 3 * (2 ** 5 - 1)
    # Riemann sum of exp(log p) on a fine grid covering the tree.
    h = 0.01
    g = torch.arange(-3.5, 3.5, h, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    p = tree.log_prob(torch.stack([xx.ravel(), yy.ravel()], 1)).exp()
    assert float(p.sum()) * h * h == pytest.approx(1.0, abs=2e-3)


def test_tree_samples_and_depth_map():
    tree = make_tree()
    x = tree.sample(40_000, torch.Generator().manual_seed(2))
    assert x.dtype == torch.float32 and x.shape == (40_000, 2)
    assert float(x.std(0).max()) == pytest.approx(1.0, abs=0.02)  # standardised
    depth = tree.assign(x)
    share = torch.bincount(depth[depth >= 0], minlength=5).double() / len(x)
    # ~1% of points fall outside the 99% gate, and points where a branch meets its parent go to the
    # heavier parent: the measured shares sit within 15% of the true masses (hence tail_coverage
    # divides by the share of exact samples measured with the same gate).
    np.testing.assert_allclose(share.numpy(), tree.depth_mass().numpy(), rtol=0.15)
    assert float((depth == -1).double().mean()) < 0.02
    assert int(tree.assign(torch.tensor([[10.0, 10.0]]))[0]) == -1


def test_tail_coverage_is_one_on_exact_samples_and_zero_on_the_trunk():
    tree = make_tree()
    true = tail_share(tree, tree.sample(100_000, torch.Generator().manual_seed(3)), 3)
    other = tree.sample(20_000, torch.Generator().manual_seed(4))
    assert tail_coverage(tree, other, 3, true) == pytest.approx(1.0, abs=0.1)
    trunk = tree.means[tree.depth == 0].float()
    assert tail_coverage(tree, trunk, 3, true) == 0.0
    assert mean_log_likelihood(tree, other) > mean_log_likelihood(tree, other * 1.5)
    with pytest.raises(ValueError, match="true_share"):
        tail_coverage(tree, other, 3, 0.0)
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        tree.log_prob(torch.zeros(3, 3))


def test_make_tree_rejects_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        make_tree(depth=0)
    with pytest.raises(ValueError, match="length_ratio"):
        make_tree(length_ratio=1.5)


# ---------------------------------------------------------------------------------------------- flow


class _Zero(torch.nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


def test_preconditioning_is_the_exact_denoiser_of_gaussian_data():
    """For x_0 ~ N(0, s^2) the x_0-optimal denoiser is c_skip x_t, i.e. Preconditioned with F = 0:
    integrating its velocity from N(0, 1) noise must give N(0, s^2) (Eq. FM-5 and FM-3 together)."""
    s = 0.5
    model = Preconditioned(_Zero(), sigma_data=s)
    noise = torch.randn(200_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sample_heun(model, noise, num_steps=32)
    assert float(x.std()) == pytest.approx(s, rel=0.01)
    assert abs(float(x.mean())) < 0.01
    # And its EDM loss target is 0 wherever the data are Gaussian with that std: loss ~ E[target^2],
    # whose expectation is 1 by construction of c_out (unit-variance target).
    x0 = s * torch.randn(100_000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss = flow_matching_loss(model, x0, torch.Generator().manual_seed(2))
    assert float(loss) == pytest.approx(1.0, rel=0.03)


def test_time_grid_and_bad_arguments():
    ts = time_grid(4, rho=2.0)
    assert ts[0] == 1.0 and ts[-1] == 0.0 and bool((ts[1:] < ts[:-1]).all())
    with pytest.raises(ValueError, match="num_steps"):
        time_grid(0)
    with pytest.raises(ValueError, match="sigma_data"):
        Preconditioned(_Zero(), sigma_data=0.0)


# ---------------------------------------------------------------------------------------------- tree2d


def _tiny_tree_cfg() -> tree2d.Tree2DConfig:
    return tree2d.Tree2DConfig(steps=40, score_every=20, batch_size=128, hidden=32, layers=2,
                               num_samples=300, sample_batch=150, reference_size=400, sample_steps=4,
                               kid_subset_size=100)


def test_tree2d_end_to_end(tmp_path):
    cfg = _tiny_tree_cfg()
    steps_seen = []
    run_dir = tree2d.train(tmp_path / "run", cfg, progress=lambda s, n: steps_seen.append((s, n)))
    assert steps_seen[-1] == (40, 40) and len(steps_seen) == 40

    run = load_run(run_dir)
    assert run.error is None and run.state() == "finished"
    assert run.info["sample_kind"] == "points"
    m = run.metrics
    assert sorted(m["step"].unique()) == [20, 40]
    assert set(m["variant"]) == ALL_VARIANTS
    for name in ("fd", "precision", "recall", "density", "coverage", "log_likelihood", "tail_coverage"):
        assert name in run.directions, name
        per = m[m["metric"] == name]
        assert len(per) == 2 * len(ALL_VARIANTS), name  # every stage x variant
    assert run.directions["log_likelihood"] == "higher" and run.directions["tail_coverage"] == "higher"
    assert not run.events_of("error")
    assert sample_stages(run_dir) == [20, 40] and set(sample_files(run_dir, 40)) == ALL_VARIANTS

    # Export a variant with the CLI, load it into a fresh model, redraw the agent's samples.
    out = tmp_path / "ema-0.9.safetensors"
    assert emascope(["export", str(run_dir), "--variant", "0.9", "--out", str(out)]) == 0
    model = tree2d.build_model(cfg)
    model.load_state_dict(safetensors.torch.load_file(out))
    model.eval()
    sampler = tree2d.make_sampler(cfg.sample_steps)
    x = redraw(model, sampler, cfg.num_samples, cfg.sample_batch, cfg.seed + 1)
    preview = np.load(run_dir / "samples" / "step_000000040" / "0.9.npy", allow_pickle=False)
    np.testing.assert_allclose(preview, x[: len(preview)].numpy(), rtol=1e-5, atol=1e-6)

    row = m[(m["step"] == 40) & (m["variant"] == "0.9")].set_index("metric")["value"]
    tree = make_tree()
    assert row["log_likelihood"] == pytest.approx(mean_log_likelihood(tree, x), rel=1e-6)
    metrics_obj = tree2d.TreeMetrics(tree, cfg)
    assert row["tail_coverage"] == pytest.approx(
        tail_coverage(tree, x, cfg.tail_depth, metrics_obj.true_tail_share), rel=1e-6)
    ref = tree.sample(cfg.reference_size, torch.Generator().manual_seed(cfg.seed + 2))
    assert row["fd"] == pytest.approx(frechet_distance_scipy(x.double().numpy(), ref.double().numpy()),
                                      rel=1e-4, abs=1e-7)


def test_report_tables(tmp_path, capsys):
    cfg = _tiny_tree_cfg()
    run_dir = tree2d.train(tmp_path / "run", cfg)
    assert report.main([str(run_dir), "--step", "20"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    # stage table (+header, + the noise floor row), best table (+header)
    assert len(rows) == 1 + len(ALL_VARIANTS) + 1 + 1 + 2
    run = load_run(run_dir)
    comp = [e for e in run.events if e["type"] == "comparison" and e["step"] == 20][-1]["metrics"]["fd"]
    assert f"| {comp['best']} | **" in out  # the best FD is bold in its row
    tied = [v for v, c in comp["variants"].items() if c["worse"] is False and v != comp["best"]]
    assert all(f"| {v} | ≈ " in out for v in tied)  # the variants tied with it are marked
    assert "± " in out and "*noise floor (exact samples, n = 300)*" in out
    assert report.main([str(run_dir), "--step", "7"]) == 2


def test_exact_samples_score_near_perfect():
    """The noise floor the README quotes: exact samples of the mixture against the reference."""
    cfg = tree2d.Tree2DConfig(num_samples=1000, reference_size=1000)
    base = tree2d.exact_baseline(cfg, seeds=[10, 11])
    assert max(base["fd"]) < 0.02 and min(base["precision"]) > 0.9 and min(base["coverage"]) > 0.9
    assert all(0.8 < v < 1.2 for v in base["tail_coverage"])
    assert all(-0.8 < v < -0.55 for v in base["log_likelihood"])


def test_tree2d_cli_refuses_an_existing_run(tmp_path, capsys):
    cfg = tree2d.Tree2DConfig(steps=2, score_every=1000, num_samples=20, sample_batch=20, reference_size=50,
                              sample_steps=1, hidden=8, layers=1)
    tree2d.train(tmp_path / "r", cfg, score_at_close=False)
    assert tree2d.main(["--run-dir", str(tmp_path / "r"), "--steps", "2"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert tree2d.main(["--run-dir", str(tmp_path / "s"), "--steps", "0"]) == 2


# ---------------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    return digits.ensure_classifier(tmp_path_factory.mktemp("clf") / "cnn.pt", steps=60)


def test_digits_extractor_registered_with_torch_fidelity(tiny_classifier):
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    assert digits.register_extractor() == digits.EXTRACTOR_NAME
    assert digits.register_extractor() == digits.EXTRACTOR_NAME  # idempotent
    cls = FEATURE_EXTRACTORS_REGISTRY[digits.EXTRACTOR_NAME]
    fe = cls(digits.EXTRACTOR_NAME, ["features", "logits"],
             feature_extractor_weights_path=str(tiny_classifier))
    images, _ = digits.load_digit_images()
    u8 = ((images[:5] + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1)
    feats, logits = fe(u8)
    assert feats.shape == (5, 64) and logits.shape == (5, 10)
    net = digits.DigitsClassifier()
    net.load_state_dict(torch.load(tiny_classifier, weights_only=True))
    f2, l2 = net(u8[:, :1].float() / 127.5 - 1)
    torch.testing.assert_close(logits, l2)
    with pytest.raises(ValueError, match="weights_path"):
        cls(digits.EXTRACTOR_NAME, ["features"])
    with pytest.raises(ValueError, match="uint8"):
        fe(torch.zeros(1, 1, 8, 8))


def test_shipped_classifier_is_accurate():
    assert digits.SHIPPED_CLASSIFIER.is_file(), "sample_runs/weights/digits_cnn.pt must ship"
    net = digits.DigitsClassifier()
    net.load_state_dict(torch.load(digits.SHIPPED_CLASSIFIER, weights_only=True))
    images, labels = digits.load_digit_images()
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    held_out = perm[1500:]  # the split train_classifier(seed=0) holds out
    with torch.no_grad():
        acc = float((net(images[held_out])[1].argmax(1) == labels[held_out]).float().mean())
    assert acc > 0.95


def test_digits_end_to_end(tmp_path, tiny_classifier):
    import torch_fidelity

    cfg = digits.DigitsConfig(steps=20, score_every=10, batch_size=32, model="mlp", hidden=32, depth=2, num_samples=120,
                              sample_batch=60, sample_steps=2, reference_size=300, kid_subset_size=100)
    run_dir = digits.train(tmp_path / "run", cfg, classifier=tiny_classifier)
    run = load_run(run_dir)
    assert run.error is None and run.state() == "finished" and run.info["sample_kind"] == "images"
    m = run.metrics
    assert sorted(m["step"].unique()) == [10, 20]
    assert set(m["variant"]) == ALL_VARIANTS
    for name in ("fd", "kid_mean", "precision", "recall", "density", "coverage", "isc_mean"):
        assert len(m[m["metric"] == name]) == 2 * len(ALL_VARIANTS), name
    assert run.info["settings"]["feature_extractor"] == digits.EXTRACTOR_NAME
    assert not run.events_of("error")
    png = sample_files(run_dir, 20)["0.99"]
    assert png.suffix == ".png" and png.stat().st_size > 0

    out = tmp_path / "ema.safetensors"
    assert emascope(["export", str(run_dir), "--variant", "0.99", "--out", str(out)]) == 0
    model = digits.build_model(cfg)
    model.load_state_dict(safetensors.torch.load_file(out))
    model.eval()
    sampler = digits.make_sampler(cfg.sample_steps)
    x = redraw(model, sampler, cfg.num_samples, cfg.sample_batch, cfg.seed + 1)
    # torch-fidelity's own pipeline with the registered extractor on the regenerated samples.
    images, _ = digits.load_digit_images()

    def u8(t):
        return ((t + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()

    class DS(torch.utils.data.Dataset):
        def __init__(self, t):
            self.t = t

        def __len__(self):
            return len(self.t)

        def __getitem__(self, i):
            return self.t[i]

    ref = torch_fidelity.calculate_metrics(
        input1=DS(u8(x)), input2=DS(u8(images[: cfg.reference_size])), fid=True, isc=True, cuda=False,
        verbose=False,
        feature_extractor=digits.EXTRACTOR_NAME, feature_extractor_weights_path=str(tiny_classifier),
        batch_size=64, save_cpu_ram=True, rng_seed=cfg.seed + 1)  # ISC split shuffle: the agent's seed
    row = m[(m["step"] == 20) & (m["variant"] == "0.99")].set_index("metric")["value"]
    assert row["fd"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-4)
    assert row["isc_mean"] == pytest.approx(ref["inception_score_mean"], rel=1e-4)


# ---------------------------------------------------------------------------------------------- shipped


@pytest.mark.parametrize("name, min_samples", [("tree2d", 4000), ("digits", 500)])
def test_shipped_run_is_readable_and_complete(name, min_samples, tmp_path):
    """The shipped runs are format-1 runs written before intervals existed (no ``se``/``lo``/``hi``,
    no ``comparison`` or ``noise_floor`` events): the reader keeps reading them, the dashboard's
    interval helpers find nothing to draw, and the sample scripts' defaults are the runs' settings."""
    from emascope.dashboard import intervals

    run_dir = RUNS / name
    assert (run_dir / "run.json").is_file(), f"shipped run {run_dir} is missing"
    run = load_run(run_dir)
    assert run.error is None and run.state() == "finished"
    steps = sorted(run.metrics["step"].unique())
    assert len(steps) >= 8
    assert set(run.metrics["variant"]) == ALL_VARIANTS
    counts = run.metrics.groupby("step")["variant"].nunique()
    assert (counts == len(ALL_VARIANTS)).all()
    assert run.info["settings"]["num_samples"] >= min_samples
    assert not run.events_of("error")
    assert len(sample_stages(run_dir)) >= 8
    info = json.loads((run_dir / "run.json").read_text())
    assert info["format_version"] == 1
    # an older run: no intervals, comparisons or floor, and nothing of them is invented
    assert "se" not in run.metrics.columns or run.metrics["se"].isna().all()
    assert not run.events_of("comparison") and not run.events_of("noise_floor")
    assert intervals.comparisons(run.events) == {}
    # the sample script's defaults are the shipped run's settings
    cfg = tree2d.Tree2DConfig() if name == "tree2d" else digits.DigitsConfig()
    settings = info["settings"]
    assert (settings["num_samples"], settings["score_every"]) == (cfg.num_samples, cfg.score_every)
    assert settings["batch_size"] == cfg.sample_batch and settings["seed"] == cfg.seed + 1
    # The bank snapshot is there and exports a variant that loads into the sample's model.
    out = tmp_path / "x.safetensors"
    assert emascope(["export", str(run_dir), "--variant", "0.999", "--out", str(out)]) == 0
    model = tree2d.build_model(cfg) if name == "tree2d" else digits.build_model(cfg)
    model.load_state_dict(safetensors.torch.load_file(out))
    if name == "tree2d":  # the snapshot is the bank that drew the last stage's samples
        last = max(steps)
        model.eval()
        x = redraw(model, tree2d.make_sampler(cfg.sample_steps), settings["num_samples"],
                   settings["batch_size"], settings["seed"], settings.get("sample_seeding"))
        preview = np.load(run_dir / "samples" / f"step_{last:09d}" / "0.999.npy", allow_pickle=False)
        np.testing.assert_allclose(preview, x[: len(preview)].numpy(), atol=1e-4)
        # the shipped log-likelihood / tail coverage are those of exactly these samples, i.e. what
        # attach(sample_metrics=TreeMetrics) computes from the agent's own samples
        row = run.metrics.query("step == @last and variant == '0.999'").set_index("metric")["value"]
        mine = tree2d.TreeMetrics(make_tree(), cfg).means(x)
        assert row["log_likelihood"] == pytest.approx(mine["log_likelihood"], rel=1e-5)
        assert row["tail_coverage"] == pytest.approx(mine["tail_coverage"], rel=1e-5)


def test_shipped_runs_are_small():
    total = sum(p.stat().st_size for p in RUNS.rglob("*") if p.is_file())
    assert 0 < total <= 20 * 2 ** 20, f"sample_runs/runs holds {total / 2 ** 20:.1f} MiB (limit 20)"
    for p in RUNS.rglob("*"):  # nothing a reader would have to unpickle
        assert p.suffix in {".json", ".jsonl", ".npy", ".png", ".safetensors", ".npz", ""}, p


def test_racing_on_the_shipped_tree2d_samples_finds_the_full_sweeps_best(tmp_path):
    """The shipped tree2d bank at its last stage, scored twice on log-likelihood (the metric that
    separates tree2d's variants; FD sits at its noise floor): a full sweep (every variant, all
    samples, with its paired comparison) and a race. The race draws fewer samples and ends with the
    full sweep's best, or a variant tied with it; the survivors' values are the full sweep's (the same
    samples: equal final confidence). 1,000 samples per variant keep the test short."""
    from emascope import estimates as E
    from emascope import runformat
    from emascope.config import ScoringConfig
    from emascope.features import make_extractor
    from emascope.rundir import RunWriter, prepare_run_dir
    from emascope.scoring import Reference, SweepResult, _race, run_sweep
    from emascope.snapshot import load_snapshot

    run_dir = RUNS / "tree2d"
    run = load_run(run_dir)
    last = int(run.metrics["step"].max())
    cfg0 = tree2d.Tree2DConfig()
    tree = make_tree()
    bank = load_snapshot(run_dir / "banks" / "latest.safetensors")
    model = tree2d.build_model(cfg0).eval()
    cfg = ScoringConfig(num_samples=1000, batch_size=125, seed=1, feature_extractor="identity", racing=True,
                        racing_metric="log_likelihood", racing_first=0.125)
    sampler, metrics = tree2d.make_sampler(cfg0.sample_steps), tree2d.TreeMetrics(tree, cfg0)
    full_dir = prepare_run_dir(tmp_path / "full")
    run_sweep(model=model, bank=bank, variants=list(bank.variants), step=last, writer=RunWriter(full_dir),
              cfg=ScoringConfig(num_samples=1000, batch_size=125, seed=1, feature_extractor="identity"),
              sampler=sampler, extractor=None, reference=None, evaluate=None, sample_metrics=metrics,
              fd_name="fd", directions={**run.directions})
    full = load_run(full_dir)
    comp = full.events_of("comparison")[-1]["metrics"]["log_likelihood"]
    ties = {v for v, c in comp["variants"].items() if c["worse"] is False}
    extractor = make_extractor("identity", "points")
    ref = tree.sample(cfg0.reference_size, torch.Generator().manual_seed(cfg0.seed + 2))
    reference = Reference.build(extractor(ref), cfg.nearest_k)
    race, drawn = _race(model, bank, list(bank.variants), SweepResult(step=last), RunWriter(prepare_run_dir(
        tmp_path / "race")), cfg, sampler, extractor, reference, metrics, "fd", {**run.directions}, E.Halves(cfg))
    final = race.rounds[-1]
    assert final.best == comp["best"] or final.best in ties, (final.best, comp["best"], ties)
    drew = sum(race.batches.values()) * cfg.batch_size
    assert drew < cfg.num_samples * len(bank.variants)
    lines = (full_dir / runformat.METRICS).read_text().splitlines()
    recorded = {r["variant"]: r["value"] for r in map(json.loads, lines) if r["metric"] == "log_likelihood"}
    for v in race.survivors:
        assert drawn[v].num_drawn == cfg.num_samples
        mine = float(tree.log_prob(drawn[v].samples).mean())
        assert mine == pytest.approx(float(recorded[v]), rel=1e-6)
