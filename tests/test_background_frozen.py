"""Background scoring with a frozen base (a LoRA-style fine-tune): the frozen parameters are read in
place, never copied per stage nor written by the worker, and the numbers equal an inline run's.
Real training of a small denoiser whose first layers are frozen, real files."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from scope_helpers import mixture, sampler, train_step, val_loss
from torch import nn

from emascope import attach
from emascope.background import eval_copy, freeze_stage, frozen_nbytes, shared_keys
from emascope.bank import shared_with_training
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


def _train(run, scoring: str, *, score_copy: str = "auto", share: bool = True, unfreeze_at: int | None = None,
           steps: int = 12):
    model, opt, g = _setup()
    data = mixture(256, 0)
    versions = {n: p._version for n, p in model.trunk.named_parameters()}
    extra = {"score_busy": "wait", "score_copy": score_copy, "score_share_frozen": share} \
        if scoring == "background" else {}
    with attach(model, opt, run_dir=run, score_every=4, decays=(0.5, 0.9), scoring=scoring, sampler=sampler,
                reference=data, num_samples=200, evaluate=lambda m: {"val": val_loss(m, data)}, **extra) as scope:
        for step in range(steps):
            if step == unfreeze_at:
                model.trunk[2].requires_grad_(True)
                opt.add_param_group({"params": list(model.trunk[2].parameters())})
            train_step(model, opt, data, g)
    return model, versions, scope


def _events(run, type_: str) -> list[dict]:
    return [e for e in map(json.loads, (run / "events.jsonl").read_text().splitlines()) if e["type"] == type_]


@pytest.mark.parametrize(("copy", "share"), [("device", True), ("disk", True), ("device", False)])
def test_background_with_a_frozen_base_equals_inline_and_never_writes_the_base(tmp_path, copy, share):
    inline_model, _, _ = _train(tmp_path / "inline", "inline")
    model, versions, _ = _train(tmp_path / "bg", "background", score_copy=copy, share=share)
    assert _values(tmp_path / "bg") == _values(tmp_path / "inline")
    assert {k[0] for k in _values(tmp_path / "bg")} == {4, 8, 12}
    for (name, p), q in zip(model.named_parameters(), inline_model.parameters(), strict=True):
        assert torch.equal(p, q), name  # training itself is unchanged by the mode
    # the worker never wrote into the frozen trunk (no copy_ onto it, not even of equal values)
    assert {n: p._version for n, p in model.trunk.named_parameters()} == versions
    assert not _events(tmp_path / "bg", "score_failed") and not _events(tmp_path / "bg", "error")


def test_a_stage_holds_the_frozen_base_in_place_and_the_eval_copy_shares_it(tmp_path):
    model, opt, g = _setup()
    with attach(model, opt, run_dir=tmp_path / "run", score_every=None, decays=(0.9,)) as scope:
        train_step(model, opt, mixture(64, 0), g)
        bank = scope.bank
        trunk_names = sorted(f"trunk.{k}" for k, _ in model.trunk.named_parameters())
        assert sorted(bank.still_frozen()) == trunk_names
        head = sum(p.numel() for p in model.head.parameters())
        trunk = 4 * sum(p.numel() for p in model.trunk.parameters())
        assert frozen_nbytes(bank, share_frozen=True) == 4 * head * 1 + 4 * head  # one row + live head, no trunk
        assert frozen_nbytes(bank) == 4 * head * 2 + trunk  # the default copies the trunk too
        stage = freeze_stage(bank, model, 1, placement="device", run_dir=tmp_path / "run", share_frozen=True)
        for name, p in model.trunk.named_parameters():
            assert stage.live[f"trunk.{name}"].data_ptr() == p.data_ptr()  # not copied
        assert stage.live["head.weight"].data_ptr() != model.head.weight.data_ptr()  # copied
        assert stage.nbytes < 4 * head * 2 + 64 < trunk  # one row + the live head (+ counters), no trunk
        copied = freeze_stage(bank, model, 1, placement="device", run_dir=tmp_path / "run")
        assert copied.live["trunk.0.weight"].data_ptr() != model.trunk[0].weight.data_ptr()
        assert sorted(shared_keys(bank, model)) == trunk_names
        twin = eval_copy(model, shared_keys(bank, model))
        assert twin.trunk[0].weight is model.trunk[0].weight
        assert twin.head.weight is not model.head.weight and not twin.head.weight.requires_grad
        assert model.head.weight.requires_grad  # eval_copy did not touch the training model
        assert shared_with_training(twin) == frozenset(trunk_names) and not shared_with_training(model)
        assert eval_copy(model).trunk[0].weight is not model.trunk[0].weight  # sharing is asked for


def test_a_frozen_weight_changed_during_a_sweep_drops_the_stage(tmp_path):
    """Deterministic: the sampler waits until the training thread has changed a shared frozen weight
    in place (after the scoring point), so the sweep saw a weight that is not the stage's."""
    model, opt, g = _setup()
    data, go = mixture(128, 0), threading.Event()

    def gated(m, n, gen):
        assert go.wait(30)
        return sampler(m, n, gen)

    with attach(model, opt, run_dir=tmp_path / "run", score_every=2, decays=(0.9,), sampler=gated, reference=data,
                num_samples=64, score_share_frozen=True, score_at_close=False) as scope:
        for _ in range(2):
            train_step(model, opt, data, g)
        with torch.no_grad():
            model.trunk[0].weight.mul_(1.0)  # same values, but an in-place write the stage cannot rule out
        go.set()
        scope.wait()
    (event,) = _events(tmp_path / "run", "score_skipped")
    assert event["reason"] == "frozen_changed" and event["step"] == 2 and event["entries"] == ["trunk.0.weight"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not _values(tmp_path / "run")


def test_a_parameter_frozen_after_attach_is_never_written_by_the_worker(tmp_path):
    """The head is averaged (trainable at attach) and frozen later: the eval copy does not share it,
    so the worker's swap of the EMA goes into the copy, never into the training model."""
    model, opt, g = _setup()
    data = mixture(128, 0)
    with attach(model, opt, run_dir=tmp_path / "run", score_every=None, decays=(0.9,), score_share_frozen=True,
                evaluate=lambda m: {"val": val_loss(m, data)}, score_at_close=False) as scope:
        for _ in range(3):
            train_step(model, opt, data, g)
        model.head.requires_grad_(False)
        before = (model.head.weight._version, model.head.weight.clone())
        scope.score_now(wait=True)
        assert model.head.weight._version == before[0]
        assert torch.equal(model.head.weight, before[1])
    assert set(_values(tmp_path / "run")) == {(3, v, "val") for v in ("raw", "0.9")}


def test_a_layer_unfrozen_on_a_disk_stage_still_scores(tmp_path):
    """score_copy="disk" after a trunk layer is unfrozen: its side-file entry is no longer shared,
    the stage reads it from the side file and the rest from the model."""
    inline, _, _ = _train(tmp_path / "inline", "inline", unfreeze_at=5)
    _train(tmp_path / "bg", "background", score_copy="disk", unfreeze_at=5)
    got = _values(tmp_path / "bg")
    assert not _events(tmp_path / "bg", "score_failed")
    dropped = {e["step"] for e in _events(tmp_path / "bg", "score_skipped")}
    assert {8, 12} <= {k[0] for k in got} and dropped <= {4}
    assert got == {k: v for k, v in _values(tmp_path / "inline").items() if k[0] not in dropped}


def test_swap_restores_buffers_the_body_changed():
    """A forward in train mode inside a swap (an evaluate hook) updates BatchNorm's running stats;
    the swap restores them, as it restores every weight it wrote."""
    from emascope.bank import EMABank

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    bank = EMABank(model, decays=(0.9,))
    with torch.no_grad():
        model[0].weight.add_(1.0)
    bank.update()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with bank.swap(model, "0.9"):
        model.train()(torch.randn(8, 3))
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


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
                                        bank.frozen_keys())
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
                             frozen_files=scope._frozen(), share_frozen=True)
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


