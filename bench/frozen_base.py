"""A frozen base (a LoRA fine-tune), measured side by side in one run.

The model: a GPT-2 built from a config (4 layers, 256 wide, 2,000-token vocabulary; no download)
wrapped by peft's ``get_peft_model`` with LoRA r=8 on ``c_attn`` and ``c_fc``: a frozen base of
about 4M parameters and adapters of about 74k. A plain training loop on random token batches with
``emascope.attach(..., evaluate=<validation loss>)``.

Part 1, bytes written under ``banks/``: one run (inline scoring, every stage snapshot kept, a lead-in
snapshot before each stage, ``latest`` every ``--snapshot-every`` steps). Every file the run writes is
seen after the step that wrote it (polled after each step: name, inode, mtime); each snapshot is then
re-saved, from ``load_snapshot`` of it, by ``save_snapshot(bank, path, metadata, dtype=...)`` without
a frozen store: the self-contained format with the frozen base inline that every snapshot was before
side files (what tests/test_frozen_side_file.py's ``inline_copy`` does). Printed per kind of
snapshot and in total: bytes with the side file vs inline, and their ratio.

Part 2, background scoring: two runs, ``score_share_frozen=False`` (the default) and ``True``, the
same otherwise, stage by stage interleaved in one process; each scoring point waits for the previous
sweep first (``scope.wait()``), so ``blocked_seconds`` is the freeze alone. Printed: the bytes copied
per stage (``stage_pending.bytes``), the training time blocked at a scoring point (median of the
later ones, and the first, which also deep-copies the model into the worker's eval copy), and the
eval copy's parameter/buffer bytes not shared with the training model.

Part 3, one swap (``with bank.swap(model, v): pass``): the run's bank, whose frozen base is the
model's own (neither copied nor backed up), vs a model-less bank (``load_snapshot`` of the run's
``latest``) swapped into a fresh deep copy of the model (every live value is copied in and restored),
median of interleaved repetitions.

Part 4, the training step (scoring off): a plain LoRA loop and an attached one on their own batches,
blocks alternating A B B A; and the check for layers unfrozen after attach (run at most once a
second by the agent's housekeeping) timed against one bank update.

    .venv/bin/python bench/frozen_base.py [--quick] [--threads 1]

Asserts nothing; times depend on the (shared, noisy) machine, the bytes do not.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import GPT2Config, GPT2LMHeadModel

from emascope import attach
from emascope import runformat as rf
from emascope.snapshot import load_snapshot, save_snapshot, snapshot_metadata

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
DECAYS = (0.9, 0.99, 0.999)
_DTYPES = {"F32": None, "BF16": torch.bfloat16, "F16": torch.float16}


def lora_gpt2(layers: int, width: int, vocab: int, length: int, seed: int = 0) -> torch.nn.Module:
    """The LoRA model (peft ``PeftModel``): GPT-2 from a config, LoRA r=8 on c_attn and c_fc."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=4, vocab_size=vocab, n_positions=length,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"], lora_dropout=0.0, fan_in_fan_out=True,
                      task_type="CAUSAL_LM")
    return get_peft_model(GPT2LMHeadModel(cfg), lora)


