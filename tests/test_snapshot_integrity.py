"""Snapshots that cannot hurt or lie (issue 15): a crafted header is refused before anything is
allocated, random bit flips are caught by the checksum (never a silently wrong weight set), and
the shipped snapshots written before checksums existed still load, with a notice.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from pathlib import Path

import pytest
import torch
from bank_helpers import make_tiny, random_step
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scope_helpers import Denoiser, mixture, train_step

import emascope.snapshot as snap
from emascope import attach
from emascope import runformat as rf
from emascope.bank import EMABank
from emascope.cli import main as cli_main
from emascope.dashboard import exporting

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "sample_runs" / "runs").glob(f"*/{rf.SNAPSHOT}"))


def _bank() -> EMABank:
    model = make_tiny(3)
    gen = torch.Generator().manual_seed(3)
    bank = EMABank(model, (0.5, 0.9, 0.99), bema=True, average_buffers=True)
    for _ in range(7):
        random_step(model, gen)
        bank.update()
    return bank


def _parts(path: Path) -> tuple[dict, dict, dict]:
    """(tensors, metadata, JSON state) of a snapshot file."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    return load_file(str(path)), meta, json.loads(meta[rf.SNAPSHOT_META_KEY])


def _rewrite(path: Path, tensors: dict, meta: dict, state: dict | None = None, checksum: bool = False) -> Path:
    meta = dict(meta)
    if state is not None:
        meta[rf.SNAPSHOT_META_KEY] = json.dumps(state)
    meta.pop(rf.SNAPSHOT_CHECKSUM_KEY, None)
    if checksum:
        meta[rf.SNAPSHOT_CHECKSUM_KEY] = snap.snapshot_checksum(tensors, meta)
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.fixture()
def good(tmp_path) -> Path:
    path = tmp_path / "good.safetensors"
    snap.save_snapshot(_bank(), path, metadata={"run_id": "r", "step": "7"})
    return path


@pytest.fixture()
def no_allocation(monkeypatch):
    """Fail the test if a snapshot's tensors are read or a bank is built from it."""
    def refuse(*a, **k):
        raise AssertionError("allocated before the header was validated")
    monkeypatch.setattr(snap, "load_file", refuse)
    monkeypatch.setattr(EMABank, "from_state", classmethod(lambda cls, *a, **k: refuse()))


# ------------------------------------------------------------------ crafted headers


def _craft(good: Path, tmp_path: Path, edit) -> Path:
    tensors, meta, state = _parts(good)
    edit(tensors, state)
    return _rewrite(tmp_path / "crafted.safetensors", tensors, meta, state, checksum=True)


CRAFTS = {
    # the reported attack: numel = 2e9 made from_state allocate ~24 GB before any check
    "numel": (lambda t, s: s.update(numel=2_000_000_000), "[4, 2000000000]"),
    "layout numel": (lambda t, s: s["layout"][0].update(numel=2_000_000_000), "numel"),
    "offset": (lambda t, s: s["layout"][0].update(offset=12345), "offset"),
    "200k decays": (lambda t, s: s.update(decays=[i / 200_001 for i in range(200_000)]), "1 to 4096 decays"),
    "rows": (lambda t, s: s.update(decays=s["decays"][:2]), "tensor 'bank'"),
    "live shape": (lambda t, s: s["layout"][0].update(shape=[40000, 50000]), "live/"),
    "live dtype": (lambda t, s: s["layout"][0].update(dtype="float64"), "live/"),
    "kind": (lambda t, s: s["layout"][0].update(kind="evil"), "malformed"),
    "extra tensor": (lambda t, s: t.update(extra=torch.zeros(3)), "unexpected tensors"),
    "bad step": (lambda t, s: s.update(step=-1), "step"),
}


@pytest.mark.parametrize("case", sorted(CRAFTS))
def test_crafted_header_is_refused_before_anything_is_allocated(good, tmp_path, no_allocation, case):
    edit, needle = CRAFTS[case]
    crafted = _craft(good, tmp_path, edit)
    t = time.perf_counter()
    with pytest.raises(ValueError, match="malformed bank snapshot") as exc:
        snap.load_snapshot(crafted)
    assert needle in str(exc.value)
    assert time.perf_counter() - t < 5.0  # 200,000 decays took 269 s of CPU