def test_a_frozen_parameter_replaced_by_a_trainable_one_is_scored_like_inline(tmp_path):
    """A frozen trunk weight replaced by a new trainable Parameter object: the eval copy must stop
    sharing it (it is rebuilt), so the background numbers stay those of an inline run."""
    def run(path, scoring):
        model, opt, g = _setup()
        data = mixture(256, 0)
        extra = {"score_busy": "wait", "score_share_frozen": True} if scoring == "background" else {}
        with attach(model, opt, run_dir=path, score_every=4, decays=(0.5,), scoring=scoring,
                    evaluate=lambda m: {"val": val_loss(m, data)}, **extra):
            for step in range(12):
                if step == 5:
                    model.trunk[2].weight = nn.Parameter(model.trunk[2].weight.detach() * 1.5)
                    opt.add_param_group({"params": [model.trunk[2].weight]})
                train_step(model, opt, data, g)
        return _values(path)

    inline, bg = run(tmp_path / "inline", "inline"), run(tmp_path / "bg", "background")
    dropped = {e["step"] for e in _events(tmp_path / "bg", "score_skipped")}
    assert dropped <= {4} and {8, 12} <= {k[0] for k in bg}
    assert bg == {k: v for k, v in inline.items() if k[0] not in dropped}


def test_batched_sampling_never_writes_the_models_buffers(tmp_path):
    """A forward that updates a buffer: batched sampling stacks buffers (only frozen parameters are
    passed unstacked), so the model's own buffer is not written."""
    from emascope.batched import sample_stacked, stack_weights

    class Counting(Tuned):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x, sigma):
            self.calls.add_(1)
            return super().forward(x, sigma)

    torch.manual_seed(0)
    model = Counting()
    opt = torch.optim.Adam(model.head.parameters(), lr=1e-2)
    with attach(model, opt, run_dir=tmp_path / "run", score_every=None, decays=(0.9,)) as scope:
        train_step(model, opt, mixture(64, 0), torch.Generator().manual_seed(1))
        bank, before = scope.bank, model.calls.clone()
        weights, shared = stack_weights(model, [lambda v=v: bank.variant_state(v) for v in bank.variants],
                                        bank.frozen_keys())
        assert "calls" in weights and "calls" not in shared
        with torch.no_grad():
            sample_stacked(model.eval(), weights, sampler, 8, torch.Generator().manual_seed(0), shared)
        model.train()
        assert torch.equal(model.calls, before)


