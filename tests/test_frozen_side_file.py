"""A frozen base (LoRA-style) is written once per run, in ``banks/frozen-<sha16>.safetensors``:

- every snapshot (latest, stage, lead-in) holds the bank rows and the trainable/buffer values only
  and names the one side file of the run; the disk-cost estimate counts the base once;
- loading, verifying, exporting, synthesising and resuming read exactly what a run whose snapshots
  hold the frozen values inline (the format before side files, still written by
  ``save_snapshot(..., frozen=None)``) reads: bit-identical;
- a frozen weight modified in place gets a new side file, older snapshots keep their own values;
  retention deletes the side files no snapshot references, and nothing else;
- a missing, tampered or foreign side file, or a reference outside ``banks/``, is a clear error.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from emascope import attach
from emascope import runformat as rf
from emascope import shardfiles as SF
from emascope.frozenfile import remove_unreferenced
from emascope.posthoc import synthesize
from emascope.snapshot import ExportError, load_snapshot, save_snapshot, snapshot_metadata, verify_snapshot
from emascope.synthesis import SynthesisError, open_snapshots

torch.set_num_threads(1)
WIDTH = 96
DECAYS = (0.9, 0.99)


class Frozen(nn.Module):
    """A frozen base (most of the weights) and a small trainable adapter, plus a buffer."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.base = nn.Sequential(nn.Linear(3, WIDTH), nn.SiLU(), nn.Linear(WIDTH, WIDTH), nn.SiLU(),
                                  nn.Linear(WIDTH, 2))
        self.base.requires_grad_(False)
        self.adapter = nn.Linear(2, 2)
        self.register_buffer("seen", torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen += 1
        return self.adapter(self.base(x))


X = torch.randn(32, 3, generator=torch.Generator().manual_seed(1))


def train(model: Frozen, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        loss = model(X).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def start(run_dir: Path, **kw) -> tuple[Frozen, torch.optim.Optimizer, object]:
    model = Frozen()
    opt = torch.optim.SGD(model.adapter.parameters(), lr=0.05)
    opts = dict(score_every=10, stage_snapshots=3, stage_lead_in=(2,), decays=DECAYS, snapshot_every=5,
                scoring="inline")
    opts.update(kw)
    return model, opt, attach(model, opt, run_dir=run_dir, **opts)


def side_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / rf.BANKS).iterdir() if rf.is_frozen_file_name(p.name))


def snapshots(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / rf.BANKS).glob("*.safetensors") if p.name == "latest.safetensors"
                  or rf.parse_stage_snapshot_name(p.name) is not None or rf.parse_lead_in_snapshot_name(p.name))


def inline_copy(run_dir: Path, dest: Path) -> Path:
    """The run with every snapshot rewritten in the old format (frozen values inline, no side file)."""
    shutil.copytree(run_dir, dest)
    for p in snapshots(dest):
        with safe_open(str(p), framework="pt") as f:
            dtype = f.get_slice("bank").get_dtype()
        bank = load_snapshot(p)
        save_snapshot(bank, p, snapshot_metadata(p), dtype={"F32": None, "BF16": torch.bfloat16,
                                                            "F16": torch.float16}[dtype])
    for name in side_files(dest):
        (dest / rf.BANKS / name).unlink()
    return dest


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("frozen")
    model, opt, scope = start(tmp / "run", stage_snapshot_dtype="bfloat16")
    train(model, opt, 40)
    scope.close()
    return dict(run_dir=tmp / "run", model=model, scope=scope, inline=inline_copy(tmp / "run", tmp / "inline"))


def test_the_frozen_base_is_written_once_per_run(frozen_run):
    run_dir, model, scope = frozen_run["run_dir"], frozen_run["model"], frozen_run["scope"]
    names = side_files(run_dir)
    assert len(names) == 1 and scope._frozen_files.writes == 1  # hashed once, for 8 stage + 8 latest + lead-ins
    side = run_dir / rf.BANKS / names[0]
    base = sum(p.numel() * p.element_size() for p in model.base.parameters())
    assert base <= side.stat().st_size < base + 4096
    snaps = snapshots(run_dir)
    roles = {snapshot_metadata(p).get(rf.SNAPSHOT_ROLE_KEY, "latest") for p in snaps}
    assert roles == {"latest", rf.ROLE_STAGE, rf.ROLE_LEAD_IN}
    adapters = sum(p.numel() * 4 for p in model.adapter.parameters())
    for p in snaps:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata()
            assert not [k for k in f.keys() if k.startswith("live/base.")]
        assert meta[rf.SNAPSHOT_FROZEN_FILE_KEY] == names[0]
        # the rows (2 decays + raw, fp32 at most) and the adapters: the base is not in it
        assert p.stat().st_size < 4 * adapters + 8192 < base / 4
    inline = snapshots(frozen_run["inline"])
    assert sum(p.stat().st_size for p in inline) > len(inline) * base  # what every snapshot cost before
    plan = [json.loads(line) for line in (run_dir / rf.EVENTS).read_text().splitlines()]
    plan = [e for e in plan if e["type"] == "stage_snapshot_plan"][0]
    assert plan["frozen_bytes"] == base and plan["stage_bytes"] < base / 4
    assert plan["max_bytes"] == 3 * plan["stage_bytes"] + 2 * plan["lead_in_bytes"] + base  # the base once


