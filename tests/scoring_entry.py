"""What the scoring-mode tests train and score, shared with their external scorers.

The test process imports this module to train (inline, background, external); an external scorer
process loads it with ``emascope score RUN --entry tests/scoring_entry.py:build``, so both sides
build the same model, sampler and reference. Real models (the tree2d sample's preconditioned MLP,
the digits sample's conv net), real flow-matching training, small enough for a CPU test.

Environment of ``build()``: ``EMASCOPE_TEST_KIND`` (``tree2d`` | ``conv``), and
``EMASCOPE_TEST_SLOW_FILE``: a sampler that creates that file at its first call and then sleeps
``EMASCOPE_TEST_SLOW_SECONDS`` (default 3600) per call (a scorer to kill mid-sweep).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from emascope.samples import digits, tree2d
from emascope.samples.flow import flow_matching_loss
from emascope.samples.tree_mixture import make_tree

DECAYS = (0.9, 0.99, 0.999)
SETTINGS = {"num_samples": 192, "batch_size": 64, "kid_subsets": 20, "seed": 5, "decays": DECAYS}


def tree2d_model() -> nn.Module:
    torch.manual_seed(0)
    return tree2d.build_model(tree2d.Tree2DConfig(hidden=32, layers=2))


def conv_model() -> nn.Module:
    torch.manual_seed(0)
    return digits.build_model(digits.DigitsConfig(channels=8, blocks=2))


def flat_features(x: torch.Tensor) -> torch.Tensor:
    """8x8 images -> 16-d features (2x2 average pooling): the conv net's feature extractor."""
    return nn.functional.avg_pool2d(x.float(), 2).flatten(1)


def parts(kind: str) -> dict:
    """model, sampler, reference, extra attach settings and the training data of ``kind``."""
    if kind == "tree2d":
        tree = make_tree()
        return {"model": tree2d_model(), "sampler": tree2d.make_sampler(4),
                "reference": tree.sample(300, torch.Generator().manual_seed(2)), "extra": {},
                "data": lambda g: tree.sample(64, g)}
    if kind == "conv":
        images, _ = digits.load_digit_images()
        return {"model": conv_model(), "sampler": digits.make_sampler(2), "reference": images[:300],
                "extra": {"feature_extractor": flat_features, "image_range": "-1,1"},
                "data": lambda g: images[torch.randint(len(images), (32,), generator=g)]}
    raise ValueError(f"unknown kind {kind!r}")


def slow(sampler, flag: Path, seconds: float):
    """``sampler`` that touches ``flag`` when first called, then sleeps ``seconds`` per call."""
    def wrapped(model, n, generator):
        flag.touch()
        time.sleep(seconds)
        return sampler(model, n, generator)
    return wrapped


def build() -> dict:
    """The external scorer's entry point (``--entry tests/scoring_entry.py:build``)."""
    torch.set_num_threads(1)
    kind = os.environ.get("EMASCOPE_TEST_KIND", "tree2d")
    p = parts(kind)
    sampler = p["sampler"]
    flag = os.environ.get("EMASCOPE_TEST_SLOW_FILE")
    if flag:
        sampler = slow(sampler, Path(flag), float(os.environ.get("EMASCOPE_TEST_SLOW_SECONDS", "3600")))
    out = {"model": p["model"], "sampler": sampler, "reference": p["reference"]}
    if "feature_extractor" in p["extra"]:
        out["feature_extractor"] = p["extra"]["feature_extractor"]
    return out


def train(run_dir: Path, kind: str, *, steps: int = 30, score_every: int = 10, wait: bool = True,
          sampler=None, **kwargs) -> tuple[object, torch.Tensor]:
    """Train ``kind`` for ``steps`` Adam steps with the agent attached; returns ``(scope, draw)``
    where ``draw`` is the training job's next global random numbers after close (its random stream).

    ``wait``: after each scoring point, wait for background sweeps (so no stage is superseded).
    """
    torch.set_num_threads(1)
    p = parts(kind)
    model = p["model"]
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(3)
    settings = {**SETTINGS, **p["extra"], **kwargs}
    hooks = {} if settings.get("scoring") == "external" else {"sampler": sampler or p["sampler"],
                                                              "reference": p["reference"]}
    from emascope import attach

    scope = attach(model, opt, run_dir=run_dir, score_every=score_every, **hooks, **settings)
    for step in range(1, steps + 1):
        model.train()
        loss = flow_matching_loss(model, p["data"](g), g)
        torch.nn.functional.dropout(torch.ones(4), 0.5)  # draws from the global generator, as training does
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if wait and step % score_every == 0:
            scope.wait()
    scope.close()
    return scope, torch.rand(4)
