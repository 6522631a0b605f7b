"""What a user does that the agent must survive and say plainly: a second attach to a run that is
still open, a layer unfrozen after attach, hooks that return something that is not a number,
samples that do not match the reference. Real training on the tiny 2-D denoiser, real files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scope_helpers import Denoiser, mixture, sampler, train_step, val_loss
from torch import nn

from emascope import attach


def _events(run) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = Denoiser(16)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2), torch.Generator().manual_seed(1)


def test_a_second_attach_to_a_run_still_open_is_refused_before_anything_is_written(tmp_path):
    """Re-running a notebook cell: attach(overwrite=True) to the run directory of a Scope that was
    never closed. Both would write the same files (the old one's snapshot replaced the new run's,
    its heartbeat said "running" after the new run closed); now the second attach is refused."""
    data, run = mixture(200, 0), tmp_path / "run"
    first_model, first_opt, g = _setup()
    first = attach(first_model, first_opt, run_dir=run, score_every=None, decays=(0.9,))
    train_step(first_model, first_opt, data, g)
    files = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    events = (run / "events.jsonl").read_bytes()
    model, opt, g2 = _setup(1)
    for kw in ({"overwrite": True}, {"resume": True}):
        with pytest.raises(ValueError, match="still open.*close"):
            attach(model, opt, run_dir=run, score_every=None, decays=(0.9,), **kw)
        # the same folder through another spelling of its path is the same run
        with pytest.raises(ValueError, match="still open"):
            attach(model, opt, run_dir=tmp_path / "." / "run", score_every=None, decays=(0.9,), **kw)
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == files
    assert (run / "events.jsonl").read_bytes() == events
    assert not opt._optimizer_step_post_hooks  # the refused attach left no hook behind
    first.close()
    # closed: the folder is free again
    with attach(model, opt, run_dir=run, overwrite=True, score_every=None, decays=(0.9,)) as scope:
        for _ in range(3):
            train_step(model, opt, data, g2)
    assert scope.current_step == 3
    heartbeat = json.loads((run / "heartbeat").read_text())
    assert heartbeat["state"] == "closed" and heartbeat["step"] == 3
    assert [e["type"] for e in _events(run)][0] == "start"
    # a refused attach does not hold the folder: the next one is not refused for being open
    with pytest.raises(ValueError, match="already holds a run"):
        attach(model, opt, run_dir=run, score_every=None, decays=(0.9,))
    attach(model, opt, run_dir=run, resume=True, score_every=None, decays=(0.9,)).close()


def test_a_parameter_unfrozen_after_attach_is_named_in_a_notice(tmp_path):
    """The bank averages what was trainable at attach. A layer unfrozen later (progressive
    unfreezing) is not averaged: its EMA variants hold its live values. That must not be silent."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = tmp_path / "run"
    with attach(model, opt, run_dir=run, score_every=None, decays=(0.999,), request_interval=0.0) as scope:
        for step in range(6):
            if step == 2:
                model[0].requires_grad_(True)
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        ema = scope.bank.materialize(0.999)
    assert torch.equal(ema["0.weight"], model[0].weight.detach())  # as documented: not averaged
    notices = [e for e in _events(run) if e["type"] == "notice" and e.get("where") == "bank"]
    assert len(notices) == 1, notices  # said once, not at every check
    assert notices[0]["step"] == 3 and notices[0]["entries"] == ["0.weight", "0.bias"]
    assert "does not average" in notices[0]["message"] and "0.weight" in notices[0]["message"]


def _bad_evaluate(model):
    return {"ok": torch.tensor(0.5), "np": np.float32(0.25), "missing": None, "nan": float("nan"),
            "pair": (1.0, 0.1), "text": "n/a", "vector": torch.ones(3), "nested": {"a": 1.0}}


def test_evaluate_values_that_are_not_numbers_are_errors_naming_them(tmp_path):
    model, opt, g = _setup()
    data, run = mixture(200, 0), tmp_path / "run"
    with attach(model, opt, run_dir=run, evaluate=_bad_evaluate, scoring="inline", score_every=3,
                decays=(0.9,), metric_directions={k: "lower" for k in _bad_evaluate(None)}) as scope:
        for _ in range(3):
            train_step(model, opt, data, g)
        res = scope.last_scores
    scores = res.scores["0.9"]
    assert scores["ok"] == 0.5 and scores["np"] == 0.25 and scores["pair"] == 1.0
    assert scores["missing"] is None and scores["nan"] is None  # documented: non-finite -> null
    assert scores["text"] is None and scores["vector"] is None and scores["nested"] is None
    errors = [e for e in _events(run) if e["type"] == "error" and e["where"] == "evaluate"]
    assert len(errors) == 2  # one per variant (raw, 0.9)
    message = errors[0]["message"]
    for name in ("text", "vector", "nested"):
        assert f"'{name}'" in message
    for name in ("ok", "np", "missing", "nan", "pair"):
        assert f"'{name}'" not in message
    assert res.errors == 2


def test_sample_metrics_per_sample_array_of_the_wrong_length_is_an_error(tmp_path):
    model, opt, g = _setup()
    data, run = mixture(200, 0), tmp_path / "run"

    def per_sample(samples):
        norms = samples.norm(dim=1)
        return {"norm": norms, "short": norms[:-1]}

    with attach(model, opt, run_dir=run, sampler=sampler, sample_metrics=per_sample, scoring="inline",
                score_every=3, decays=(0.9,), num_samples=64, batch_size=32,
                metric_directions={"norm": "lower", "short": "lower"}) as scope:
        for _ in range(3):
            train_step(model, opt, data, g)
        res = scope.last_scores
    assert res.scores["0.9"]["norm"] is not None and res.scores["0.9"]["short"] is None
    errors = [e for e in _events(run) if e["type"] == "error" and e["where"] == "sample_metrics"]
    assert errors and "'short'" in errors[0]["message"] and "'norm'" not in errors[0]["message"]
    assert "63" in errors[0]["message"] and "64" in errors[0]["message"]


