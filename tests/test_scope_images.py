"""attach() with image samples: PNG previews, a user feature extractor (nn.Module), the reference cache.

(The torch-fidelity Inception path with calibrated offline weights is tested in tests/test_inception.py.)
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scope_helpers import batch_generator
from torch import nn

from emascope import attach
from emascope.features import Features
from emascope.metrics import frechet_distance

torch.set_num_threads(1)


class TinyGenerator(nn.Module):
    """Noise [n, 8] -> grayscale images [n, 1, 8, 8] in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 64)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(z)).view(-1, 1, 8, 8)


def image_sampler(model: nn.Module, n: int, generator: torch.Generator) -> torch.Tensor:
    return model(torch.randn(n, 8, generator=generator, device=generator.device))


def make_extractor(seed: int) -> nn.Module:
    """A fixed random conv net used as feature extractor: uint8-free float images -> [n, 12]."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, 12)).eval()
    net.__name__ = f"convfeat{seed}"
    return net


def _reference(n: int = 150) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    base = torch.linspace(-1, 1, 64).view(1, 1, 8, 8)
    return (base + 0.3 * torch.randn(n, 1, 8, 8, generator=g)).clamp(-1, 1)


def _events(run_dir, type_):
    events = map(json.loads, (run_dir / "events.jsonl").read_text().splitlines())
    return [e for e in events if e["type"] == type_]


def _train(run_dir, extractor, **kw):
    torch.manual_seed(0)
    model = TinyGenerator()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref = _reference()
    with attach(model, opt, run_dir=run_dir, sampler=image_sampler, reference=ref,
                feature_extractor=extractor, score_every=4, num_samples=60, batch_size=32, preview=16,
                decays=(0.9,), **kw) as scope:
        for _ in range(4):
            loss = (model(torch.randn(16, 8)) - ref[:16]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return scope, ref


def test_image_run_previews_metrics_and_cache(tmp_path):
    run_dir = tmp_path / "img"
    extractor = make_extractor(0)
    scope, ref = _train(run_dir, extractor)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["sample_kind"] == "images" and info["settings"]["feature_extractor"] == "convfeat0"
    for variant in ("raw", "0.9"):
        png = run_dir / "samples" / "step_000000004" / f"{variant}.png"
        img = Image.open(io.BytesIO(png.read_bytes()))
        assert img.mode == "L" and img.size == (4 * 10 + 2, 4 * 10 + 2)  # 4x4 grid of 8 px + 2 px padding
    assert not (run_dir / "samples" / "reference.npy").exists()
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fd = {r["variant"]: r["value"] for r in recs if r["metric"] == "fd"}
    assert set(fd) == {"raw", "0.9"} and "fid" not in {r["metric"] for r in recs}
    # recompute raw's FD: the same samples (same seed) through the same extractor
    with torch.no_grad():
        model = scope.model.eval()
        samples = torch.cat([image_sampler(model, 32, batch_generator(0, 0)),
                             image_sampler(model, 28, batch_generator(0, 1))])
        model.train()
        got = frechet_distance(Features(extractor(samples)).features, Features(extractor(ref)).features)
    assert fd["raw"] == pytest.approx(got, rel=1e-9)
    ev = _events(run_dir, "reference")
    assert len(ev) == 1 and ev[0]["cached"] is False and ev[0]["num"] == len(ref)
    cache = list((run_dir / "reference").glob("*.npz"))
    assert len(cache) == 1 and cache[0].name.startswith("convfeat0-")
    with np.load(cache[0], allow_pickle=False) as z:
        np.testing.assert_allclose(z["features"], extractor(ref).detach().double().numpy())

    # same extractor weights and reference: the cache is reused (overwrite keeps reference/)
    _train(run_dir, make_extractor(0), overwrite=True)
    assert _events(run_dir, "reference")[0]["cached"] is True
    # other weights under the same name: a new key, never the stale features
    other = make_extractor(1)
    other.__name__ = "convfeat0"
    _train(run_dir, other, overwrite=True)
    assert _events(run_dir, "reference")[0]["cached"] is False
    assert len(list((run_dir / "reference").glob("convfeat0-*.npz"))) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_bank_on_gpu(tmp_path):
    torch.manual_seed(0)
    model = TinyGenerator().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref = _reference().cuda()
    with attach(model, opt, run_dir=tmp_path / "gpu", sampler=image_sampler, reference=ref,
                feature_extractor=make_extractor(0).cuda(), score_every=3, num_samples=40,
                decays=(0.9,)) as scope:
        for _ in range(3):
            model(torch.randn(8, 8, device="cuda")).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        assert scope.bank.device.type == "cuda"
    recs = (tmp_path / "gpu" / "metrics.jsonl").read_text().splitlines()
    assert len(recs) == 2 * 7 and not _events(tmp_path / "gpu", "error")


def test_image_range_applies_to_previews_without_reference(tmp_path):
    def half_grey(model, n, generator):  # images in [0, 1]
        return torch.full((n, 1, 8, 8), 0.5) + 0 * model.fc.bias.sum()

    with attach(TinyGenerator(), run_dir=tmp_path / "r", sampler=half_grey, image_range="0,1",
                score_every=None, num_samples=4, preview=4, decays=(0.9,)):
        pass
    img = np.asarray(Image.open(tmp_path / "r" / "samples" / "step_000000000" / "raw.png"))
    assert img[2:10, 2:10].min() == img[2:10, 2:10].max() == 128  # 0.5 * 255, not (0.5 + 1) * 127.5


def test_features_are_extracted_batch_by_batch_and_extractor_failure_keeps_preview(tmp_path):
    seen = []

    def extractor(x):
        seen.append(len(x))
        if len(seen) == 8:  # fails on the 2nd batch of the 2nd variant
            raise RuntimeError("extractor died")
        return x.flatten(1)[:, :5]

    torch.manual_seed(0)
    with attach(TinyGenerator(), run_dir=tmp_path / "r", sampler=image_sampler, reference=_reference(),
                feature_extractor=extractor, score_every=None, num_samples=50, batch_size=20, preview=8,
                decays=(0.9,)):
        pass
    # reference (150 in feature_batch_size chunks), then each sampler batch as it arrives: never all samples
    assert seen == [64, 64, 22, 20, 20, 10, 20, 20]
    errors = _events(tmp_path / "r", "error")
    assert [(e["where"], e["variant"]) for e in errors] == [("features", "0.9")]
    assert (tmp_path / "r" / "samples" / "step_000000000" / "0.9.png").exists()
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert {r["variant"] for r in recs} == {"raw"}
