"""The built-in feature extractor for small images (``"small-images-v1"``): fixed weights, no download.

What it is. A fixed function of the image, the same on every machine, needing no file and no
network: the image is resized to 32x32 (bilinear, antialiased when shrinking; grayscale repeated to
RGB; values mapped to [-1, 1]), then

- **layout**: its 4x4 average-pooled pixels (3 x 16 = 48 values: where the brightness and colour
  are), and
- **texture**: a randomly initialised three-layer conv net (3x3 convolutions with 32, 64 and 52
  channels, ReLU, 2x2 average pooling between layers; He-scaled Gaussian weights drawn from
  NumPy's legacy ``RandomState(20250801)``, whose stream NumPy keeps fixed across versions), whose last
  feature map is average-pooled to 2x2 (52 x 4 = 208 values: which local patterns occur where).

Features are the 256 values concatenated (float64). Randomly initialised conv nets are a
recognised embedding for fidelity/diversity metrics on data unlike ImageNet (Naeem et al. 2020,
"Reliable Fidelity and Diversity Metrics for Generative Models", Sec. 5: random embeddings): they
respond to local structure (edges, strokes, blur, noise) that pixel distances miss, and weigh all
of it without an ImageNet prior.

What it is not. Not Inception: its Frechet distance (reported as ``fd``, never ``fid``) and KID,
precision/recall, density/coverage values are comparable only with values from the same extractor
(``small-images-v1``) on images of the same size and kind, never with FID numbers in papers. There
are no logits (no Inception Score). It was not trained on anything, so it knows no semantics
(a "3" and an "8" of similar stroke statistics are close). For 32x32 and larger natural images use
Inception (the ``"auto"`` choice there) or a domain extractor of your own.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NAME = "small-images-v1"
#: Images are resized to SIZE x SIZE before anything else.
SIZE = 32
#: NumPy legacy RandomState seed of the conv weights (its stream is fixed across NumPy versions).
SEED = 20250801
CHANNELS = (32, 64, 52)
LAYOUT_GRID = 4
TEXTURE_GRID = 2
#: Feature dimension: 3 * 4 * 4 + 52 * 2 * 2 = 256.
DIM = 3 * LAYOUT_GRID ** 2 + CHANNELS[-1] * TEXTURE_GRID ** 2


def _he_normal(rng: np.random.RandomState, cout: int, cin: int) -> torch.Tensor:
    """3x3 conv weights ``N(0, 2 / fan_in)`` (He et al. 2015), fan_in = cin * 9, float32."""
    w = rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))
    return torch.from_numpy(w.astype(np.float32))


class SmallImageFeatures(nn.Module):
    """Images ``[n, C, H, W]`` (C in 1, 3; uint8 or float in ``image_range``) -> features ``[n, 256]``."""

    def __init__(self) -> None:
        super().__init__()
        rng = np.random.RandomState(SEED)
        cin = 3
        for i, cout in enumerate(CHANNELS):
            self.register_buffer(f"w{i}", _he_normal(rng, cout, cin))
            cin = cout

    def to_unit(self, images: torch.Tensor, image_range: str = "-1,1") -> torch.Tensor:
        """Float32 RGB images in [-1, 1], resized to SIZE x SIZE."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"{NAME} takes images [n, C, H, W] with C in (1, 3), got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            x = images.float() / 127.5 - 1.0
        elif images.is_floating_point():
            x = images.float() if image_range == "-1,1" else images.float() * 2.0 - 1.0
        else:
            raise ValueError(f"{NAME} takes uint8 or float images, got {images.dtype}")
        x = x.clamp(-1.0, 1.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (SIZE, SIZE):
            shrink = min(x.shape[-2:]) > SIZE
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=shrink)
        return x

    @torch.no_grad()
    def forward(self, images: torch.Tensor, image_range: str = "-1,1") -> torch.Tensor:
        x = self.to_unit(images.to(self.w0.device), image_range)
        layout = F.adaptive_avg_pool2d(x, LAYOUT_GRID).flatten(1)
        h = x
        for i in range(len(CHANNELS)):
            h = F.relu(F.conv2d(h, getattr(self, f"w{i}"), padding=1))
            if i < len(CHANNELS) - 1:
                h = F.avg_pool2d(h, 2)
        texture = F.adaptive_avg_pool2d(h, TEXTURE_GRID).flatten(1)
        return torch.cat([layout, texture], dim=1).double()
