"""EMABank files: snapshots (save/load without the model) and .safetensors exports, written atomically."""

from __future__ import annotations

import json
import os

import pytest
import torch
from bank_helpers import TinyNet, make_tiny, random_step
from safetensors import safe_open
from safetensors.torch import load_file

from emascope.bank import EMABank
from emascope.snapshot import export_checkpoint, load_snapshot, save_snapshot, snapshot_metadata

torch.set_num_threads(1)


def _trained_bank(seed: int = 30, **kw) -> tuple[TinyNet, EMABank]:
    model = make_tiny(seed)
    bank = EMABank(model, [0.9, 0.99, 0.999], **kw)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(25):
        random_step(model, gen)
        model(torch.randn(8, 6, generator=gen))  # BatchNorm statistics move too
        bank.update()
    return model, bank


def _no_temp_files(folder) -> None:
    leftovers = [p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize("kw", [{}, {"bema": True, "bias_correction": True, "update_every": 2},
                                {"average_buffers": True}])
def test_snapshot_round_trip_without_the_model(tmp_path, kw):
    model, bank = _trained_bank(**kw)
    path = tmp_path / "banks" / "latest.safetensors"
    nbytes = save_snapshot(bank, path, metadata={"run_id": "r1", "step": "25"})
    assert nbytes == path.stat().st_size > bank.state_dict()["bank"].numel() * 4
    _no_temp_files(path.parent)
    loaded = load_snapshot(path)
    assert not loaded.has_model
    assert snapshot_metadata(path) == {"run_id": "r1", "step": "25"}
    assert loaded.variants == bank.variants and loaded.decays == bank.decays
    assert loaded.step == bank.step == 25 and loaded.num_skipped == bank.num_skipped
    for v in bank.variants:
        a, b = bank.materialize(v), loaded.materialize(v)
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), (v, k)
            assert a[k].dtype == b[k].dtype
    with pytest.raises(RuntimeError, match="no model"):
        loaded.update()
    # a snapshot bank can swap into a fresh model and restore it
    fresh = TinyNet()
    before = {k: t.clone() for k, t in fresh.state_dict().items()}
    with loaded.swap(fresh, "0.99"):
        assert torch.equal(fresh.fc2.weight, bank.materialize("0.99")["fc2.weight"])
    assert all(torch.equal(t, before[k]) for k, t in fresh.state_dict().items())
    # and a snapshot is a resumable state: load it into a bank built on the model
    resumed = EMABank(model, [0.9, 0.99, 0.999], **kw)
    resumed.load_state_dict(loaded.state_dict())
    assert torch.equal(resumed.state_dict()["bank"], bank.state_dict()["bank"])


def test_snapshot_is_plain_safetensors_with_json_layout(tmp_path):
    _, bank = _trained_bank()
    path = tmp_path / "snap.safetensors"
    save_snapshot(bank, path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["emascope"])
        keys = set(f.keys())
    assert meta["decays"] == [0.9, 0.99, 0.999] and meta["step"] == 25
    assert {"bank", "applied", "bc_pow", "live/fc1.weight", "live/bn.num_batches_tracked"} <= keys


def test_snapshot_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no bank snapshot"):
        load_snapshot(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not an emascope bank snapshot"):
        load_snapshot(other)
    _, bank = _trained_bank()
    with pytest.raises(ValueError, match="reserved"):
        save_snapshot(bank, tmp_path / "x.safetensors", metadata={"emascope": "x"})
    with pytest.raises(ValueError, match="str to str"):
        save_snapshot(bank, tmp_path / "x.safetensors", metadata={"step": 3})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == [other]


@pytest.mark.parametrize("variant", ["0.99", "raw", "bema"])
def test_export_round_trip_into_a_fresh_model(tmp_path, variant):
    model, bank = _trained_bank(bema=True)
    model.eval()
    path = export_checkpoint(bank, variant, tmp_path / "export.safetensors", metadata={"run_id": "r1"})
    assert path == tmp_path / "export.safetensors"
    _no_temp_files(tmp_path)
    fresh = TinyNet().eval()
    fresh.load_state_dict(load_file(path))  # strict: exactly the model's keys
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    reference = TinyNet().eval()
    reference.load_state_dict(bank.materialize(variant))
    assert torch.equal(fresh(x), reference(x))
    if variant == "raw":
        assert torch.equal(fresh(x), model(x))
    else:
        assert not torch.equal(fresh(x), model(x))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["variant"] == variant and meta["step"] == "25" and meta["run_id"] == "r1"
    assert meta["decay"] == ("0.99" if variant == "0.99" else "")


def test_export_dtype_and_snapshot_bank_export(tmp_path):
    model, bank = _trained_bank()
    p16 = export_checkpoint(bank, 0.999, tmp_path / "half.safetensors", dtype="bfloat16")
    sd = load_file(p16)
    assert sd["fc1.weight"].dtype == torch.bfloat16 and sd["bn.num_batches_tracked"].dtype == torch.int64
    with pytest.raises(ValueError, match="dtype"):
        export_checkpoint(bank, 0.999, tmp_path / "bad.safetensors", dtype="int8")
    save_snapshot(bank, tmp_path / "snap.safetensors")
    loaded = load_snapshot(tmp_path / "snap.safetensors")
    p = export_checkpoint(loaded, "0.9", tmp_path / "from_snapshot.safetensors")
    a, b = load_file(p), bank.materialize("0.9")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)


def test_export_is_atomic(tmp_path):
    _, bank = _trained_bank()
    target = tmp_path / "export.safetensors"
    target.write_bytes(b"old contents")
    # replacing a directory fails at os.replace: the old target stays, no temp file is left behind
    blocked = tmp_path / "blocked.safetensors"
    blocked.mkdir()
    with pytest.raises(OSError):
        export_checkpoint(bank, "0.9", blocked)
    assert blocked.is_dir()
    _no_temp_files(tmp_path)
    export_checkpoint(bank, "0.9", target)
    assert len(load_file(target)) == len(bank.materialize("0.9"))
    _no_temp_files(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["blocked.safetensors", "export.safetensors"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    import emascope.snapshot as ckpt

    _, bank = _trained_bank()
    target = tmp_path / "export.safetensors"
    export_checkpoint(bank, "0.9", target)
    old = target.read_bytes()

    def half_write(tensors, filename, metadata=None):  # a full disk in the middle of the write
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", half_write)
    with pytest.raises(OSError, match="No space"):
        export_checkpoint(bank, "0.99", target)
    with pytest.raises(OSError, match="No space"):
        save_snapshot(bank, tmp_path / "snap.safetensors")
    assert target.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["export.safetensors"]


def test_corrupt_or_malformed_snapshot_is_a_clear_error(tmp_path):
    _, bank = _trained_bank()
    good = tmp_path / "snap.safetensors"
    save_snapshot(bank, good)
    data = good.read_bytes()
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(data[: len(data) // 2])  # a torn copy (e.g. copied while being written elsewhere)
    with pytest.raises(ValueError, match="torn.safetensors"):
        load_snapshot(torn)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a readable"):
        load_snapshot(garbage)
    # valid file, metadata without the layout
    from safetensors.torch import save_file

    tensors = load_file(good)
    with safe_open(str(good), framework="pt") as f:
        state = json.loads(f.metadata()["emascope"])
    del state["layout"]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata={"emascope": json.dumps(state)})
    with pytest.raises(ValueError, match="malformed bank snapshot.*layout"):
        load_snapshot(broken)
