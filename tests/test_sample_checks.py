"""Scores that cannot lie (issue 15): NaN/Inf samples or references give an error event and no
values (precision, recall, density and coverage were written as 0.0), integer samples are
converted with a notice, and a feature extractor's weights file is read once, safely.
"""

from __future__ import annotations

import builtins
import json

import numpy as np
import pytest
import torch
from scope_helpers import Denoiser, mixture, sampler, train_step
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from emascope import attach
from emascope import metrics as M
from emascope.features import TorchFidelityExtractor
from emascope.samples.digits import DigitsClassifier, DigitsFeatureExtractor

torch.set_num_threads(1)


def _records(run_dir, name):
    path = run_dir / name
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("side", ["gen", "ref"])
def test_metric_functions_refuse_non_finite_features(bad, side):
    good = mixture(64, seed=0).double()
    poisoned = torch.full_like(good, bad)
    gen, ref = (poisoned, good) if side == "gen" else (good, poisoned)
    for fn in (lambda: M.precision_recall(gen, ref), lambda: M.density_coverage(gen, ref),
               lambda: M.frechet_distance(gen, ref), lambda: M.kid(gen, ref, subsets=2)):
        with pytest.raises(ValueError, match="non-finite"):
            fn()


def _sweep(tmp_path, name, sampler_fn, reference, **kw):
    torch.manual_seed(0)
    model = Denoiser(width=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data, g = mixture(200, seed=1), torch.Generator().manual_seed(0)
    run_dir = tmp_path / name
    with attach(model, opt, run_dir=run_dir, sampler=sampler_fn, reference=reference, score_every=2,
                num_samples=64, batch_size=32, decays=(0.9,), kid_subsets=2, score_at_close=False, **kw):
        for _ in range(2):
            train_step(model, opt, data, g, batch=16)
    return run_dir, _records(run_dir, "metrics.jsonl"), _records(run_dir, "events.jsonl")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_samples_give_an_error_event_and_no_values(tmp_path, bad):
    def poisoned(model, n, gen):
        return torch.full((n, 2), bad) + 0 * sampler(model, n, gen)

    run_dir, metrics, events = _sweep(tmp_path, "gen", poisoned, mixture(100, seed=3))
    assert metrics == []  # not a single number that looks real (precision 0.0 before)
    errors = [e for e in events if e["type"] == "error"]
    assert {e["variant"] for e in errors} == {"raw", "0.9"}
    assert all(e["where"] == "sampler" and "non-finite" in e["message"] for e in errors)


def test_non_finite_reference_gives_an_error_event_and_no_values(tmp_path):
    ref = mixture(100, seed=3)
    ref[:, 0] = float("nan")
    run_dir, metrics, events = _sweep(tmp_path, "ref", sampler, ref)
    assert metrics == []
    errors = [e for e in events if e["type"] == "error"]
    assert [e["where"] for e in errors] == ["reference"] and "non-finite" in errors[0]["message"]
    assert not list((run_dir / "reference").glob("*.npz"))  # never cached


def test_non_finite_features_from_an_extractor_give_one_error_per_variant(tmp_path):
    def poisons_generated(x):  # generated batches have 32 samples; reference chunks 64 and 36
        out = x.double().clone()
        if len(x) == 32:
            out[::2] = float("nan")
        return out

    run_dir, metrics, events = _sweep(tmp_path, "feat", sampler, mixture(100, seed=3),
                                      feature_extractor=poisons_generated)
    errors = [e for e in events if e["type"] == "error"]
    assert sorted((e["where"], e["variant"]) for e in errors) == [("features", "0.9"), ("features", "raw")]
    assert all("non-finite" in e["message"] for e in errors)
    assert metrics == []


def test_integer_samples_are_converted_with_a_notice(tmp_path):
    def integer_points(model, n, gen):
        return (sampler(model, n, gen) * 10).round().to(torch.int64)

    run_dir, metrics, events = _sweep(tmp_path, "int", integer_points, (mixture(100, seed=3) * 10).round().long())
    notices = [e for e in events if e["type"] == "notice" and e["where"] in ("samples", "reference")]
    assert sorted(e["where"] for e in notices) == ["reference", "samples"]  # once each, not per variant
    assert all("int64" in e["message"] and "converted to float64" in e["message"] for e in notices)
    assert {m["metric"] for m in metrics} >= {"fd", "precision", "recall", "density", "coverage"}
    preview = np.load(run_dir / "samples" / "step_000000002" / "0.9.npy", allow_pickle=False)
    assert preview.dtype == np.float32 and preview.shape == (64, 2)  # previews were dropped silently before


# ------------------------------------------------------------------ the extractor's weights file


class SwappingExtractor(DigitsFeatureExtractor):
    """Loads its weights like torch-fidelity's InceptionV3 (``torch.load(..., weights_only=False)``),
    after an attacker swapped the user's file for a pickle that runs code (the window between a
    ``weights_only=True`` check and torch-fidelity's own load)."""

    swap = None  # (path, malicious bytes), set by the test

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        path, payload = SwappingExtractor.swap
        path.write_bytes(payload)  # the swap
        super(DigitsFeatureExtractor, self).__init__(name, features_list)
        self.net = DigitsClassifier()
        self.net.load_state_dict(torch.load(feature_extractor_weights_path, weights_only=False))
        self.requires_grad_(False)


class _Payload:
    def __reduce__(self):
        return (exec, ("import builtins; builtins._emascope_pwned = True",))


def test_weights_file_is_read_once_safely_and_the_tensors_handed_on(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = DigitsClassifier()
    weights = tmp_path / "w.pt"
    torch.save(net.state_dict(), weights)
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Payload()}, evil)
    SwappingExtractor.swap = (weights, evil.read_bytes())
    monkeypatch.setitem(FEATURE_EXTRACTORS_REGISTRY, "swapping-test", SwappingExtractor)
    monkeypatch.delattr(builtins, "_emascope_pwned", raising=False)
    try:
        ext = TorchFidelityExtractor("swapping-test", weights_path=weights)
    finally:  # (a load of the swapped file runs the payload, then fails on its contents)
        assert not hasattr(builtins, "_emascope_pwned"), "the swapped file was unpickled with weights_only=False"
    for k, v in net.state_dict().items():  # the tensors read before the swap
        assert torch.equal(ext.module.net.state_dict()[k], v), k
    # a file that is not plain tensors is refused outright, naming it
    with pytest.raises(ValueError, match="evil.pt.*cannot be loaded safely"):
        TorchFidelityExtractor("swapping-test", weights_path=evil)
    assert not hasattr(builtins, "_emascope_pwned")
