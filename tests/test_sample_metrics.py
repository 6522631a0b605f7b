"""attach(sample_metrics=...): user metrics over the agent's own samples, and attach(decays=None).

A tiny MLP denoiser is trained with Adam; the hook records every tensor it is given. The tests
check that it gets exactly the samples the agent scored (the saved preview, and samples
regenerated from the bank's variant with the same seed and batches), that the recorded values are
the hook's, that a raising hook is recorded without stopping training, and that all samples are
concatenated only when the hook is given.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scope_helpers import Denoiser, mixture, redraw, sampler, train_step

from emascope import attach
from emascope.bank import DEFAULT_DECAYS, EMABank
from emascope.features import Features
from emascope.scoring import ScoringConfig, draw_and_extract

torch.set_num_threads(1)

DECAYS = (0.9, 0.99)
VARIANTS = ["raw", "0.9", "0.99"]
NUM_SAMPLES, BATCH = 150, 64  # 64 + 64 + 22: the last batch is short


def _events(run_dir, type_=None):
    out = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [e for e in out if type_ is None or e["type"] == type_]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def spread(x: torch.Tensor) -> dict[str, float]:
    """A metric only the samples themselves can give: mean distance from the origin and its std."""
    r = x.double().norm(dim=1)
    return {"mean_radius": float(r.mean()), "radius_std": float(r.std())}


def _train(run_dir, hook, steps=20, score_every=10, **kw):
    torch.manual_seed(0)
    model = Denoiser()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data, g = mixture(1000, seed=1), torch.Generator().manual_seed(0)
    kw.setdefault("reference", mixture(200, seed=3))
    # the hook is called once per variant and sweep: no extra calls on half-samples for its intervals,
    # no noise-floor call on the reference (both are tested in test_uncertainty.py)
    kw.setdefault("bootstrap_calls", 0)
    kw.setdefault("noise_floor", False)
    scope = attach(model, opt, run_dir=run_dir, sampler=sampler, sample_metrics=hook,
                   metric_directions={"mean_radius": "higher"}, score_every=score_every,
                   num_samples=NUM_SAMPLES, batch_size=BATCH, decays=DECAYS, seed=7, **kw)
    for _ in range(steps):
        train_step(model, opt, data, g)
    scope.close()
    return scope


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    seen: list[torch.Tensor] = []

    def hook(x):
        seen.append(x.clone())
        return spread(x)

    run_dir = tmp_path_factory.mktemp("sm") / "run"
    scope = _train(run_dir, hook)
    return run_dir, scope, seen


def _regenerate(bank, variant, seed=7):
    model = Denoiser()
    model.load_state_dict(bank.materialize(variant))
    model.eval()
    return redraw(model, sampler, NUM_SAMPLES, BATCH, seed)


def test_hook_gets_every_sample_of_every_variant_once_per_sweep(recorded):
    run_dir, _, seen = recorded
    assert len(seen) == 2 * len(VARIANTS)  # steps 10 and 20, raw + two decays
    for x in seen:
        assert x.shape == (NUM_SAMPLES, 2) and x.device.type == "cpu" and not x.requires_grad
    # the last sweep's samples are the saved previews (preview_points = 2000 > NUM_SAMPLES: all of them)
    for x, variant in zip(seen[3:], VARIANTS, strict=True):
        saved = np.load(run_dir / "samples" / "step_000000020" / f"{variant}.npy")
        np.testing.assert_array_equal(x.numpy(), saved)


def test_hook_samples_equal_samples_regenerated_from_the_bank(recorded):
    _, scope, seen = recorded
    for x, variant in zip(seen[3:], VARIANTS, strict=True):
        torch.testing.assert_close(x, _regenerate(scope.bank, variant), rtol=0, atol=0)
    assert not torch.equal(seen[3], seen[4])  # the variants really differ


def test_recorded_values_are_the_hooks_values(recorded):
    run_dir, scope, seen = recorded
    rows = [r for r in _metrics(run_dir) if r["metric"] in ("mean_radius", "radius_std")]
    assert len(rows) == 2 * 2 * len(VARIANTS)
    by_key = {(r["step"], r["variant"], r["metric"]): r["value"] for r in rows}
    for i, x in enumerate(seen):
        step, variant = (10, 20)[i // 3], VARIANTS[i % 3]
        for name, value in spread(x).items():
            assert by_key[(step, variant, name)] == pytest.approx(value, rel=1e-12)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["metric_directions"]["mean_radius"] == "higher"
    assert "radius_std" not in info["metric_directions"]  # no direction declared: shown, never ranked
    assert scope.last_scores.scores["0.99"]["mean_radius"] == pytest.approx(spread(seen[-1])["mean_radius"])
    # the built-in metrics were computed from the same samples
    assert {"fd", "precision", "coverage"} <= {r["metric"] for r in _metrics(run_dir)}
    done = _events(run_dir, "score_done")
    assert all(d["timings"]["sample_metrics"] > 0 for d in done)
    assert all(d["num_samples"] == NUM_SAMPLES and d["errors"] == 0 for d in done)


def test_raising_hook_is_recorded_and_training_goes_on(tmp_path):
    calls = []

    def hook(x):
        calls.append(len(x))
        if len(calls) % 2:
            raise RuntimeError("metric blew up")
        return [1.0]  # not a dict: an error too

    scope = _train(tmp_path / "r", hook, steps=20)
    assert scope.bank.step == 20 and len(calls) == 6
    errors = _events(tmp_path / "r", "error")
    assert [e["where"] for e in errors] == ["sample_metrics"] * 6
    assert sorted({e["variant"] for e in errors}) == sorted(VARIANTS)
    assert "RuntimeError: metric blew up" in errors[0]["message"]
    assert "must return dict" in errors[1]["message"]
    assert all(e["errors"] == 3 for e in _events(tmp_path / "r", "score_done"))
    # the built-in metrics of every variant were still recorded
    fd = [r for r in _metrics(tmp_path / "r") if r["metric"] == "fd"]
    assert len(fd) == 2 * len(VARIANTS)


def test_run_format_doc_names_the_new_where_and_timing(recorded):
    run_dir = recorded[0]
    doc = (Path(__file__).parents[1] / "docs" / "run-format.md").read_text()
    score_done = next(line for line in doc.splitlines() if line.startswith("| `score_done`"))
    for key in _events(run_dir, "score_done")[0]["timings"]:
        assert f'"{key}": s' in score_done, key
    where_list = doc.split("`where` of an `error` is one of")[1].split("A sweep goes on")[0]
    assert '`"sample_metrics"`' in where_list


def test_hook_without_reference_still_gets_all_samples(tmp_path):
    seen = []
    _train(tmp_path / "r", lambda x: seen.append(len(x)) or {"n": float(len(x))}, steps=10, reference=None)
    assert seen == [NUM_SAMPLES] * 3  # without the hook only the preview head would be drawn
    assert [r["value"] for r in _metrics(tmp_path / "r") if r["metric"] == "n"] == [NUM_SAMPLES] * 3


def test_samples_are_concatenated_only_for_the_hook(monkeypatch):
    """Without the hook, no tensor holding all samples is ever built (memory stays features + preview)."""
    model = Denoiser().eval()
    w = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))

    def extractor(x):
        return Features(x.double() @ w.double(), None)  # 5-D features: told apart from 2-D samples

    cats = []
    real_cat = torch.cat

    def spy(tensors, *args, **kwargs):
        out = real_cat(tensors, *args, **kwargs)
        cats.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "cat", spy)
    cfg = ScoringConfig(num_samples=NUM_SAMPLES, batch_size=BATCH, preview_points=10)
    timings = {"sampling": 0.0, "features": 0.0}
    with torch.no_grad():
        plain = draw_and_extract(model, sampler, cfg, extractor, timings)
        cats_plain, cats[:] = list(cats), []
        kept = draw_and_extract(model, sampler, cfg, extractor, timings, keep_all=True)
    assert plain.samples is None and plain.head.shape == (10, 2) and plain.features.features.shape == (150, 5)
    assert not [s for s in cats_plain if s[-1] == 2 and s[0] > 10]  # no samples tensor beyond the head
    assert (NUM_SAMPLES, 2) in cats and kept.samples.shape == (NUM_SAMPLES, 2)
    torch.testing.assert_close(kept.samples[:10], plain.head, rtol=0, atol=0)
    torch.testing.assert_close(kept.features.features, plain.features.features, rtol=0, atol=0)
    torch.testing.assert_close(kept.features.features, kept.samples.double() @ w.double())


def test_sample_metrics_argument_errors(tmp_path):
    model = Denoiser()
    with pytest.raises(ValueError, match="sample_metrics must be callable"):
        attach(model, run_dir=tmp_path / "a", sampler=sampler, sample_metrics=3)
    with pytest.raises(ValueError, match="sampler is None"):
        attach(model, run_dir=tmp_path / "b", sample_metrics=spread)


def test_decays_none_means_the_default_sweep(tmp_path):
    model = Denoiser()
    with attach(model, run_dir=tmp_path / "r", decays=None, score_every=None) as scope:
        assert scope.bank.decays == tuple(DEFAULT_DECAYS)
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["decays"] == list(DEFAULT_DECAYS)
    assert EMABank(model, None).decays == EMABank(model).decays == tuple(DEFAULT_DECAYS)


def test_batch_seeds_follow_the_documented_convention_and_subsets_redraw_exactly():
    """Batch b of a sweep is drawn from its own generator (docs/run-format.md, sample_seeding), so a
    subset of batches (one rank's share, a later racing round) is drawn exactly as in the full sweep."""
    import hashlib

    from scope_helpers import batch_generator

    from emascope.scoring import batch_seed, batch_sizes

    for seed, b in ((0, 0), (0, 1), (7, 3), (2**40, 12)):
        digest = hashlib.sha256(f"{seed}:{b}".encode()).digest()
        assert batch_seed(seed, b) == int.from_bytes(digest[:8], "little") & (2**63 - 1)
    assert len({batch_seed(s, b) for s in range(20) for b in range(20)}) == 400
    assert batch_sizes(10, 4) == [4, 4, 2] and batch_sizes(8, 4) == [4, 4] and batch_sizes(3, 8) == [3]
    torch.manual_seed(0)
    model = Denoiser().eval()
    whole = redraw(model, sampler, 100, 30, 5)
    with torch.no_grad():
        third = sampler(model, 30, batch_generator(5, 2))
        last = sampler(model, 10, batch_generator(5, 3))
    torch.testing.assert_close(whole[60:90], third, rtol=0, atol=0)
    torch.testing.assert_close(whole[90:], last, rtol=0, atol=0)