def test_decay_sets_are_bounded_and_checked_in_linear_time():
    """The duplicate check was quadratic (200,000 decays: minutes); a bank holds at most 4096."""
    from emascope.ema_math import validate_decays

    many = [i / (rf.MAX_DECAYS + 1) for i in range(rf.MAX_DECAYS)]
    t = time.perf_counter()
    assert len(validate_decays(many)) == rf.MAX_DECAYS
    assert time.perf_counter() - t < 1.0
    with pytest.raises(ValueError, match="at most 4096"):
        validate_decays([i / 200_001 for i in range(200_000)])
    with pytest.raises(ValueError, match="at most 4096"):
        EMABank(make_tiny(), many + [0.999999])


def test_deeply_nested_state_json_is_a_clear_error(good, tmp_path, no_allocation):
    tensors, meta, _ = _parts(good)
    meta[rf.SNAPSHOT_META_KEY] = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ValueError, match="bad 'emascope' metadata"):
        snap.load_snapshot(_rewrite(tmp_path / "deep.safetensors", tensors, meta))


def test_crafted_snapshot_in_the_dashboard_export_path(tmp_path):
    """The dashboard's finished-run export (a child process) refuses it with a short message."""
    run_dir = tmp_path / "run"
    (run_dir / "banks").mkdir(parents=True)
    (run_dir / "exports").mkdir()
    snap.save_snapshot(_bank(), run_dir / rf.SNAPSHOT)
    tensors, meta, state = _parts(run_dir / rf.SNAPSHOT)
    state["numel"] = 2_000_000_000
    _rewrite(run_dir / rf.SNAPSHOT, tensors, meta, state, checksum=True)
    with pytest.raises(RuntimeError, match="malformed bank snapshot.*2000000000"):
        exporting.export_from_snapshot(run_dir, "0.9", "m")
    assert list((run_dir / "exports").iterdir()) == []


# ------------------------------------------------------------------ checksums and bit flips


