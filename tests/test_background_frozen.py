"""Background scoring with a frozen base (a LoRA-style fine-tune): the frozen parameters are read in
place, never copied per stage nor written by the worker, and the numbers equal an inline run's.
Real training of a small denoiser whose first layers are frozen, real files."""

from __future__ import annotations

import json

import pytest
import torch
from scope_helpers import mixture, sampler, train_step, val_loss
from torch import nn

from emascope import attach
from emascope.background import eval_copy, freeze_stage, frozen_nbytes
from emascope.snapshot import load_snapshot


class Tuned(nn.Module):
    """A denoiser with a wide frozen trunk and a small trainable head (the bank holds only the head)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(3, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU())
        self.head = nn.Linear(64, 2)
        self.trunk.requires_grad_(False)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1).expand(len(x), 1)
        return x + self.head(self.trunk(torch.cat([x, s], dim=1)))


def _setup():
    torch.manual_seed(0)
    model = Tuned()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt, torch.Generator().manual_seed(1)


def _values(run) -> dict:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], r["variant"], r["metric"]): r["value"] for r in recs}


def _train(run, scoring: str, *, score_copy: str = "auto", unfreeze_at: int | None = None, steps: int = 12):
    model, opt, g = _setup()
    data = mixture(256, 0)
    versions = {n: p._version for n, p in model.trunk.named_parameters()}
    extra = {"score_busy": "wait", "score_copy": score_copy} if scoring == "background" else {}
    with attach(model, opt, run_dir=run, score_every=4, decays=(0.5, 0.9), scoring=scoring, sampler=sampler,
                reference=data, num_samples=200, evaluate=lambda m: {"val": val_loss(m, data)}, **extra) as scope:
        for step in range(steps):
            if step == unfreeze_at:
                model.trunk[2].requires_grad_(True)
                opt.add_param_group({"params": list(model.trunk[2].parameters())})
            train_step(model, opt, data, g)
    return model, versions, scope


@pytest.mark.parametrize("copy", ["device", "disk"])
def test_background_with_a_frozen_base_equals_inline_and_never_writes_the_base(tmp_path, copy):
    inline_model, _, _ = _train(tmp_path / "inline", "inline")
    model, versions, _ = _train(tmp_path / "bg", "background", score_copy=copy)
    assert _values(tmp_path / "bg") == _values(tmp_path / "inline")
    assert {k[0] for k in _values(tmp_path / "bg")} == {4, 8, 12}
    for (name, p), q in zip(model.named_parameters(), inline_model.parameters(), strict=True):
        assert torch.equal(p, q), name  # training itself is unchanged by the mode
    # the worker never wrote into the frozen trunk it shares (no copy_ onto it, not even of equal values)
    assert {n: p._version for n, p in model.trunk.named_parameters()} == versions


def test_a_stage_holds_the_frozen_base_in_place_and_the_eval_copy_shares_it(tmp_path):
    model, opt, g = _setup()
    with attach(model, opt, run_dir=tmp_path / "run", score_every=None, decays=(0.9,)) as scope:
        train_step(model, opt, mixture(64, 0), g)
        bank = scope.bank
        assert sorted(bank.still_frozen()) == sorted(f"trunk.{k}" for k, _ in model.trunk.named_parameters())
        head = sum(p.numel() for p in model.head.parameters())
        assert frozen_nbytes(bank) == 4 * head * 1 + 4 * head  # one decay row + the live head, no trunk
        stage = freeze_stage(bank, model, 1, placement="device", run_dir=tmp_path / "run")
        for name, p in model.trunk.named_parameters():
            assert stage.live[f"trunk.{name}"].data_ptr() == p.data_ptr()  # not copied
        assert stage.live["head.weight"].data_ptr() != model.head.weight.data_ptr()  # copied
        trunk = 4 * sum(p.numel() for p in model.trunk.parameters())
        assert stage.nbytes < 4 * head * 2 + 64 < trunk  # one row + the live head (+ counters), no trunk
        twin = eval_copy(model)
        assert twin.trunk[0].weight is model.trunk[0].weight
        assert twin.head.weight is not model.head.weight and not twin.head.weight.requires_grad
        assert model.head.weight.requires_grad  # eval_copy did not touch the training model


def test_a_layer_unfrozen_during_a_sweep_drops_that_stage_and_is_copied_from_then_on(tmp_path):
    """Gradual unfreezing: the stage whose sweep saw the trunk layer change is not recorded (an event
    says why); the stages after it copy that layer and equal the inline run's."""
    _train(tmp_path / "inline", "inline", unfreeze_at=6)
    _train(tmp_path / "bg", "background", unfreeze_at=6)
    inline, bg = _values(tmp_path / "inline"), _values(tmp_path / "bg")
    events = [json.loads(line) for line in (tmp_path / "bg" / "events.jsonl").read_text().splitlines()]
    dropped = {e["step"] for e in events if e["type"] == "score_skipped" and e["reason"] == "frozen_changed"}
    assert dropped <= {4}  # only the stage frozen before the unfreeze can have been running then
    for e in events:
        if e["type"] == "score_skipped" and e["reason"] == "frozen_changed":
            assert e["entries"] == ["trunk.2.weight", "trunk.2.bias"]
    assert {k for k in bg if k[0] not in dropped} == {k for k in inline if k[0] not in dropped}
    assert {k: v for k, v in bg.items() if k[0] not in dropped} == \
        {k: v for k, v in inline.items() if k[0] not in dropped}
    assert {k[0] for k in bg} == {4, 8, 12} - dropped


