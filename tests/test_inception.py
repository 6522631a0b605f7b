"""The real Inception-v3 path, offline: torch-fidelity's extractor loaded from a local weights file.

No download: the test builds torch-fidelity's InceptionV3 with random weights, calibrates its
BatchNorm statistics on random images (with untouched running stats every input maps to nearly
the same features: FID ~ 0 and IS = 1 for anything), saves the state dict with ``torch.save`` (the
format torch-fidelity's ``feature_extractor_weights_path`` loads) and scores through it.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tfi
from scope_helpers import batch_generator
from torch import nn
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from emascope import attach
from emascope import metrics as M
from emascope.features import TorchFidelityExtractor, cache_key, load_cached, make_extractor

pytestmark = pytest.mark.slow  # Inception at 299 px on the CPU: ~0.15 s/image, ~40 s for this file


def _uncalibrated_inception(monkeypatch) -> nn.Module:
    with monkeypatch.context() as m:
        m.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    return net


def _smooth(n: int, seed: int) -> torch.Tensor:
    """Smooth colour gradients, uint8 [n, 3, 32, 32]."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.rand(n, 3, 1, 1, generator=g)
    hi = torch.rand(n, 3, 1, 1, generator=g)
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32)
    return ((lo + (hi - lo) * ramp).expand(n, 3, 32, 32) * 255).round().to(torch.uint8)


