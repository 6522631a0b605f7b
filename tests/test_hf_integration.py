"""emascope with the real Hugging Face stack, tiny models on the CPU, no network (configs built here,
never from_pretrained of a hub name):

- transformers' Trainer with :class:`emascope.hf.ScopeCallback`, gradient accumulation 1 and 2: the
  bank counts exactly ``state.global_step`` optimizer steps, and a ``--format transformers`` export
  loads with ``AutoModelForCausalLM.from_pretrained`` and reproduces the validation loss the agent
  scored for that decay;
- a Trainer checkpoint carries the agent's state: resuming from it gives the bank of a run that
  never stopped, bit for bit;
- BEMA parity with TRL: TRL's real ``BEMACallback`` and emascope (``BEMAConfig.from_trl`` with the
  same arguments) on one trajectory agree at TRL's update steps to float32 rounding.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from emascope import BEMAConfig  # noqa: E402
from emascope.export_cli import main as export_main  # noqa: E402
from emascope.hf import CHECKPOINT_FILE, ScopeCallback  # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

VOCAB, LENGTH = 32, 12


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 1-layer GPT-2 (tied input/output embeddings), no dropout: runs are deterministic."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def _data() -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    train = []
    for _ in range(48):
        ids = torch.randint(0, VOCAB, (LENGTH,), generator=g)
        train.append({"input_ids": ids, "labels": ids})
    return train, torch.randint(0, VOCAB, (8, LENGTH), generator=g)


TRAIN, VAL = _data()


def val_loss(model: torch.nn.Module) -> dict[str, float]:
    return {"val_loss": float(model(input_ids=VAL, labels=VAL).loss)}


def _args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2, use_cpu=True,
                report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _events(run_dir, type_=None):
    ev = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    return [e for e in ev if type_ is None or e["type"] == type_]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_callback_follows_global_step_and_exports_for_from_pretrained(tmp_path, accumulation):
    run_dir = tmp_path / "run"
    cb = ScopeCallback(run_dir=run_dir, evaluate=val_loss, metric_directions={"val_loss": "lower"},
                       score_every=3, decays=(0.9, 0.99), score_busy="wait")  # background: every stage scored
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path / "out", gradient_accumulation_steps=accumulation),
                      train_dataset=TRAIN, callbacks=[cb])
    trainer.train()
    scope = cb.scope
    assert trainer.state.global_step == 6 and scope.current_step == 6 and scope.bank.step == 6
    assert scope.closed and json.loads((run_dir / "heartbeat").read_text())["state"] == "closed"
    assert not _events(run_dir, "notice") and not _events(run_dir, "error")
    assert _events(run_dir, "start")[0]["optimizer"] == "AcceleratedOptimizer -> AdamW"
    assert [e["step"] for e in _events(run_dir, "score_done")] == [3, 6]
    record = json.loads((run_dir / "model_config.json").read_text())
    assert (record["library"], record["class"], record["prefix"]) == ("transformers", "GPT2LMHeadModel", "")
    scored = scope.last_scores.scores["0.9"]["val_loss"]

    out = tmp_path / "ema-0.9"
    assert export_main([str(run_dir), "--variant", "0.9", "--format", "transformers", "--out", str(out)]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # still tied
    with torch.no_grad():
        assert val_loss(loaded)["val_loss"] == pytest.approx(scored, abs=1e-6)
    # the wrong library is refused with a message, nothing written
    assert export_main([str(run_dir), "--variant", "0.9", "--format", "diffusers", "--out",
                        str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_trainer_checkpoint_resume_is_exact(tmp_path):
    def run(run_dir, resume_from=None, **kw):
        cb = ScopeCallback(run_dir=run_dir, score_every=None, decays=(0.9, 0.999), bema=True)
        trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path / "out", save_strategy="steps", save_steps=3, **kw),
                          train_dataset=TRAIN, callbacks=[cb])
        trainer.train(resume_from_checkpoint=resume_from)
        return cb.scope

    straight = run(tmp_path / "run")
    final = straight.bank.state_dict()
    assert (tmp_path / "out" / "checkpoint-3" / CHECKPOINT_FILE).is_file()
    resumed = run(tmp_path / "run", resume_from=str(tmp_path / "out" / "checkpoint-3"))
    assert resumed.current_step == 6 and resumed.bank.step == 6
    again = resumed.bank.state_dict()
    assert torch.equal(again["bank"], final["bank"]) and torch.equal(again["theta0"], final["theta0"])
    resume = [e for e in _events(tmp_path / "run", "resume") if e.get("source") == "state_dict"]
    assert [e["step"] for e in resume] == [3]  # the checkpoint's state, not the snapshot of step 6


def test_bema_agrees_with_trl_bemacallback_at_its_update_steps(tmp_path):
    from trl import BEMACallback

    trl_args = dict(update_freq=3, update_after=2, ema_power=0.5, bias_power=0.2, lag=10, multiplier=1.0)
    trl_cb = BEMACallback(**trl_args)
    cb = ScopeCallback(run_dir=tmp_path / "run", score_every=None, decays=(0.9,),
                       bema=BEMAConfig.from_trl(**trl_args))
    seen: dict[int, float] = {}

    class Probe(TrainerCallback):  # runs after both: TRL updates in on_step_end, emascope in the optimizer hook
        def on_step_end(self, args, state, control, **kwargs):
            t = state.global_step
            if t > 2 and (t - 2) % 3 == 0:
                ours = cb.scope.bank.materialize("bema")
                theirs = dict(trl_cb.running_model.named_parameters())
                seen[t] = max(float((ours[k].double() - p.detach().double()).abs().max()
                                    / max(1.0, float(p.detach().abs().max()))) for k, p in theirs.items())

    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path / "out", max_steps=14), train_dataset=TRAIN,
                      callbacks=[trl_cb, cb, Probe()])
    trainer.train()
    assert sorted(seen) == [5, 8, 11, 14]
    # TRL: ema.mul_(1 - beta).add_(theta, alpha=beta); emascope: one fp32 lerp; a few float32 ulps apart
    print("BEMA vs TRL, max relative difference per update step:", seen)
    assert max(seen.values()) <= 2e-6, seen
    # and the two are not trivially equal to the live weights at those steps
    live = dict(cb.scope.model.named_parameters())
    ours = cb.scope.bank.materialize("bema")
    assert max(float((ours[k] - p.detach()).abs().max()) for k, p in live.items()) > 1e-4