class Arm:
    """One LoRA training run with the agent attached."""

    def __init__(self, a: argparse.Namespace, run_dir: Path, **attach_kw) -> None:
        self.model = lora_gpt2(a.layers, a.width, a.vocab, a.length)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-3)
        g = torch.Generator().manual_seed(1)
        self.val = torch.randint(0, a.vocab, (8, a.length), generator=g)
        self.g, self.a, self.run_dir = g, a, run_dir
        self.scope = attach(self.model, self.opt, run_dir=run_dir, decays=DECAYS, evaluate=self.val_loss,
                            metric_directions={"val_loss": "lower"}, **attach_kw)

    def val_loss(self, m: torch.nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {"val_loss": float(m(input_ids=self.val, labels=self.val).loss)}

    def step(self) -> None:
        batch = torch.randint(0, self.a.vocab, (self.a.batch, self.a.length), generator=self.g)
        self.model(input_ids=batch, labels=batch).loss.backward()
        self.opt.step()  # the agent's step hook runs here
        self.opt.zero_grad(set_to_none=True)

    def events(self, type_: str) -> list[dict]:
        lines = (self.run_dir / rf.EVENTS).read_text().splitlines()
        return [e for e in map(json.loads, lines) if e["type"] == type_]


def counts(model: torch.nn.Module) -> tuple[int, int]:
    """(frozen, trainable) parameter counts (tied weights once)."""
    ps = list(model.parameters())
    return sum(p.numel() for p in ps if not p.requires_grad), sum(p.numel() for p in ps if p.requires_grad)


# ------------------------------------------------------------------------------------------- part 1


def kind_of(name: str) -> str | None:
    if rf.is_frozen_file_name(name):
        return "frozen side file"
    if name == Path(rf.SNAPSHOT).name:
        return "latest"
    if rf.parse_stage_snapshot_name(name) is not None:
        return "stage"
    if rf.parse_lead_in_snapshot_name(name) is not None:
        return "lead-in"
    return None


def inline_size(path: Path, scratch: Path) -> int:
    """Bytes of ``path``'s snapshot written in the self-contained format (frozen values inline)."""
    with safe_open(str(path), framework="pt") as f:
        dtype = _DTYPES[f.get_slice("bank").get_dtype()]
    out = scratch / path.name
    size = save_snapshot(load_snapshot(path), out, snapshot_metadata(path), dtype=dtype)
    assert size == out.stat().st_size
    out.unlink()
    return size


def part1(a: argparse.Namespace, root: Path) -> dict[str, tuple[int, int, int]]:
    arm = Arm(a, root / "bytes", score_every=a.score_every, snapshot_every=a.snapshot_every, stage_snapshots=None,
              stage_lead_in=(4,), scoring="inline")
    frozen, trainable = counts(arm.model)
    print(f"LoRA GPT-2: frozen base {frozen:,} parameters ({4 * frozen / 1e6:.2f} MB), adapters {trainable:,} "
          f"parameters; {len(DECAYS)} decays")
    banks, scratch = arm.run_dir / rf.BANKS, root / "scratch"
    scratch.mkdir()
    seen: set[tuple] = set()
    written: dict[str, list[tuple[int, int]]] = {}  # kind -> [(bytes as written, bytes inline)]

    def poll() -> None:
        for e in os.scandir(banks):
            kind, st = kind_of(e.name), e.stat()
            key = (e.name, st.st_ino, st.st_mtime_ns, st.st_size)
            if kind is None or key in seen:
                continue
            seen.add(key)
            inline = 0 if kind == "frozen side file" else inline_size(Path(e.path), scratch)
            written.setdefault(kind, []).append((st.st_size, inline))

    for _ in range(a.steps):
        arm.step()
        poll()
    arm.scope.close(score=False)
    poll()
    print()
    print(f"part 1: bytes written under banks/ by a run of {a.steps} steps (score_every={a.score_every}, "
          f"snapshot_every={a.snapshot_every}, stage_lead_in=(4,), all stages kept), side file vs frozen base inline "
          "(bytes per file: median; total: sum)")
    print(f"  {'file':<18} {'written':>8} {'bytes, side file':>23} {'bytes, inline':>20} {'inline / side':>14}")
    rows: dict[str, tuple[int, int, int]] = {}
    for kind in ("latest", "stage", "lead-in", "frozen side file"):
        got = written.get(kind, [])
        if not got:
            continue
        side, inline = statistics.median(s for s, _ in got), statistics.median(i for _, i in got)
        rows[kind] = (len(got), sum(s for s, _ in got), sum(i for _, i in got))
        ratio = f"{inline / side:13.1f}x" if inline else f"{'-':>14}"
        print(f"  {kind:<18} {len(got):>8} {side:>23,.0f} {inline:>20,.0f} {ratio}")
    side_total = sum(r[1] for r in rows.values())
    inline_total = sum(r[2] for r in rows.values())
    n = sum(r[0] for k, r in rows.items() if k != "frozen side file")
    print(f"  {'total':<18} {n:>8} {side_total:>23,} {inline_total:>20,} {inline_total / side_total:13.1f}x")
    rows["total"] = (n, side_total, inline_total)
    return rows


# ------------------------------------------------------------------------------------------- part 2


def unshared_bytes(twin: torch.nn.Module, model: torch.nn.Module) -> int:
    """Bytes of ``twin``'s parameters and buffers whose storage is not one of ``model``'s."""
    mine = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    out, counted = 0, set()
    for t in [*twin.parameters(), *twin.buffers()]:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in mine and ptr not in counted:
            counted.add(ptr)
            out += t.untyped_storage().nbytes()
    return out


def part2(a: argparse.Namespace, root: Path) -> dict[bool, dict]:
    arms = {share: Arm(a, root / f"bg-{share}", score_every=a.score_every, scoring="background",
                       score_share_frozen=share, score_at_close=False, stage_snapshots=0)
            for share in (False, True)}
    for stage in range(a.stages):
        for share in ((False, True) if stage % 2 == 0 else (True, False)):
            arm = arms[share]
            for _ in range(a.score_every):
                arm.step()  # the last step is a scoring point (freeze + queue, in the step hook)
            arm.scope.wait()  # so the next scoring point does not wait for this sweep
    out = {}
    for share, arm in arms.items():
        twin = arm.scope._background._eval_model
        out[share] = dict(pending=arm.events("stage_pending"), done=len(arm.events("score_done")),
                          twin=unshared_bytes(twin, arm.model) if twin is not None else float("nan"))
        arm.scope.close(score=False)
    print()
    print(f"part 2: background scoring, {a.stages} scoring points every {a.score_every} steps, interleaved; "
          "score_share_frozen False vs True")
    print(f"  {'score_share_frozen':<19} {'bytes / stage':>14} {'blocked (median)':>17} {'blocked (first)':>16} "
          f"{'eval copy, not shared':>22} {'stages scored':>14}")
    for share, r in out.items():
        p = r["pending"]
        blocked = [e["blocked_seconds"] - e.get("waited_seconds", 0.0) for e in p]
        later = statistics.median(blocked[1:]) if len(blocked) > 1 else blocked[0]
        r.update(bytes=statistics.median(e["bytes"] for e in p), blocked=later, first=blocked[0])
        print(f"  {str(share):<19} {r['bytes']:>14,.0f} {1e3 * later:>15.2f}ms {1e3 * blocked[0]:>14.1f}ms "
              f"{r['twin']:>22,} {r['done']:>14}")
    f, t = out[False], out[True]
    print(f"  {'False / True':<19} {f['bytes'] / t['bytes']:>13.1f}x {f['blocked'] / t['blocked']:>16.1f}x "
          f"{f['first'] / t['first']:>15.1f}x {f['twin'] / max(t['twin'], 1):>21.1f}x")
    return out


# ------------------------------------------------------------------------------------------- part 3


def part3(a: argparse.Namespace, root: Path) -> float:
    arm = Arm(a, root / "swap", score_every=None, snapshot_every=None, stage_snapshots=0)
    for _ in range(a.swap_train_steps):
        arm.step()
    arm.scope.close(score=False)  # writes banks/latest.safetensors
    own, model = arm.scope.bank, arm.model
    loaded, fresh = load_snapshot(arm.run_dir / rf.SNAPSHOT), copy.deepcopy(model)
    contenders = {"own": (own, model), "loaded": (loaded, fresh)}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(a.reps):
        for key in (("own", "loaded") if r % 2 == 0 else ("loaded", "own")):
            bank, target = contenders[key]
            t = time.perf_counter()
            with bank.swap(target, "0.99"):
                pass
            times[key].append(time.perf_counter() - t)
    t_own, t_loaded = statistics.median(times["own"]), statistics.median(times["loaded"])
    print()
    print(f"part 3: one swap of a variant (enter + restore), median of {a.reps} interleaved repetitions")
    print(f"  {'bank':<52} {'ms / swap':>10} {'time / own base':>16}")
    print(f"  {'run bank, the frozen base its own source':<52} {1e3 * t_own:>10.2f} {1.0:>15.2f}x")
    print(f"  {'model-less bank (load_snapshot) into a fresh copy':<52} {1e3 * t_loaded:>10.2f} "
          f"{t_loaded / t_own:>15.2f}x")
    return t_loaded / t_own


def part4(a: argparse.Namespace, root: Path) -> tuple[float, float]:
    """The agent on the training step with a frozen base (scoring off): a plain run and an attached
    run on the same batches, blocks alternating A B B A; and the housekeeping check for layers
    unfrozen after attach (``EMABank.unaveraged_trainable``, at most once a second) against one
    bank update."""
    attached = Arm(a, root / "step", score_every=None, snapshot_every=None, stage_snapshots=0)
    plain = lora_gpt2(a.layers, a.width, a.vocab, a.length)
    plain_opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(2)

    def plain_step() -> None:
        batch = torch.randint(0, a.vocab, (a.batch, a.length), generator=g)
        plain(input_ids=batch, labels=batch).loss.backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    arms = {"plain": plain_step, "attached": attached.step}
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(2):
        plain_step(), attached.step()  # warm-up
    for b in range(a.blocks):
        for key in (("plain", "attached") if b % 2 == 0 else ("attached", "plain")):
            t = time.perf_counter()
            for _ in range(a.block_steps):
                arms[key]()
            times[key].append((time.perf_counter() - t) / a.block_steps)
    t_plain, t_att = statistics.median(times["plain"]), statistics.median(times["attached"])
    bank = attached.scope.bank
    check, update = [], []
    for _ in range(a.reps):
        t = time.perf_counter()
        bank.unaveraged_trainable()
        check.append(time.perf_counter() - t)
        t = time.perf_counter()
        bank.update()
        update.append(time.perf_counter() - t)
    attached.scope.close(score=False)
    t_check, t_update = statistics.median(check), statistics.median(update)
    n_frozen = sum(1 for k in bank.entry_kinds().values() if k == "frozen")
    print()
    print(f"part 4: the training step (scoring off), {a.blocks} alternating blocks of {a.block_steps} steps; "
          f"{n_frozen} frozen entries")
    print(f"  {'arm':<44} {'ms / step':>10} {'ratio':>8}")
    print(f"  {'plain loop':<44} {1e3 * t_plain:>10.2f} {1.0:>7.3f}x")
    print(f"  {'attached (bank update, housekeeping)':<44} {1e3 * t_att:>10.2f} {t_att / t_plain:>7.3f}x")
    print(f"  {'unfrozen-layer check, once a second (ms)':<44} {1e3 * t_check:>10.3f} "
          f"{t_check / t_update:>7.3f}x of one bank update")
    return t_att / t_plain, t_check / t_update


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: a smaller model, fewer steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--steps", type=int, default=60, help="training steps (part 1)")
    ap.add_argument("--score-every", type=int, default=20, help="steps between scoring points (parts 1, 2)")
    ap.add_argument("--snapshot-every", type=int, default=10, help="steps between latest snapshots (part 1)")
    ap.add_argument("--stages", type=int, default=4, help="scoring points per arm (part 2)")
    ap.add_argument("--reps", type=int, default=21, help="swap repetitions per contender (part 3)")
    ap.add_argument("--blocks", type=int, default=20, help="alternating blocks per arm (part 4)")
    ap.add_argument("--block-steps", type=int, default=5, help="training steps per block (part 4)")
    ap.add_argument("--parts", default="1234", help="which parts to run, e.g. 13")
    a = ap.parse_args(argv)
    a.layers, a.width, a.vocab, a.length, a.batch, a.swap_train_steps = 4, 256, 2000, 32, 8, 5
    if a.quick:
        a.layers, a.width, a.vocab, a.length, a.batch = 2, 128, 1000, 16, 4
        a.steps, a.score_every, a.snapshot_every, a.stages, a.reps, a.swap_train_steps = 12, 6, 3, 2, 5, 2
        a.blocks, a.block_steps = 4, 2
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device cpu")
    with tempfile.TemporaryDirectory() as tmp:
        if "1" in a.parts:
            part1(a, Path(tmp))
        if "2" in a.parts:
            part2(a, Path(tmp))
        if "3" in a.parts:
            part3(a, Path(tmp))
        if "4" in a.parts:
            part4(a, Path(tmp))


if __name__ == "__main__":
    main()
