"""emascope.features: sample kinds, image conversion, extractors, hashing and the reference cache."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch_fidelity
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from emascope import features as F

TINY = "emascope-test-tinyconv"


class _TinyConv(FeatureExtractorBase):
    """A small registered torch-fidelity extractor: uint8 [n, 3, H, W] -> 8 features + 5 logits."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 5)
        if feature_extractor_weights_path is not None:
            self.load_state_dict(torch.load(feature_extractor_weights_path, weights_only=True))

    @staticmethod
    def get_provided_features_list():
        return ("pool", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits" if metric == "isc" else "pool"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return None

    def forward(self, x):
        assert x.dtype == torch.uint8, "torch-fidelity extractors take uint8 images"
        pool = self.conv(x.float() / 255.0).mean(dim=(2, 3))
        out = {"pool": pool, "logits": self.fc(pool)}
        return tuple(out[name] for name in self.features_list)


if TINY not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(TINY, _TinyConv)


def _images(n=6, seed=0):
    return torch.randint(0, 256, (n, 3, 12, 12), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def test_sample_kind_and_image_conversion():
    assert F.sample_kind(torch.zeros(4, 2)) == "points"
    assert F.sample_kind(torch.zeros(4, 1, 8, 8)) == "images"
    with pytest.raises(ValueError, match="samples must be"):
        F.sample_kind(torch.zeros(4, 5, 8, 8))
    with pytest.raises(ValueError, match="torch.Tensor"):
        F.sample_kind(np.zeros((4, 2)))
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    out = F.images_to_uint8(x, "-1,1")
    assert out.shape == (1, 3, 2, 2) and out.dtype == torch.uint8
    assert out[0, 0].flatten().tolist() == [0, 128, 255, 255]  # 127.5 rounds to even, 2.0 clamps
    assert F.images_to_uint8(x / 2 + 0.5, "0,1")[0, 1].flatten().tolist() == [0, 128, 255, 255]
    u8 = _images(2)
    assert torch.equal(F.images_to_uint8(u8), u8)
    with pytest.raises(ValueError, match="image_range"):
        F.images_to_uint8(x, "auto")
    assert F.resolve_image_range("auto", torch.rand(3, 3, 4, 4)) == "0,1"
    assert F.resolve_image_range("auto", torch.rand(3, 3, 4, 4) - 0.5) == "-1,1"
    assert F.resolve_image_range("auto", u8) == "-1,1" and F.resolve_image_range("0,1", None) == "0,1"
    with pytest.raises(ValueError, match="image_range must be one of"):
        F.resolve_image_range("0,255", None)


def test_identity_and_callable_extractors():
    pts = torch.randn(10, 3)
    out = F.make_extractor("auto", "points")(pts)
    assert isinstance(out.features, torch.Tensor) and out.features.dtype == torch.float64
    assert torch.equal(out.features, pts.double()) and out.logits is None
    with pytest.raises(ValueError, match="identity extractor"):
        F.IdentityExtractor()(torch.zeros(2, 1, 4, 4))

    calls = []

    def fn(x):
        calls.append(len(x))
        return x[:, :2] * 2, x[:, 2:]

    ext = F.make_extractor(fn, "points", batch_size=4)
    out = ext(pts)
    assert calls == [4, 4, 2] and ext.name == "fn"
    assert torch.allclose(out.features, pts[:, :2].double() * 2) and out.logits.shape == (10, 1)
    net = nn.Linear(3, 4)
    mod_ext = F.make_extractor(net, "points")
    assert mod_ext.weights_hash == F.module_hash(net) and mod_ext.name == "Linear"
    with pytest.raises(ValueError, match="feature_extractor must be"):
        F.make_extractor(3, "points")
    with pytest.raises(ValueError, match="rows"):
        F.Features(torch.zeros(3, 2), torch.zeros(2, 5))


def test_registered_torch_fidelity_extractor_on_cpu_with_weights_file(tmp_path):
    """Any extractor registered with torch-fidelity works; it runs on the CPU (torch-fidelity's own
    helpers default to cuda=True) and its weights file changes the weights hash."""
    ext = F.make_extractor(TINY, "images", batch_size=4, device="cpu")
    assert isinstance(ext, F.TorchFidelityExtractor)
    assert (ext.feature_layer, ext.logits_layer, ext.has_logits) == ("pool", "logits", True)
    imgs = _images(10)
    out = ext(imgs)
    assert out.features.shape == (10, 8) and out.logits.shape == (10, 5)
    assert next(ext.module.parameters()).device.type == "cpu"
    # same features as the module called directly (uint8 in), and float [-1, 1] images agree
    with torch.no_grad():
        direct = ext.module(imgs)
    assert torch.allclose(out.features, direct[0].double())
    assert torch.allclose(ext(imgs.float() / 127.5 - 1.0).features, out.features, atol=1e-5)

    sd = {k: v + 0.5 for k, v in ext.module.state_dict().items()}
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    other = F.make_extractor(TINY, "images", weights_path=path)
    assert other.weights_hash != ext.weights_hash
    assert not torch.allclose(other(imgs).features, out.features)
    same = F.make_extractor(TINY, "images", weights_path=path)
    assert same.weights_hash == other.weights_hash


def test_callable_hash_follows_code_and_weights():
    """The cache key of a callable extractor changes when its code or the weights it uses change."""

    def double(x):
        return x * 2

    def triple(x):
        return x * 3

    assert F.callable_hash(double) == F.callable_hash(double) != F.callable_hash(triple)
    net = nn.Linear(2, 2)

    def through(module):
        return lambda x: module(x)

    before = F.callable_hash(through(net))
    assert F.callable_hash(through(net)) == before
    with torch.no_grad():
        net.weight += 1
    assert F.callable_hash(through(net)) != before
    assert F.callable_hash(net) == F.module_hash(net)
    assert F.callable_hash(net.forward) != F.callable_hash(nn.Linear(2, 2).forward)

    class Proj:
        def __init__(self, w):
            self.w = w

        def __call__(self, x):
            return x @ self.w

    assert F.callable_hash(Proj(torch.ones(2))) != F.callable_hash(Proj(torch.zeros(2)))
    p1 = functools.partial(torch.matmul, other=torch.ones(2, 2))
    p2 = functools.partial(torch.matmul, other=torch.zeros(2, 2))
    p3 = functools.partial(torch.add, other=torch.ones(2, 2))
    assert len({F.callable_hash(p1), F.callable_hash(p2), F.callable_hash(p3)}) == 3
    assert F.make_extractor(double, "points").weights_hash == F.callable_hash(double)


def test_tensor_and_module_hash():
    # 0-d tensors (e.g. BatchNorm's num_batches_tracked) hash too
    assert F.tensor_hash(torch.tensor(3)) != F.tensor_hash(torch.tensor(4))
    a = torch.arange(12, dtype=torch.float32).view(3, 4)
    assert F.tensor_hash(a) == F.tensor_hash(a.clone())
    assert F.tensor_hash(a) != F.tensor_hash(a.view(4, 3))  # shape is part of the hash
    assert F.tensor_hash(a) != F.tensor_hash(a.double())  # so is the dtype
    assert F.tensor_hash(a.t()) == F.tensor_hash(a.t().contiguous())
    assert F.tensor_hash(torch.zeros(0, 3)) != F.tensor_hash(torch.zeros(3, 0))
    bn = nn.BatchNorm2d(3)
    h0 = F.module_hash(bn)
    bn.running_mean += 1
    assert F.module_hash(bn) != h0 and len(h0) == 16


def test_reference_identity():
    x = torch.randn(20, 3)
    assert F.reference_identity(x) == F.reference_identity(x.numpy())
    y = x.clone()
    y[7, 1] += 1e-3
    assert F.reference_identity(y) != F.reference_identity(x)
    assert F.reference_identity(x, max_items=5) == F.reference_identity(x[:5])

    ds = torch.utils.data.TensorDataset(x, torch.zeros(20))
    ds2 = torch.utils.data.TensorDataset(y, torch.zeros(20))
    assert F.reference_identity(ds) != F.reference_identity(x)
    assert F.reference_identity(ds) != F.reference_identity(ds2)  # item 7 is one of the sampled items
    assert torch.equal(F.reference_tensor(ds), x)
    assert torch.equal(F.reference_tensor(ds, 4), x[:4])
    with pytest.raises(ValueError, match="reference must be"):
        F.reference_identity(object())


def test_cache_round_trip_and_bad_files(tmp_path):
    key = F.cache_key("inception-v3-compat/../x", "abc", "def")
    assert "/" not in key and key.endswith("-abc-def")
    feats = F.Features(torch.randn(7, 4), torch.randn(7, 3))
    path = tmp_path / f"{key}.npz"
    F.save_cached(path, feats)
    back = F.load_cached(path)
    assert torch.equal(back.features, feats.features) and torch.equal(back.logits, feats.logits)
    F.save_cached(tmp_path / "nologits.npz", F.Features(torch.randn(3, 2)))
    assert F.load_cached(tmp_path / "nologits.npz").logits is None
    assert F.load_cached(tmp_path / "missing.npz") is None
    torn = tmp_path / "torn.npz"
    torn.write_bytes(path.read_bytes()[:40])
    assert F.load_cached(torn) is None
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, features=np.array([{"a": 1}, None], dtype=object))
    assert F.load_cached(pickled) is None  # never unpickled


def test_extract_in_batches():
    pts = torch.randn(11, 2)
    out = F.extract_in_batches(F.IdentityExtractor(), pts, 3)
    assert torch.equal(out.features, pts.double()) and out.logits is None
