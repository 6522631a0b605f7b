"""emascope with Hugging Face peft (LoRA) on a tiny GPT-2 built from a config (CPU, no network):

- the bank holds only the adapters (the trainable parameters), and equals a float64 EMA of them;
- scoring swaps the averaged adapters in (``evaluate`` sees them) and restores the live weights
  exactly: a twin trained without emascope ends bit-identical; the frozen base is never written;
- ``--format peft`` writes an adapter folder through peft's ``save_pretrained`` that
  ``PeftModel.from_pretrained(base, folder)`` loads, ``--format transformers`` the merged model
  (peft's ``merge_and_unload``) that ``AutoModelForCausalLM.from_pretrained`` loads; both reproduce
  the validation loss the agent scored for that decay;
- transformers' Trainer + ``ScopeCallback`` with a PeftModel: resume from a checkpoint is bit-exact;
- what cannot be exported is refused with a message, nothing written.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import emascope
from emascope.export_cli import main as export_main
from emascope.hf import ScopeCallback

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

VOCAB, LENGTH = 32, 12
DECAYS = (0.9, 0.99)


def base_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def lora_model(seed: int = 0) -> PeftModel:
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_dropout=0.0, fan_in_fan_out=True,
                      task_type="CAUSAL_LM")
    model = get_peft_model(base_model(seed), lora)
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # peft starts lora_B at zero: make the adapters matter from step 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return model


G = torch.Generator().manual_seed(1)
TRAIN = torch.randint(0, VOCAB, (96, LENGTH), generator=G)
VAL = torch.randint(0, VOCAB, (8, LENGTH), generator=G)


def val_loss(model: torch.nn.Module) -> dict[str, float]:
    with torch.no_grad():
        return {"val_loss": float(model(input_ids=VAL, labels=VAL).loss)}


def adapters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def train(model: torch.nn.Module, steps: int, opt: torch.optim.Optimizer, ref: dict | None = None) -> None:
    """A plain loop; ``ref``: float64 EMAs per decay of the trainable parameters, updated each step."""
    for i in range(steps):
        batch = TRAIN[(4 * i) % len(TRAIN):(4 * i) % len(TRAIN) + 4]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if ref is not None:
            for d, ema in ref.items():
                for k, p in model.named_parameters():
                    if p.requires_grad:
                        ema[k].mul_(d).add_(p.detach().double(), alpha=1 - d)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """30 steps of a LoRA GPT-2 with the agent (inline scoring every 10 steps) and a twin without it."""
    tmp = tmp_path_factory.mktemp("peft")
    model, twin = lora_model(), lora_model()
    frozen = {k: (p, p._version, p.detach().clone()) for k, p in model.named_parameters() if not p.requires_grad}
    ref = {d: {k: t.double() for k, t in adapters(model).items()} for d in DECAYS}
    seen: list[tuple[float, dict[str, torch.Tensor]]] = []

    def evaluate(m):
        seen.append((val_loss(m)["val_loss"], adapters(m)))
        return {"val_loss": seen[-1][0]}

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    scope = emascope.attach(model, opt, run_dir=tmp / "run", evaluate=evaluate, metric_directions={"val_loss": "lower"},
                            score_every=10, decays=DECAYS, scoring="inline")
    train(model, 30, opt, ref)
    in_process = scope.export(0.9, tmp / "inproc", format="peft")
    scores = scope.last_scores.scores
    scope.close()
    train(twin, 30, torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=2e-2))
    return dict(tmp=tmp, run_dir=tmp / "run", model=model, twin=twin, frozen=frozen, ref=ref, seen=seen,
                scores=scores, scope=scope, in_process=in_process)


def test_bank_holds_only_the_adapters_and_equals_a_float64_ema(lora_run):
    model, scope = lora_run["model"], lora_run["scope"]
    trainable = {k: p.numel() for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in k for k in trainable)
    assert scope.bank.numel == sum(trainable.values())
    total = sum(p.numel() for p in model.parameters())
    assert scope.bank.numel < total / 5  # the adapters, not the base
    info = json.loads((lora_run["run_dir"] / "run.json").read_text())
    assert info["model"]["num_trainable"] == scope.bank.numel
    assert info["memory_plan"]["params"] == scope.bank.numel
    assert info["memory_plan"]["bank_bytes_rank0"] < 4 * total  # 2 decays of the adapters < 1 copy of the model
    snap = scope.bank.state_dict()
    avg = {k for e in snap["layout"] for k in e["keys"] if e["kind"] == "avg"}
    assert avg == set(trainable)
    assert all(e["kind"] == "frozen" for e in snap["layout"] if "base_layer" in e["name"])
    for d in DECAYS:
        state = scope.bank.materialize(d)
        for k, ema in lora_run["ref"][d].items():
            torch.testing.assert_close(state[k].double(), ema, rtol=1e-5, atol=1e-6)


def test_scoring_swaps_the_ema_adapters_in_and_restores_the_live_weights_exactly(lora_run):
    # evaluate saw each decay's averaged adapters, and the loss it returned is the one recorded
    for d in DECAYS:
        ref = lora_run["ref"][d]
        hits = [loss for loss, seen in lora_run["seen"]
                if all(torch.allclose(seen[k].double(), ref[k], rtol=1e-5, atol=1e-6) for k in ref)]
        assert hits and hits[-1] == lora_run["scores"][str(d)]["val_loss"]
    # three inline sweeps ran inside training, yet the run equals a twin trained without the agent
    assert len(lora_run["seen"]) == 3 * (1 + len(DECAYS))
    twin = dict(lora_run["twin"].named_parameters())
    for k, p in lora_run["model"].named_parameters():
        assert torch.equal(p, twin[k]), k
    # the frozen base was neither averaged nor written by the swaps (no in-place op on it)
    for k, (p, version, value) in lora_run["frozen"].items():
        assert p._version == version and torch.equal(p, value), k


def test_the_frozen_base_is_written_once_not_in_every_snapshot(lora_run):
    from emascope import runformat as rf
    from emascope.snapshot import load_snapshot

    banks = lora_run["run_dir"] / rf.BANKS
    sides = [p for p in banks.iterdir() if rf.is_frozen_file_name(p.name)]
    snaps = [p for p in banks.glob("*.safetensors") if p not in sides]
    assert len(sides) == 1 and len(snaps) >= 4  # latest, stage snapshots at 10/20/30, lead-ins
    model = lora_run["model"]
    base = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    adapters_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert base <= sides[0].stat().st_size < base + 64 * 1024
    for p in snaps:  # rows of 2 decays, the live adapters and the buffers: no base weights
        assert p.stat().st_size < 4 * adapters_bytes + 16 * 1024 < base / 2, p.name
    live = load_snapshot(banks / "latest.safetensors").live_values()
    for k, p in model.named_parameters():
        assert torch.equal(live[k], p.detach()), k


def test_peft_export_loads_with_peftmodel_from_pretrained(lora_run):
    run_dir, tmp = lora_run["run_dir"], lora_run["tmp"]
    scored = lora_run["scores"]["0.9"]["val_loss"]
    out = tmp / "adapter"
    assert export_main([str(run_dir), "--variant", "0.9", "--format", "peft", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all("lora_A.weight" in k or "lora_B.weight" in k for k in keys)  # adapters only, peft's names
    assert (meta["format"], meta["variant"], meta["step"]) == ("pt", "0.9", "30")
    config = LoraConfig.from_pretrained(str(out))
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (4, 8, {"c_attn", "c_fc"})
    for folder in (out, lora_run["in_process"]):  # `emascope export` and scope.export(format="peft")
        loaded = PeftModel.from_pretrained(base_model(), str(folder)).eval()
        assert val_loss(loaded)["val_loss"] == pytest.approx(scored, abs=1e-6)
    # the default folder is named apart from a merged export's
    assert export_main([str(run_dir), "--variant", "0.99", "--format", "peft"]) == 0
    assert (run_dir / "exports" / "ema-0.99-step30-adapter" / "adapter_config.json").is_file()


def test_transformers_export_of_a_peft_run_is_the_merged_model(lora_run):
    run_dir, tmp = lora_run["run_dir"], lora_run["tmp"]
    out = tmp / "merged"
    assert export_main([str(run_dir), "--variant", "0.99", "--format", "transformers", "--out", str(out)]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer.h.0.attn.c_attn.weight" in keys and not any("lora_" in k or "base_layer" in k for k in keys)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    scored = lora_run["scores"]["0.99"]["val_loss"]
    assert val_loss(loaded)["val_loss"] == pytest.approx(scored, abs=1e-5)  # merged: float32 rounding of W + BA


def test_exports_a_peft_run_cannot_make_are_refused(lora_run, tmp_path, capsys):
    assert export_main([str(lora_run["run_dir"]), "--variant", "0.9", "--format", "diffusers", "--out",
                        str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    # a run without adapters has no adapter folder to write
    model = base_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with emascope.attach(model, opt, run_dir=tmp_path / "plain", score_every=None, decays=(0.9,)):
        train(model, 2, opt)
    capsys.readouterr()
    assert export_main([str(tmp_path / "plain"), "--variant", "0.9", "--format", "peft", "--out",
                        str(tmp_path / "y")]) == 2
    assert "holds no peft adapters" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_adapters_injected_without_a_peftmodel_are_not_exported_as_a_broken_model(tmp_path, capsys):
    # peft's low-level API (as transformers' model.add_adapter) injects LoRA layers into the PreTrainedModel:
    # its keys (base_layer, lora_A) would load into GPT2LMHeadModel as "unexpected" and leave c_attn random
    model = inject_adapter_in_model(LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True), base_model())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with emascope.attach(model, opt, run_dir=tmp_path / "run", score_every=None, decays=(0.9,)) as scope:
        train(model, 2, opt)
        with pytest.raises(ValueError, match="injected without a peft.PeftModel"):
            scope.export(0.9, tmp_path / "a", format="transformers")
    capsys.readouterr()
    for fmt in ("transformers", "peft"):
        assert export_main([str(tmp_path / "run"), "--variant", "0.9", "--format", fmt, "--out",
                            str(tmp_path / fmt)]) == 2
        assert "injected without a peft.PeftModel" in capsys.readouterr().err
        assert not (tmp_path / fmt).exists()
    assert not (tmp_path / "a").exists()
    assert export_main([str(tmp_path / "run"), "--variant", "0.9", "--out", str(tmp_path / "s.safetensors")]) == 0


def _args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=6, learning_rate=2e-2, use_cpu=True,
                report_to=[], save_strategy="steps", save_steps=3, logging_strategy="no", disable_tqdm=True, seed=0,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def test_trainer_with_a_peftmodel_exports_the_scored_adapter_and_resumes_exactly(tmp_path):
    data = [{"input_ids": ids, "labels": ids} for ids in TRAIN[:48]]

    def run(run_dir, resume_from=None):
        cb = ScopeCallback(run_dir=run_dir, evaluate=val_loss, metric_directions={"val_loss": "lower"},
                           score_every=3, decays=DECAYS, score_busy="wait")
        trainer = Trainer(model=lora_model(), args=_args(tmp_path / "out"), train_dataset=data, callbacks=[cb])
        trainer.train(resume_from_checkpoint=resume_from)
        return cb.scope

    straight = run(tmp_path / "run")
    assert straight.current_step == 6 and straight.bank.step == 6
    assert straight.bank.numel == sum(p.numel() for n, p in lora_model().named_parameters() if "lora_" in n)
    final = straight.bank.state_dict()["bank"]
    scored = straight.last_scores.scores["0.9"]["val_loss"]
    out = tmp_path / "adapter"
    assert export_main([str(tmp_path / "run"), "--variant", "0.9", "--format", "peft", "--out", str(out)]) == 0
    loaded = PeftModel.from_pretrained(base_model(), str(out)).eval()
    assert val_loss(loaded)["val_loss"] == pytest.approx(scored, abs=1e-6)

    checkpoint = tmp_path / "out" / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").is_file()  # the Trainer saved the PeftModel's adapter
    resumed = run(tmp_path / "run", resume_from=str(checkpoint))
    assert resumed.current_step == 6 and resumed.bank.step == 6
    assert torch.equal(resumed.bank.state_dict()["bank"], final)