def _same_bank(a: EMABank, b: EMABank) -> bool:
    if a.variants != b.variants or a.step != b.step:
        return False
    for v in a.variants:
        sa, sb = a.materialize(v), b.materialize(v)
        if sa.keys() != sb.keys() or any(sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


def test_random_bit_flips_never_load_as_silently_wrong_weights(good, tmp_path):
    """300 random single-bit flips anywhere in the file: each load fails with a ValueError naming the
    file, or gives exactly the original bank (a flip in padding). 46 loaded wrong weights before."""
    original = snap.load_snapshot(good)
    data = bytearray(good.read_bytes())
    header_len = 8 + int.from_bytes(data[:8], "little")
    rng = random.Random(15)
    flipped = tmp_path / "flipped.safetensors"
    outcomes = {"refused": 0, "identical": 0, "checksum": 0}
    wrong = []
    for i in range(300):
        pos = rng.randrange(len(data)) if i % 3 else rng.randrange(header_len, len(data))  # 1/3 in tensor data
        bit = 1 << rng.randrange(8)
        data[pos] ^= bit
        flipped.write_bytes(data)
        data[pos] ^= bit
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a flip must not turn it into an "old, unverified" snapshot
                loaded = snap.load_snapshot(flipped)
        except ValueError as exc:
            assert "flipped.safetensors" in str(exc)
            outcomes["refused"] += 1
            outcomes["checksum"] += "checksum" in str(exc)
            continue
        if _same_bank(loaded, original):
            outcomes["identical"] += 1
        else:
            wrong.append(pos)
    assert wrong == [], f"silently wrong weights for flips at {wrong[:10]} ({outcomes})"
    assert outcomes["checksum"] >= 90  # every flip in the tensor data is caught by the checksum


def test_checksum_is_stored_and_checked_on_export_and_resume(tmp_path, capsys):
    torch.manual_seed(0)
    model = Denoiser(width=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data, g = mixture(200, seed=1), torch.Generator().manual_seed(0)
    run_dir = tmp_path / "run"
    with attach(model, opt, run_dir=run_dir, score_every=None, decays=(0.9,)):
        for _ in range(3):
            train_step(model, opt, data, g, batch=16)
    path = run_dir / rf.SNAPSHOT
    tensors, meta, _ = _parts(path)
    assert meta[rf.SNAPSHOT_CHECKSUM_KEY] == snap.snapshot_checksum(tensors, meta)
    assert meta[rf.SNAPSHOT_CHECKSUM_KEY].startswith("sha256:")
    tensors["bank"][0, 0] += 1.0  # one weight changed behind the checksum's back
    _rewrite(path, tensors, meta)
    meta_kept = dict(meta)
    save_file(tensors, str(path), metadata=meta_kept)  # the old checksum kept: a corrupt file
    assert cli_main(["export", str(run_dir), "--variant", "0.9"]) == 2
    assert "corrupt" in capsys.readouterr().err
    with pytest.raises(ValueError, match="corrupt"):
        attach(model, opt, run_dir=run_dir, resume=True, score_every=None, decays=(0.9,))


def test_verify_snapshot_checks_a_file_read_in_place(good, tmp_path):
    """For readers that use a snapshot's tensors in place (synthesis, sharded readers): the same
    header and checksum checks as load_snapshot, without building a bank."""
    state = snap.verify_snapshot(good)
    assert state["decays"] == [0.5, 0.9, 0.99] and state["step"] == 7
    tensors, meta, _ = _parts(good)
    tensors["bank"].view(-1)[-1] += 1e-3  # the last weight of the last row, behind the checksum's back
    damaged = tmp_path / "damaged.safetensors"
    save_file(tensors, str(damaged), metadata=meta)
    with pytest.raises(ValueError, match="damaged.safetensors' is corrupt"):
        snap.verify_snapshot(damaged)
    crafted = _craft(good, tmp_path, CRAFTS["numel"][0])
    with pytest.raises(ValueError, match="malformed bank snapshot"):
        snap.verify_snapshot(crafted)
    old = _rewrite(tmp_path / "old.safetensors", *_parts(good)[:2])  # no checksum: an older emascope
    notes: list[str] = []
    assert snap.verify_snapshot(old, notice=notes.append)["step"] == 7
    assert len(notes) == 1 and "used without verifying" in notes[0]
    with pytest.warns(snap.UnverifiedSnapshotWarning):
        snap.verify_snapshot(old)


# ------------------------------------------------------------------ older snapshots


@pytest.mark.parametrize("path", SHIPPED, ids=[p.parts[-3] for p in SHIPPED])
def test_shipped_snapshots_without_checksum_still_load_with_a_notice(path):
    with safe_open(str(path), framework="pt") as f:
        assert rf.SNAPSHOT_CHECKSUM_KEY not in f.metadata()  # written before checksums existed
    with pytest.warns(snap.UnverifiedSnapshotWarning, match="no checksum"):
        bank = snap.load_snapshot(path)
    notes: list[str] = []
    assert _same_bank(snap.load_snapshot(path, notice=notes.append), bank)
    assert len(notes) == 1 and "without verifying" in notes[0]


def test_resume_from_an_unverified_snapshot_writes_a_notice(tmp_path, capsys):
    torch.manual_seed(0)
    model = Denoiser(width=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data, g = mixture(200, seed=1), torch.Generator().manual_seed(0)
    run_dir = tmp_path / "run"
    with attach(model, opt, run_dir=run_dir, score_every=None, decays=(0.9,)):
        for _ in range(3):
            train_step(model, opt, data, g, batch=16)
    tensors, meta, _ = _parts(run_dir / rf.SNAPSHOT)
    _rewrite(run_dir / rf.SNAPSHOT, tensors, meta)  # as an older emascope wrote it: no checksum
    assert cli_main(["export", str(run_dir), "--variant", "0.9"]) == 0
    assert "note:" in capsys.readouterr().err
    with attach(model, opt, run_dir=run_dir, resume=True, score_every=None, decays=(0.9,)) as scope:
        assert scope.current_step == 3
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    notes = [e for e in events if e["type"] == "notice" and e.get("where") == "resume"]
    assert len(notes) == 1 and "no checksum" in notes[0]["message"]
    _, meta2, _ = _parts(run_dir / rf.SNAPSHOT)
    assert rf.SNAPSHOT_CHECKSUM_KEY in meta2  # the next snapshot has one again