def test_batched_sampling_stacks_only_the_averaged_weights(tmp_path):
    """A frozen base is passed once, unstacked (the live tensors themselves, no copy per variant), and
    the batched samples equal one-variant-at-a-time samples."""
    from emascope.batched import sample_stacked, stack_weights

    model, opt, g = _setup()
    data = mixture(128, 0)
    with attach(model, opt, run_dir=tmp_path / "run", score_every=None, decays=(0.5, 0.9)) as scope:
        for _ in range(5):
            train_step(model, opt, data, g)
        bank, variants = scope.bank, list(scope.bank.variants)
        weights, shared = stack_weights(model, [lambda v=v: bank.variant_state(v) for v in variants],
                                        bank.fixed_keys())
        assert set(weights) == {"head.weight", "head.bias"}
        assert set(shared) == {f"trunk.{k}" for k, _ in model.trunk.named_parameters()}
        assert all(shared[k].data_ptr() == p.data_ptr() for k, p in
                   ((f"trunk.{k}", p) for k, p in model.trunk.named_parameters()))
        model.eval()
        with torch.no_grad():
            batched = sample_stacked(model, weights, sampler, 32, torch.Generator().manual_seed(3), shared)
            single = []
            for v in variants:
                with bank.swap(model, v):
                    single.append(sampler(model, 32, torch.Generator().manual_seed(3)))
        model.train()
    assert torch.equal(batched, torch.stack(single))


def test_a_disk_stage_takes_the_frozen_base_from_the_model_not_the_side_file(tmp_path):
    """score_copy="disk": the stage snapshot references the run's frozen side file; opening the stage
    uses the training model's frozen tensors instead of reading the base back (the side file's
    header is still checked)."""
    model, opt, g = _setup()
    with attach(model, opt, run_dir=tmp_path / "run", score_every=None, decays=(0.9,)) as scope:
        train_step(model, opt, mixture(64, 0), g)
        stage = freeze_stage(scope.bank, model, 1, placement="disk", run_dir=tmp_path / "run",
                             frozen_files=scope._frozen())
        (side,) = (tmp_path / "run" / "banks").glob("frozen-*.safetensors")
        raw = side.read_bytes()
        head = 8 + int.from_bytes(raw[:8], "little")
        side.write_bytes(raw[:head] + bytes(len(raw) - head))  # zeroed data: reading it fails the checksum
        with pytest.raises(ValueError, match="corrupt"):
            load_snapshot(stage.path)
        bank = stage.open_bank()
        assert bank.live_values()["trunk.0.weight"].data_ptr() == model.trunk[0].weight.data_ptr()
        twin = Tuned()
        with bank.swap(twin, "0.9"):
            assert torch.equal(twin.trunk[2].weight, model.trunk[2].weight)
            assert not torch.equal(twin.head.weight, model.head.weight)  # the EMA, not the live head