def test_samples_of_another_dimension_than_the_reference_are_one_clear_error(tmp_path):
    model, opt, g = _setup()
    data, run = mixture(200, 0), tmp_path / "run"

    def wide(m, n, gen):  # [n, 4] points against a [m, 2] reference
        return torch.cat([sampler(m, n, gen)] * 2, dim=1)

    with attach(model, opt, run_dir=run, sampler=wide, reference=data, scoring="inline", score_every=3,
                decays=(0.9,), num_samples=64, batch_size=32, noise_floor=False) as scope:
        for _ in range(3):
            train_step(model, opt, data, g)
        res = scope.last_scores
    errors = [e for e in _events(run) if e["type"] == "error"]
    assert [e["where"] for e in errors] == ["features", "features"]  # one per variant, not one per metric
    assert "4" in errors[0]["message"] and "2" in errors[0]["message"] and "reference" in errors[0]["message"]
    assert res.errors == 2 and all(not s for s in res.scores.values())


def test_lazy_modules_not_yet_initialised_are_a_value_error_saying_what_to_do(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"uninitialized.*0\.weight.*forward"):
        attach(model, opt, run_dir=tmp_path / "run", decays=(0.9,))
    assert not (tmp_path / "run").exists() and not opt._optimizer_step_post_hooks
    model(torch.randn(2, 3))  # initialised: attach works
    with attach(model, opt, run_dir=tmp_path / "run", score_every=None, decays=(0.9,)) as scope:
        loss = model(torch.randn(4, 3)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert scope.bank.numel == 3 * 8 + 8 + 8 + 1


def test_export_after_model_half_has_the_model_dtype(tmp_path):
    """docs/bank.md: ``materialize`` gives the model's dtypes; the EMABank docstring allows
    ``model.half()`` after construction. The export then followed the attach-time dtype (fp32)."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with attach(model, opt, run_dir=tmp_path / "run", score_every=None, decays=(0.9,)) as scope:
        for _ in range(2):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        expected = {k: v.double() for k, v in scope.bank.materialize(0.9).items()}
        model.half()
        raw, ema = load_file(scope.export("raw")), load_file(scope.export(0.9))
        fp32 = load_file(scope.export(0.9, path=tmp_path / "fp32.safetensors", dtype="float32"))
    for key, t in model.state_dict().items():
        assert raw[key].dtype == ema[key].dtype == t.dtype, key
        assert torch.equal(raw[key], t), key
        if t.is_floating_point():
            assert fp32[key].dtype == torch.float32
            assert torch.equal(ema[key], expected[key].to(t.dtype)), key  # the fp32 bank, cast once


class _RunningScale(nn.Module):
    """A running statistic kept as a buffer and updated out of place, as custom modules often do:
    every training forward replaces the buffer by a new tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.scale = 0.5 * self.scale + 0.5 * x.abs().mean().detach()
        return self.lin(x) / self.scale


@pytest.mark.parametrize("average_buffers", [False, True])
def test_a_buffer_replaced_by_the_model_is_followed(tmp_path, average_buffers):
    """The bank kept the buffer object of attach time: scoring loaded that stale value into the model
    (for every variant, ``raw`` too) and exports held it, while the model's own buffer moved on."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = _RunningScale()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen: dict[str, float] = {}
    g = torch.Generator().manual_seed(3)
    scales = [float(model.scale)]

    def evaluate(m):
        return {"scale": float(m.scale)}

    with attach(model, opt, run_dir=tmp_path / "run", evaluate=evaluate, metric_directions={"scale": "lower"},
                decays=(0.9,), score_every=5, scoring="inline", average_buffers=average_buffers) as scope:
        for _ in range(5):
            loss = model(3 * torch.randn(8, 2, generator=g)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            scales.append(float(model.scale))
        seen = {v: s["scale"] for v, s in scope.last_scores.scores.items()}
        exported = load_file(scope.export(0.9))["scale"]
    live = float(model.scale)
    assert live != 1.0 and seen["raw"] == live
    ema = scales[0]  # float64 reference EMA of the buffer's values after each step
    for s in scales[1:]:
        ema = 0.9 * ema + 0.1 * s
    expected = ema if average_buffers else live
    assert seen["0.9"] == pytest.approx(expected, rel=1e-6)
    assert float(exported) == pytest.approx(expected, rel=1e-6)


def test_an_averaged_parameter_replaced_after_attach_is_a_clear_scoring_error(tmp_path):
    """load_state_dict(assign=True) after attach puts new Parameter objects in the model: the bank
    still averages the old ones, so reading the model's weights through the bank is refused with a
    message (an error event; training goes on) instead of mixing the two."""
    data, run = mixture(200, 0), tmp_path / "run"
    model, opt, g = _setup()
    with attach(model, opt, run_dir=run, score_every=None, decays=(0.9,), scoring="inline",
                evaluate=lambda m: {"val": val_loss(m, data)}) as scope:
        train_step(model, opt, data, g)
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
        scope.score_now()
        train_step(model, opt, data, g)  # training goes on
    errors = [e for e in _events(run) if e["type"] == "error"]
    assert errors and any("replaced by a new Parameter" in e["message"] for e in errors)
