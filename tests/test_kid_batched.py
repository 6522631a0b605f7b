"""KID with torch equals torch-fidelity's; batched sampling across variants equals one variant at a time.

KID: against torch-fidelity's own ``kid_features_to_metric`` (numpy, the same subsets), to 1e-6.
Batched sampling: the shipped samples' real samplers (tree2d's Heun MLP, digits' Heun conv net) on
real bank variants, against the per-variant path, sample for sample, to float32 rounding (vmap
runs the same math through batched kernels, whose last bits may differ).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import scoring_entry as E
import torch
from torch_fidelity.metric_kid import kid_features_to_metric

from emascope import EMABank
from emascope import metrics as M
from emascope.batched import BatchedSamplingUnsupported, sample_stacked, stack_weights
from emascope.config import ScoringConfig
from emascope.features import Features, IdentityExtractor
from emascope.kid import KIDPlan, subset_indices
from emascope.rundir import RunWriter
from emascope.scoring import Reference, draw_and_extract, draw_variants_batched, run_sweep

torch.set_num_threads(1)


def _features(n, d, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * 1.2 + shift)


@pytest.mark.parametrize("n_gen,n_ref,d,m,subsets", [(300, 300, 48, 300, 5), (400, 250, 16, 100, 30),
                                                     (600, 700, 2, 600, 9), (500, 450, 3, 200, 11),
                                                     (120, 90, 2048, 40, 7), (12, 10, 3, 2, 9)])
def test_kid_equals_torch_fidelity_with_the_same_subsets(n_gen, n_ref, d, m, subsets):
    gen, ref = _features(n_gen, d, 1, 0.3), _features(n_ref, d, 2)
    tf = kid_features_to_metric(gen, ref, kid_subset_size=m, kid_subsets=subsets, rng_seed=11, verbose=False)
    ours = M.kid(gen, ref, subset_size=m, subsets=subsets, seed=11)
    assert ours["kid_subset_size"] == m
    assert ours["kid_mean"] == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-6, abs=1e-9)
    assert ours["kid_std"] == pytest.approx(tf["kernel_inception_distance_std"], rel=1e-6, abs=1e-9)
    # tiny blocks (many kernel blocks, diagonal across block edges) give the same values
    small = KIDPlan.build(ref, n_gen, subset_size=m, subsets=subsets, seed=11, block_bytes=8 * 7 * n_ref)
    assert (small.ref_phi is not None) == ((d + 1) ** 3 <= max(n_gen, 64))  # low d: the feature map
    np.testing.assert_allclose(small.values(gen).numpy(), KIDPlan.build(
        ref, n_gen, subset_size=m, subsets=subsets, seed=11).values(gen).numpy(), rtol=1e-12, atol=1e-15)


def test_kid_subsets_are_torch_fidelitys_and_the_plan_is_shared_across_variants():
    gen_i, ref_i = subset_indices(50, 60, 20, 3, seed=4)
    rng = np.random.RandomState(4)
    for s in range(3):
        np.testing.assert_array_equal(gen_i[s], rng.choice(50, 20, replace=False))
        np.testing.assert_array_equal(ref_i[s], rng.choice(60, 20, replace=False))
    ref = _features(200, 8, 3)
    plan = M.kid_plan(ref, 150, subset_size=100, subsets=10, seed=2)
    for seed in (5, 6, 7):  # one plan, three variants: each equals a fresh computation
        gen = _features(150, 8, seed, 0.1 * seed)
        assert plan(gen) == M.kid(gen, ref, subset_size=100, subsets=10, seed=2)
    with pytest.raises(ValueError, match="takes"):
        plan(_features(149, 8, 1))


def test_kid_keeps_its_kernels_for_the_interval_and_computes_whole_set_subsets_once():
    """With the subset size equal to the number of samples every subset is all of them: the plan keeps
    one distinct generated row. The kernels the metric keeps give KID's half-sample replicates equal to
    computing them afresh (:func:`emascope.uncertainty.kid_replicates`), and change no KID value."""
    from emascope import uncertainty as U
    from emascope.kid import KERNELS_KEY

    gen, ref = _features(240, 48, 1, 0.2), _features(300, 48, 2)
    plan = M.kid_plan(ref, 240, subset_size=240, subsets=6, seed=3)
    assert plan.gen_rows.shape == (1, 240) and plan.gen_of.tolist() == [0] * 6
    keep = {}
    out = plan(gen, keep)
    tf = kid_features_to_metric(gen, ref, kid_subset_size=240, kid_subsets=6, rng_seed=3, verbose=False)
    assert out["kid_mean"] == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-6, abs=1e-9)
    assert out == plan(gen)
    kern = keep[KERNELS_KEY]
    assert kern.gen.shape == (240, 240) and kern.cross_sums.shape == (240,)
    masks = U.half_sample_masks(240, 30, seed=0)
    np.testing.assert_allclose(U.kid_replicates(gen, ref, masks, kernels=kern), U.kid_replicates(gen, ref, masks),
                               rtol=1e-10, atol=1e-14)
    tight = M.kid_plan(ref, 240, subset_size=100, subsets=6, seed=3)
    tight.block_bytes = 8 * 240 * 239  # the kernel no longer fits in one block: nothing kept
    keep = {}
    assert tight(gen, keep) == M.kid(gen, ref, subset_size=100, subsets=6, seed=3) and not keep


# ------------------------------------------------------------------------------- batched sampling


def _bank(model, steps=4):
    """A bank with distinct variants: a few real optimizer-free weight moves between updates."""
    bank = EMABank(model, (0.5, 0.9, 0.99), bema=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(steps):
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            bank.update()
    return bank


@pytest.mark.parametrize("kind", ["tree2d", "conv"])
def test_batched_samples_equal_per_variant_samples(kind):
    p = E.parts(kind)
    model, sampler = p["model"].eval(), p["sampler"]
    bank = _bank(model)
    variants = list(bank.variants)
    assert len(variants) == 5
    weights, _ = stack_weights(model, [lambda v=v: bank.materialize(v) for v in variants])
    n = 48
    with torch.no_grad():
        batched = sample_stacked(model, weights, sampler, n, torch.Generator().manual_seed(9))
        single = []
        for v in variants:
            with bank.swap(model, v):
                single.append(sampler(model, n, torch.Generator().manual_seed(9)))
    single = torch.stack(single)
    assert batched.shape == single.shape == (5, n, *single.shape[2:])
    assert not torch.equal(single[0], single[1])  # the variants differ
    # the same computation; vmap runs it through batched kernels (bmm, grouped conv) whose float32
    # rounding may differ in the last bits, and the sampler's integration steps carry it on (on the
    # development CPU the MLP's is bit-identical at this size; the conv net's differs by up to 5e-6
    # on a scale of 1, depending on the kernels the CPU picks): float32 rounding of a few steps
    scale = float(single.abs().max())
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=2e-5 * scale)


def test_batched_draw_keeps_each_batchs_generator_and_the_features(tmp_path):
    """Through the sweep's drawing code: same samples per batch (per-batch seeding), same features,
    same previews as drawing one variant at a time, and the sweep's metrics are identical."""
    p = E.parts("tree2d")
    model = p["model"].eval()
    bank = _bank(model)
    cfg = ScoringConfig(num_samples=100, batch_size=32, seed=3, preview_points=40)
    variants = list(bank.variants)
    timings = dict.fromkeys(("sampling", "features"), 0.0)
    batched = draw_variants_batched(model, bank, variants, p["sampler"], cfg, IdentityExtractor(), timings,
                                    keep_all=True)
    for v in variants:
        with bank.swap(model, v), torch.no_grad():
            one = draw_and_extract(model, p["sampler"], cfg, IdentityExtractor(), timings, keep_all=True)
        assert batched[v].num_drawn == one.num_drawn == 100
        for got, want in ((batched[v].samples, one.samples), (batched[v].head, one.head),
                          (batched[v].features.features, one.features.features)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    ref = Reference.build(Features(p["reference"]))
    runs = {}
    for flag in (False, True):
        d = tmp_path / str(flag)
        d.mkdir()
        res = run_sweep(model=model, bank=bank, variants=variants, step=1, writer=RunWriter(d), cfg=cfg,
                        sampler=p["sampler"], extractor=IdentityExtractor(), reference=ref, fd_name="fd",
                        batched=flag)
        assert res.batched is flag and not res.batched_failed
        runs[flag] = res.scores
    assert runs[True].keys() == runs[False].keys()
    for v, scores in runs[False].items():
        assert runs[True][v] == pytest.approx(scores, rel=1e-5, abs=1e-7)


def test_batched_sampling_falls_back_once_when_the_sampler_is_not_pure(tmp_path):
    """A sampler calling a method other than forward (or branching on values) cannot be batched:
    the sweep draws one variant at a time, says so once, and the numbers are the per-variant ones."""
    p = E.parts("tree2d")
    model = p["model"].eval()
    bank = _bank(model)

    def calls_a_method(m, n, generator):
        x = torch.randn(n, 2, generator=generator)
        return m.denoise(x, torch.full((n,), 0.5))

    def branches_on_values(m, n, generator):
        y = m(torch.randn(n, 2, generator=generator), torch.full((n,), 0.5))
        return y * 0 if float(y.abs().max()) > 1e9 else y  # Python control flow on the model's output

    weights, _ = stack_weights(model, [lambda v=v: bank.materialize(v) for v in bank.variants])
    with pytest.raises(BatchedSamplingUnsupported, match="model.denoise"):
        sample_stacked(model, weights, calls_a_method, 4, torch.Generator().manual_seed(0))
    for sampler in (calls_a_method, branches_on_values):
        cfg = ScoringConfig(num_samples=64, batch_size=32, seed=1, kid_subsets=2)
        ref = Reference.build(Features(p["reference"]))
        results = {}
        for flag in (True, False):
            d = tmp_path / f"{sampler.__name__}{flag}"
            d.mkdir()
            res = run_sweep(model=model, bank=bank, variants=list(bank.variants), step=2, writer=RunWriter(d),
                            cfg=cfg, sampler=sampler, extractor=IdentityExtractor(), reference=ref, fd_name="fd",
                            batched=flag)
            results[flag] = res
            ev = [json.loads(line) for line in (d / "events.jsonl").read_text().splitlines()]
            notices = [e for e in ev if e["type"] == "notice" and e.get("where") == "batched_sampling"]
            assert len(notices) == (1 if flag else 0)
        assert results[True].batched_failed and not results[True].batched
        assert results[True].scores == results[False].scores and results[True].errors == 0


def test_the_fallback_is_recorded_once_per_run(tmp_path):
    p = E.parts("tree2d")

    def not_pure(m, n, generator):
        return m.denoise(torch.randn(n, 2, generator=generator), torch.full((n,), 0.3))

    from emascope import attach

    with attach(p["model"], run_dir=tmp_path / "r", sampler=not_pure, reference=p["reference"], score_every=1,
                num_samples=64, batch_size=64, decays=(0.9,), kid_subsets=2, batched_sampling=True,
                scoring="inline", score_at_close=False) as scope:
        for _ in range(3):
            scope.step()
    ev = [json.loads(line) for line in (tmp_path / "r" / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in ev if e["type"] == "notice" and e["where"] == "batched_sampling"] == [1]
    assert sum(e["type"] == "score_done" and e["errors"] == 0 for e in ev) == 3


def test_a_variants_nonfinite_samples_fail_that_variant_only_in_a_batched_draw():
    """Batched drawing refuses NaN/Inf samples per variant, as one variant at a time does (a sampler
    error for that variant, nothing drawn for it); the other variants' samples are unchanged."""
    p = E.parts("tree2d")
    model = p["model"].eval()
    bank = _bank(model)
    variants = list(bank.variants)
    bad = variants[2]

    class NaNWeights:  # the bank, with one variant's weights (but the frozen ones) all NaN
        sharded = False

        def frozen_keys(self):
            return bank.frozen_keys()

        def variant_state(self, v):
            sd, fixed = bank.variant_state(v), set(bank.frozen_keys())
            return {k: torch.full_like(t, float("nan")) if v == bad and t.is_floating_point() and k not in fixed
                    else t for k, t in sd.items()}

    cfg = ScoringConfig(num_samples=64, batch_size=32, seed=5, preview_points=16)
    timings = dict.fromkeys(("sampling", "features"), 0.0)
    clean = draw_variants_batched(model, bank, variants, p["sampler"], cfg, IdentityExtractor(), timings)
    notes: list[str] = []
    got = draw_variants_batched(model, NaNWeights(), variants, p["sampler"], cfg, IdentityExtractor(), timings,
                                notes=notes)
    assert got[bad].error is not None and got[bad].error.where == "sampler"
    assert "non-finite" in str(got[bad].error.exc)
    assert got[bad].features is None and got[bad].num_drawn == 0
    for v in variants:
        if v != bad:
            assert got[v].error is None and got[v].num_drawn == 64
            torch.testing.assert_close(got[v].features.features, clean[v].features.features, rtol=0, atol=0)
    assert notes == []  # float points: nothing converted