def _same_bank(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
        else:
            assert sa[k] == sb[k], k
    la, lb = a.live_values(), b.live_values()
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k].dtype == lb[k].dtype and torch.equal(la[k], lb[k]), k


def test_every_reader_reads_the_side_file_run_like_the_inline_one(frozen_run, tmp_path):
    run_dir, inline = frozen_run["run_dir"], frozen_run["inline"]
    assert not side_files(inline)
    for p in snapshots(run_dir):
        q = inline / rf.BANKS / p.name
        assert verify_snapshot(p) == verify_snapshot(q)
        _same_bank(load_snapshot(p), load_snapshot(q))
        _same_bank(SF.load_bank(p), load_snapshot(q))
        got = {tuple(k): t for k, t in SF.iter_variant(SF.open_snapshot(p), "0.9")}
        want = {tuple(k): t for k, t in SF.iter_variant(SF.open_snapshot(q), "0.9")}
        assert got.keys() == want.keys() and all(torch.equal(v, want[k]) for k, v in got.items())
    live = load_snapshot(run_dir / rf.SNAPSHOT).live_values()
    for k, p in frozen_run["model"].named_parameters():
        assert torch.equal(live[k], p.detach()), k
    # export (emascope export), single-file and through the shard reader
    for variant in ("0.99", "raw"):
        a = load_file(SF.export_from_run(run_dir, variant, tmp_path / f"a-{variant}.safetensors"))
        b = load_file(SF.export_from_run(inline, variant, tmp_path / f"b-{variant}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        c = load_file(SF.export_variant(SF.open_snapshot(run_dir / rf.SNAPSHOT), variant, tmp_path / "c.safetensors"))
        assert all(torch.equal(a[k], c[k]) for k in a)
    # post-hoc synthesis (stage and lead-in snapshots)
    sa, ra = synthesize(run_dir, decay=0.95)
    sb, rb = synthesize(inline, decay=0.95)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ra.profile_residual == rb.profile_residual
    assert torch.equal(sa["base.2.weight"], frozen_run["model"].base[2].weight)
    # resume: the bank continues bit-identically from either
    banks = []
    for d in (run_dir, inline):
        model = Frozen()
        opt = torch.optim.SGD(model.adapter.parameters(), lr=0.05)
        scope = attach(model, opt, run_dir=d, resume=True, decays=DECAYS, score_every=10, stage_snapshots=3,
                       stage_lead_in=(2,), snapshot_every=5, scoring="inline", stage_snapshot_dtype="bfloat16")
        banks.append(scope.bank)
        scope.close(score=False)
    _same_bank(banks[0], banks[1])


def test_a_frozen_weight_changed_in_place_gets_a_new_side_file_and_retention_removes_the_old(tmp_path):
    run_dir = tmp_path / "run"
    model, opt, scope = start(run_dir, stage_snapshots=1, stage_lead_in=())
    train(model, opt, 20)  # stages 10, 20 (only the newest kept), latest every 5 steps
    first = side_files(run_dir)
    old = model.base[0].weight.detach().clone()
    with torch.no_grad():
        model.base[0].weight.mul_(2.0)  # in place: same storage, a new version
    train(model, opt, 5)  # latest at 25: the new values
    second = side_files(run_dir)
    assert len(first) == 1 and len(second) == 2 and first[0] in second
    assert scope._frozen_files.writes == 2
    stage20 = run_dir / rf.stage_snapshot_file(20)
    assert torch.equal(load_snapshot(stage20).live_values()["base.0.weight"], old)  # its own values
    assert torch.equal(load_snapshot(run_dir / rf.SNAPSHOT).live_values()["base.0.weight"], 2.0 * old)
    # foreign files that only look similar, and a side file outside banks/, are never deleted
    keep = [run_dir / rf.BANKS / "frozen-notours.safetensors", run_dir / "frozen-0123456789abcdef.safetensors"]
    for p in keep:
        p.write_bytes(b"x")
    train(model, opt, 5)  # stage 30 replaces stage 20, the last user of the first side file
    assert not stage20.exists()
    assert side_files(run_dir) == [n for n in second if n != first[0]]
    pruned = [json.loads(line) for line in (run_dir / rf.EVENTS).read_text().splitlines()]
    pruned = [p for e in pruned if e["type"] == "snapshot_pruned" for p in e["paths"]]
    assert f"{rf.BANKS}/{first[0]}" in pruned
    assert all(p.exists() for p in keep)
    scope.close()
    assert remove_unreferenced(run_dir) == []  # everything left is referenced
    for p in snapshots(run_dir):
        assert torch.equal(load_snapshot(p).live_values()["base.0.weight"], 2.0 * old)
    assert scope._frozen_files.writes == 2


def _rewrite_meta(path: Path, **changes: str) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(changes)
    save_file(tensors, str(path), metadata=meta)


def _all_readers_refuse(run_dir: Path, snap: Path, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_snapshot(snap)
    with pytest.raises(ValueError, match=match):
        verify_snapshot(snap)
    with pytest.raises(ValueError, match=match):
        SF.load_bank(snap)
    with pytest.raises(ValueError, match=match):
        SF.export_variant(SF.open_snapshot(snap), "0.9", run_dir.parent / "x.safetensors")
    if snap.name == Path(rf.SNAPSHOT).name:
        with pytest.raises(ExportError, match=match):
            SF.export_from_run(run_dir, "0.9", run_dir.parent / "y.safetensors")
    else:
        with pytest.raises(SynthesisError, match=match):
            open_snapshots(run_dir)
    assert not (run_dir.parent / "x.safetensors").exists() and not (run_dir.parent / "y.safetensors").exists()


def test_missing_tampered_foreign_or_escaping_side_files_are_clear_errors(frozen_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(frozen_run["run_dir"], run_dir)
    (name,) = side_files(run_dir)
    side = run_dir / rf.BANKS / name
    latest, stage = run_dir / rf.SNAPSHOT, run_dir / rf.stage_snapshot_file(40)
    good = side.read_bytes()
    # tampered: one byte of the frozen tensors flipped
    data = bytearray(good)
    data[-3] ^= 0x40
    side.write_bytes(bytes(data))
    for snap in (latest, stage):
        with pytest.raises(ValueError, match=f"{name}.* is corrupt"):
            load_snapshot(snap)
        with pytest.raises(ValueError, match=f"{name}.* is corrupt"):
            verify_snapshot(snap)
        with pytest.raises(ValueError, match=f"{name}.* is corrupt"):
            SF.export_variant(SF.open_snapshot(snap), "0.9", tmp_path / "x.safetensors")
    with pytest.raises(ExportError, match=f"{name}.* is corrupt"):
        SF.export_from_run(run_dir, "0.9", tmp_path / "y.safetensors")
    # missing
    side.unlink()
    for snap in (latest, stage):
        _all_readers_refuse(run_dir, snap, f"frozen side file .*{name}.* is missing")
    with pytest.raises(ValueError, match="missing"):
        attach(Frozen(), run_dir=run_dir, resume=True, decays=DECAYS)
    # foreign: another run's side file under the expected name
    other = tmp_path / "other"
    model, opt, scope = start(other, decays=DECAYS)
    with torch.no_grad():
        model.base[0].bias.add_(1.0)
    scope.close()
    shutil.copy(other / rf.BANKS / side_files(other)[0], side)
    for snap in (latest, stage):
        _all_readers_refuse(run_dir, snap, "is not the frozen side file")
    side.write_bytes(good)
    # hostile: the side file's __metadata__ is a list, not an object of strings
    n = int.from_bytes(good[:8], "little")
    head = json.loads(good[8:8 + n])
    head["__metadata__"] = ["x"]
    raw = json.dumps(head).encode()
    raw += b" " * (-len(raw) % 8)
    side.write_bytes(len(raw).to_bytes(8, "little") + raw + good[8 + n:])
    for snap in (latest, stage):
        _all_readers_refuse(run_dir, snap, "side file")
    assert remove_unreferenced(run_dir) == []
    side.write_bytes(good)
    # a reference outside banks/ (a valid side file is there, it must not be followed)
    shutil.copy(side, run_dir / name)
    for ref in (f"../{name}", f"/{run_dir}/{name}", "frozen-XYZ.safetensors"):
        _rewrite_meta(latest, **{rf.SNAPSHOT_FROZEN_FILE_KEY: ref})
        _rewrite_meta(stage, **{rf.SNAPSHOT_FROZEN_FILE_KEY: ref})
        for snap in (latest, stage):
            _all_readers_refuse(run_dir, snap, "bad frozen side-file reference")
    assert remove_unreferenced(run_dir) == []  # an unreadable reference: nothing is deleted
    assert side.exists() and (run_dir / name).exists()


def test_save_snapshot_with_a_store_of_another_folder_is_refused(frozen_run, tmp_path):
    from emascope.frozenfile import FrozenStore

    bank = load_snapshot(frozen_run["run_dir"] / rf.SNAPSHOT)
    with pytest.raises(ValueError, match="not the snapshot's folder"):
        save_snapshot(bank, tmp_path / "a" / "s.safetensors", frozen=FrozenStore(tmp_path / "b"))
    with pytest.raises(ValueError, match="reserved"):
        save_snapshot(bank, tmp_path / "s.safetensors", {rf.SNAPSHOT_FROZEN_FILE_KEY: "x"})
    store = FrozenStore(tmp_path)  # a model-less bank's frozen values: written once, then reused
    save_snapshot(bank, tmp_path / "s1.safetensors", frozen=store)
    save_snapshot(bank, tmp_path / "s2.safetensors", frozen=store)
    assert store.writes == 1 and len([p for p in tmp_path.iterdir() if rf.is_frozen_file_name(p.name)]) == 1
    _same_bank(load_snapshot(tmp_path / "s2.safetensors"), bank)
