"""Sample 2, ``digits``: a small flow-matching CNN on scikit-learn's bundled 8x8 digits (no download).

```bash
python -m emascope.samples.digits --run-dir runs/digits
emascope dashboard runs/digits
```

The torch-fidelity path of emascope on a CPU-sized problem: Inception-v3 is meaningless on 8x8
images, so a small CNN classifier trained on the same digits (:class:`DigitsClassifier`) is
registered with ``torch_fidelity.register_feature_extractor`` under :data:`EXTRACTOR_NAME` and
passed to ``attach(feature_extractor=EXTRACTOR_NAME, feature_extractor_weights_path=...)``. Its
penultimate layer (64-d) gives the features for FID/KID/precision/recall/density/coverage, its
10 class logits the Inception Score (max 10). Values are not comparable with Inception-based FIDs.

Images are float ``[n, 1, 8, 8]`` in [-1, 1] (digits' 0..16 grey levels mapped linearly).
The classifier weights are a plain ``torch.save``'d state dict of tensors (loaded with
``weights_only=True``); ``sample_runs/weights/digits_cnn.pt`` ships with the repository and is
re-trained (a few seconds) and written wherever ``--classifier`` points if it is missing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from emascope import attach
from emascope.config import check_int
from emascope.samples.flow import Preconditioned, sample_heun
from emascope.samples.models import ConvDenoiser, ImageMLPDenoiser
from emascope.samples.training import Progress, cosine_lr, parse, run_sample, sample_parser, train_flow

#: Name of the digits classifier in torch-fidelity's feature-extractor registry.
EXTRACTOR_NAME = "emascope-digits-cnn"
#: The shipped classifier weights.
SHIPPED_CLASSIFIER = Path(__file__).with_name("weights") / "digits_cnn.pt"


def load_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 bundled digits: images float32 ``[1797, 1, 8, 8]`` in [-1, 1], labels int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> -1..1
    return images, torch.as_tensor(d.target, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# the classifier and its torch-fidelity registration


class DigitsClassifier(nn.Module):
    """Small CNN on ``[n, 1, 8, 8]`` images in [-1, 1]: ``forward`` -> (features [n, 64], logits [n, 10])."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, stride=2)   # 8x8 -> 4x4
        self.fc = nn.Linear(64 * 4 * 4, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.silu(self.conv2(F.silu(self.conv1(x))))
        feats = F.silu(self.fc(h.flatten(1)))
        return feats, self.head(feats)


def train_classifier(steps: int = 600, seed: int = 0,
                     batch_size: int = 128) -> tuple[DigitsClassifier, float]:
    """Train :class:`DigitsClassifier` on 1500 digits (random 1-pixel shifts); returns it (eval mode)
    and its accuracy on the 297 held-out digits."""
    images, labels = load_digit_images()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(images), generator=gen)
    train_idx, test_idx = perm[:1500], perm[1500:]
    torch.manual_seed(seed)
    net = DigitsClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(steps):
        idx = train_idx[torch.randint(len(train_idx), (batch_size,), generator=gen)]
        x = images[idx]
        dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))  # digits' frame has a blank border
        loss = F.cross_entropy(net(x)[1], labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(images[test_idx])[1].argmax(1) == labels[test_idx]).float().mean())
    return net, acc