def _noise(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        torch.manual_seed(0)
        net = _uncalibrated_inception(mp)
    finally:
        mp.undo()
    for mod in net.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average over the calibration batches
    net.train()
    with torch.no_grad():
        net(torch.cat([_smooth(5, 100), _noise(5, 200)]))
    net.eval()
    path = tmp_path_factory.mktemp("inception") / "inception-calibrated.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_through_weights_path_separates_distributions(weights_path):
    ext = make_extractor("inception-v3-compat", "images", weights_path=weights_path, batch_size=32)
    assert isinstance(ext, TorchFidelityExtractor) and ext.has_logits
    assert next(ext.module.parameters()).device.type == "cpu"  # torch-fidelity would default to cuda
    n = 16
    a1, a2, b = ext(_smooth(n, 1)), ext(_smooth(n, 2)), ext(_noise(n, 3))
    assert a1.features.shape == (n, 2048) and a1.logits.shape == (n, 1008)
    # two halves of one distribution vs two clearly different ones (gradients vs noise)
    fid_same = M.frechet_distance(a1.features, a2.features)
    fid_diff = M.frechet_distance(a1.features, b.features)
    assert fid_diff > 1.5 * fid_same > 0  # n << 2048 dims: both carry the same finite-n bias
    kid_same = M.kid(a1.features, a2.features, subsets=10)["kid_mean"]
    kid_diff = M.kid(a1.features, b.features, subsets=10)["kid_mean"]
    assert kid_diff > kid_same + 1e-6
    # IS > 1 for varied images (the calibrated net's posteriors differ); exactly 1 for identical ones
    assert M.inception_score(a1.logits, splits=1)["isc_mean"] > 1.01
    copies = ext(_smooth(1, 4).expand(4, -1, -1, -1).contiguous())
    assert M.inception_score(copies.logits, splits=1)["isc_mean"] == pytest.approx(1.0, abs=1e-9)
    # float images in [-1, 1] give the same features as their uint8 encoding
    x = _smooth(2, 9)
    as_float = ext(x.float() / 127.5 - 1.0)
    assert torch.allclose(as_float.features, ext(x).features, atol=1e-4)


def test_weights_hash_changes_the_cache_key(weights_path, tmp_path):
    ext = make_extractor("inception-v3-compat", "images", weights_path=weights_path)
    assert make_extractor("inception-v3-compat", "images", weights_path=weights_path).weights_hash == \
        ext.weights_hash
    other_path = _perturbed_weights(weights_path, tmp_path)
    other = make_extractor("inception-v3-compat", "images", weights_path=other_path)
    assert other.weights_hash != ext.weights_hash
    assert cache_key(ext.name, ext.weights_hash, "r") != cache_key(other.name, other.weights_hash, "r")


def _perturbed_weights(weights_path, folder):
    sd = torch.load(weights_path, weights_only=True)
    sd["fc.bias"] = sd["fc.bias"] + 1.0
    sd["Conv2d_1a_3x3.conv.weight"] = sd["Conv2d_1a_3x3.conv.weight"] * 1.5
    path = folder / "other.pth"
    torch.save(sd, path)
    return path


def _noise_sampler(model, n, generator):
    """Float images in [-1, 1] drawn from the sweep's generator (same for every variant)."""
    return torch.rand(n, 3, 32, 32, generator=generator, device=generator.device) * 2 - 1


def _score_once(run_dir, weights, reference):
    model = nn.Linear(2, 2)
    with attach(model, None, run_dir=run_dir, sampler=_noise_sampler, reference=reference, num_samples=6,
                batch_size=6, decays=[0.9], feature_extractor="inception-v3-compat",
                feature_extractor_weights_path=weights, score_every=None, snapshot_every=None,
                overwrite=True) as scope:
        result = scope.score_now()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert not [e for e in events if e["type"] == "error"], events
    (ref_event,) = [e for e in events if e["type"] == "reference"]
    return result, ref_event


def test_reference_cache_is_keyed_by_weights_and_recomputed(weights_path, tmp_path):
    """Through attach(): another weights file gives another cache key and recomputed reference
    features (the first file's cache stays); the recorded FID is torch-fidelity's on features of the
    same images. (Reuse under an unchanged key is the same-hash check of the test above.)"""
    run_dir = tmp_path / "run"
    reference = _smooth(8, 5)
    first, ev1 = _score_once(run_dir, weights_path, reference)
    assert ev1["cached"] is False and (run_dir / "reference" / f"{ev1['key']}.npz").is_file()
    other_path = _perturbed_weights(weights_path, tmp_path)
    changed, ev2 = _score_once(run_dir, other_path, reference)
    assert ev2["cached"] is False and ev2["key"] != ev1["key"]
    assert sorted(p.name for p in (run_dir / "reference").iterdir()) == \
        sorted([f"{ev1['key']}.npz", f"{ev2['key']}.npz"])
    cached1 = load_cached(run_dir / "reference" / f"{ev1['key']}.npz")
    cached2 = load_cached(run_dir / "reference" / f"{ev2['key']}.npz")
    assert not torch.allclose(cached1.features, cached2.features)
    assert changed.scores["raw"]["fid"] != first.scores["raw"]["fid"]

    ext = make_extractor("inception-v3-compat", "images", weights_path=other_path)
    ref = ext(reference)
    assert torch.allclose(ref.features, cached2.features) and torch.allclose(ref.logits, cached2.logits)
    gen = ext(_noise_sampler(None, 6, batch_generator(0, 0))).features  # one batch of 6, seed 0
    stats_ref = fid_features_to_statistics(ref.features)
    expected = fid_statistics_to_metric(fid_features_to_statistics(gen), stats_ref, False)
    expected = expected["frechet_inception_distance"]
    assert changed.scores["raw"]["fid"] == pytest.approx(expected, rel=1e-6)
    assert changed.scores["0.9"]["fid"] == changed.scores["raw"]["fid"]  # the sampler ignores the weights


def test_weights_file_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(Exception, match="(?i)weights"):
        make_extractor("inception-v3-compat", "images", weights_path=path)
    with pytest.raises(ValueError, match="not a file"):
        make_extractor("inception-v3-compat", "images", weights_path=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="not registered"):
        make_extractor("no-such-extractor", "images")


def test_weights_swapped_after_the_safe_read_never_reach_torch_fidelitys_unsafe_load(weights_path, tmp_path,
                                                                                     monkeypatch):
    """torch-fidelity's InceptionV3 loads its weights path with ``weights_only=False``: swap the file for
    a pickle that runs code at the moment torch-fidelity's constructor starts (after emascope's own
    read). The real class is built; the payload never runs and the weights are the original ones."""
    import builtins
    import shutil

    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class Payload:
        def __reduce__(self):
            return (exec, ("import builtins; builtins._emascope_pwned = True",))

    user_file = tmp_path / "inception.pth"
    shutil.copy(weights_path, user_file)
    evil = tmp_path / "evil.pth"
    torch.save({"x": Payload()}, evil)

    class Swapped(tfi.FeatureExtractorInceptionV3):
        def __init__(self, *args, **kwargs):
            user_file.write_bytes(evil.read_bytes())  # the swap, inside the window
            super().__init__(*args, **kwargs)

    monkeypatch.setitem(FEATURE_EXTRACTORS_REGISTRY, "inception-swap-test", Swapped)
    monkeypatch.delattr(builtins, "_emascope_pwned", raising=False)
    try:
        ext = make_extractor("inception-swap-test", "images", weights_path=user_file)
    finally:  # (a load of the swapped file runs the payload, then fails on its contents)
        assert not hasattr(builtins, "_emascope_pwned"), "torch-fidelity unpickled the swapped file"
    original = torch.load(weights_path, weights_only=True)
    for key, value in ext.module.state_dict().items():  # the weights read before the swap
        assert torch.equal(value, original[key]), key