def test_a_frozen_weight_changed_during_the_search_after_a_sweep_is_an_error_event(tmp_path):
    """search_evals: the search between grid decays runs on the worker's eval copy after the sweep;
    a shared frozen weight changed while it runs (gated: the first probe waits for the change) is
    said as an error event (its records are written by then)."""
    model, opt, g = _setup()
    data, reached, go, calls = mixture(128, 0), threading.Event(), threading.Event(), {"n": 0}

    def evaluate(m):
        calls["n"] += 1
        if calls["n"] == 5:  # raw + 3 decays in the sweep, then the search's first probe
            reached.set()
            assert go.wait(30)
        return {"val": val_loss(m, data)}

    scope = attach(model, opt, run_dir=tmp_path / "run", score_every=20, decays=(0.9, 0.99, 0.999),
                   evaluate=evaluate, metric_directions={"val": "lower"}, search_evals=2, score_busy="wait",
                   score_share_frozen=True, score_at_close=False)
    try:
        for _ in range(20):
            train_step(model, opt, data, g)
        assert reached.wait(60)
        with torch.no_grad():
            model.trunk[0].bias.mul_(1.0)
        go.set()
    finally:
        go.set()
        scope.close()
    errors = [e for e in _events(tmp_path / "run", "error") if e["where"] == "search"]
    assert len(errors) == 1 and "trunk.0.bias" in errors[0]["message"] and "changed in place" in errors[0]["message"]
    assert not _events(tmp_path / "run", "score_skipped")  # the sweep itself was done before the change