def ensure_classifier(path: str | Path, *, steps: int = 600, seed: int = 0) -> Path:
    """Return ``path``, training the classifier and saving its state dict there if it is missing."""
    path = Path(path)
    if not path.is_file():
        net, acc = train_classifier(steps=steps, seed=seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(net.state_dict(), tmp)
        tmp.replace(path)
        print(f"digits: trained the feature classifier ({acc:.1%} held-out accuracy) -> {path}",
              file=sys.stderr)
    return path


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper of :class:`DigitsClassifier`.

    Input: torch-fidelity's convention, uint8 ``[n, 3, H, W]`` (RGB averaged to grey, resized to
    8x8 by area averaging if needed). Features: ``"features"`` (64-d, default for FID/KID/PRC)
    and ``"logits"`` (10 classes, default for the Inception Score).
    """

    def __init__(self, name: str, features_list: Sequence[str],
                 feature_extractor_weights_path: str | BinaryIO | None = None, **kwargs: Any) -> None:
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"{name}: pass feature_extractor_weights_path (a digits_cnn.pt state dict, "
                             "see emascope.samples.digits.ensure_classifier)")
        self.net = DigitsClassifier()
        state = torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state)
        self.requires_grad_(False)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dim() != 4 or x.shape[1] != 3 or x.dtype != torch.uint8:
            raise ValueError(f"{self.name} expects uint8 [n, 3, H, W] images, got {x.dtype} {tuple(x.shape)}")
        grey = x.float().mean(dim=1, keepdim=True) / 127.5 - 1.0
        if grey.shape[-2:] != (8, 8):
            grey = F.adaptive_avg_pool2d(grey, (8, 8))
        feats, logits = self.net(grey)
        out = {"features": feats, "logits": logits}
        return tuple(out[name] for name in self.features_list)


def register_extractor() -> str:
    """Register :class:`DigitsFeatureExtractor` with torch-fidelity (idempotent); returns its name."""
    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, DigitsFeatureExtractor)
    return EXTRACTOR_NAME


# ----------------------------------------------------------------------------------------------
# the generative model and its training run


#: Velocity networks of the digits sample.
MODELS = ("mlp", "conv")
#: Learning-rate schedules of the digits sample.
SCHEDULES = ("cosine", "constant")


@dataclass
class DigitsConfig:
    """Settings of the digits sample (counts are optimizer steps or numbers of images).

    The defaults are the shipped run's (``sample_runs/runs/digits``): a small residual CNN velocity
    network (~43k parameters), Adam at a constant 2e-3, 2,000 steps, 8 stages of 500 images per
    variant. That model is far from the real-versus-real floor (FD ~71 against 6 .. 10). A longer,
    bigger configuration (``model="mlp"``, ``hidden=768``, ``depth=3``, ``schedule="cosine"``,
    ``steps=10000``) is available but has not been run to the end on this project's CPUs, so no run of
    it ships.
    """

    steps: int = 2000             # optimizer steps
    batch_size: int = 128         # training images per step
    lr: float = 2e-3              # Adam learning rate (peak of the schedule)
    schedule: str = "constant"    # "constant"; "cosine": lr * cos decay to 0 at `steps` (warm-up: min(200, steps/10))
    model: str = "conv"           # "conv" (ConvDenoiser) or "mlp" (ImageMLPDenoiser)
    hidden: int = 768             # MLP width (model="mlp")
    depth: int = 3                # MLP hidden layers (model="mlp")
    channels: int = 32            # ConvDenoiser width
    blocks: int = 4               # ConvDenoiser residual blocks
    sigma_data: float = 0.75      # EDM preconditioning: std of the [-1, 1] digit pixels (~0.76)
    score_every: int = 250        # scoring stages every this many steps (+ one at the end)
    num_samples: int = 500        # images per variant per stage
    sample_batch: int = 500       # images per sampler call
    sample_steps: int = 8         # Heun steps of the sampler (15 model calls)
    kid_subset_size: int = 1000   # KID subset size (capped at num_samples and the reference size)
    reference_size: int | None = None  # reference digits (None: all 1797)
    seed: int = 0                 # training seed; scoring uses seed + 1
    decays: tuple[float, ...] | None = None  # None: emascope's default sweep

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "hidden", "depth", "channels", "blocks", "score_every",
                     "num_samples", "sample_batch", "sample_steps", "kid_subset_size"):
            check_int(name, getattr(self, name), 1)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")


def build_model(cfg: DigitsConfig) -> Preconditioned:
    """The velocity model: an EDM-preconditioned :class:`ImageMLPDenoiser` (or :class:`ConvDenoiser`)."""
    if cfg.model == "mlp":
        net: nn.Module = ImageMLPDenoiser((1, 8, 8), hidden=cfg.hidden, depth=cfg.depth)
    else:
        net = ConvDenoiser(channels=cfg.channels, num_blocks=cfg.blocks)
    return Preconditioned(net, sigma_data=cfg.sigma_data)


def make_sampler(sample_steps: int) -> Callable[[nn.Module, int, torch.Generator], torch.Tensor]:
    """The agent's sampler: noise from ``generator`` -> Heun ODE solve -> images ``[n, 1, 8, 8]`` in
    [-1, 1]."""

    def sampler(model: nn.Module, n: int, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(n, 1, 8, 8, generator=generator, device=generator.device)
        return sample_heun(model, noise, num_steps=sample_steps).clamp(-1.0, 1.0)

    return sampler


def train(run_dir: str | Path, cfg: DigitsConfig | None = None, *,
          classifier: str | Path = SHIPPED_CLASSIFIER,
          overwrite: bool = False, progress: Progress | None = None, name: str = "digits",
          score_at_close: bool = True) -> Path:
    """Train the digits model with the agent attached; returns the run directory.

    ``classifier``: weights of the feature classifier (trained and written there if missing).
    ``score_at_close=False`` skips the final sweep when training stops before a stage (Ctrl-C).
    ``progress(step, total)`` is called after every optimizer step.
    """
    cfg = cfg or DigitsConfig()
    weights = ensure_classifier(classifier)
    register_extractor()
    images, _ = load_digit_images()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    scope = attach(model, opt, run_dir=run_dir, name=name, overwrite=overwrite,
                   score_at_close=score_at_close,
                   sampler=make_sampler(cfg.sample_steps), reference=images, image_range="-1,1",
                   feature_extractor=EXTRACTOR_NAME, feature_extractor_weights_path=weights,
                   reference_size=cfg.reference_size, kid_subset_size=cfg.kid_subset_size,
                   score_every=cfg.score_every, score_busy="wait",  # every stage scored, in the background
                   num_samples=cfg.num_samples, batch_size=cfg.sample_batch,
                   seed=cfg.seed + 1, decays=cfg.decays)
    schedule = None
    if cfg.schedule == "cosine":
        warmup = min(200, cfg.steps // 10)

        def schedule(step: int) -> float:
            return cosine_lr(step, cfg.steps, warmup)
    train_flow(model, opt, scope, steps=cfg.steps, generator=gen, progress=progress, lr_scale=schedule,
               draw_batch=lambda g: images[torch.randint(len(images), (cfg.batch_size,), generator=g)])
    return Path(run_dir)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = sample_parser("digits", __doc__.split("\n")[0], DigitsConfig)
    p.add_argument("--classifier", default=str(SHIPPED_CLASSIFIER),
                   help="feature-classifier weights (trained and written here if missing)")
    return parse(p, argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_sample("digits", args, DigitsConfig, train, classifier=args.classifier)


if __name__ == "__main__":
    sys.exit(main())
