"""Sharded banks on real torch.distributed process groups (gloo, CPU): DDP with 2 and 3 ranks and
FSDP2 (``fully_shard``) with 2 and 3 ranks against a single-process EMABank on the same trajectory.

Each job (tests/dist_workers.py ``bank_worker``) trains a tiny model for a few steps and checks on
every rank: every decay, BEMA and the bias correction bit-identical to the single-process bank
(``variant_flat``, ``materialize``, ``stream_variant``, ``swap``), zero collectives during updates
(counted by emascope.collectives.CollectiveCounter), resume at the same world size bit-exact and
re-sharding from a single-process snapshot (and, at W = 3, from the W = 2 job's DDP and FSDP2
snapshots), the host placement (``device="cpu"``) of a sharded bank (DDP and FSDP2), FSDP2's own
``MixedPrecisionPolicy`` (fp32 shards, bf16 compute), and a swap's collectives (none with FSDP2, one
all-gather each way with DDP).
Here, in the parent: per-rank bank bytes = total / W within one block, and the offline readers
(no process group): exports from the sharded snapshots equal the single-process exports file for
file, the consolidated bank equals the single-process one, and ``emascope export`` works on a
sharded run.
"""

from __future__ import annotations

import pytest
import torch
from dist_workers import BANK_DECAYS, bank_worker, spawn
from safetensors import safe_open
from safetensors.torch import load_file

from emascope import runformat as rf
from emascope import shardfiles as SF
from emascope.snapshot import export_checkpoint, load_snapshot

pytestmark = pytest.mark.distributed


def _export_pair(tmp_path, kind: str, variant: str, dtype=None) -> tuple[dict, dict, dict, dict]:
    """The same variant exported from the sharded snapshot and from the single-process one."""
    snap = SF.open_snapshot(tmp_path / kind / rf.SNAPSHOT_INDEX)
    a = SF.export_variant(snap, variant, tmp_path / f"a-{kind}-{variant}.safetensors", dtype=dtype)
    ref = load_snapshot(tmp_path / f"ref_{kind}.safetensors")
    b = export_checkpoint(ref, variant, tmp_path / f"b-{kind}-{variant}.safetensors", dtype=dtype,
                          run_id=f"{kind}-run")
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        meta_a, meta_b = fa.metadata(), fb.metadata()
    return load_file(str(a)), load_file(str(b)), meta_a, meta_b


def _check_world(tmp_path, results, world: int) -> None:
    for r in results:
        assert r["ddp_comm"] == [0, 0] and r["fsdp_comm"] == [0, 0], r  # nothing communicated per update
    for i in range(2):  # per-rank bank bytes: total / W within one block (rows + BEMA's theta0)
        total = results[0]["ddp_total"][i]
        got = [r["ddp_nbytes"][i] for r in results]
        assert all(abs(n - total / world) <= results[0]["ddp_block_bytes"] for n in got), (got, total)
        assert sum(got) >= total and sum(got) - total <= world * results[0]["ddp_block_bytes"]
    assert sum(r["fsdp_local_numel"] for r in results) == results[0]["fsdp_numel"]
    total = results[0]["fsdp_total"]
    assert all(abs(r["fsdp_nbytes"] - total / world) <= results[0]["ddp_block_bytes"] for r in results)
    # offline: exports from the per-rank files equal the single-process exports, tensors and metadata
    variants = ["raw", *[rf.variant_name(d) for d in BANK_DECAYS], "bema"]
    for kind in ("ddp", "fsdp"):
        for v in variants:
            a, b, meta_a, meta_b = _export_pair(tmp_path, kind, v)
            assert set(a) == set(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in b), v
            meta_a.pop("emascope_version"), meta_b.pop("emascope_version")
            assert meta_a == meta_b, (meta_a, meta_b)
        a, b, _, _ = _export_pair(tmp_path, kind, "bema", dtype="float32")
        assert all(torch.equal(a[k], b[k]) for k in b)
        whole = SF.load_bank(tmp_path / kind / rf.SNAPSHOT_INDEX)
        ref = load_snapshot(tmp_path / f"ref_{kind}.safetensors")
        assert torch.equal(whole.state_dict()["bank"], ref.state_dict()["bank"])
        assert torch.equal(whole.state_dict()["theta0"], ref.state_dict()["theta0"])


def _corrupt_rank_file_is_refused(tmp_path, world: int) -> None:
    """Every rank file carries a checksum; a flipped byte in one is refused by the offline readers."""
    import shutil

    src = tmp_path / "ddp"
    bad = tmp_path / "ddp-corrupt"
    shutil.copytree(src, bad)
    snap = SF.open_snapshot(bad / rf.SNAPSHOT_INDEX)
    for f in snap.files:
        with safe_open(str(f.path), "pt") as fh:
            assert fh.metadata()[rf.SNAPSHOT_CHECKSUM_KEY].startswith("sha256:")
    assert SF.verify_rank_files(snap) == []
    target = snap.files[world - 1].path
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x10  # a bit of the last tensor's data
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        SF.export_variant(snap, "0.9", tmp_path / "never.safetensors")
    with pytest.raises(ValueError, match="checksum mismatch"):
        SF.load_bank(bad / rf.SNAPSHOT_INDEX)
    assert not (tmp_path / "never.safetensors").exists()


@pytest.mark.slow
def test_sharded_banks_two_then_three_ranks(tmp_path):
    from emascope.export_cli import main as export_main

    two, three = tmp_path / "w2", tmp_path / "w3"
    two.mkdir()
    three.mkdir()
    results = spawn(bank_worker, 2, ("",), str(two))
    _check_world(two, results, 2)
    _corrupt_rank_file_is_refused(two, 2)
    # `emascope export` on a directory whose latest snapshot is the sharded set: offline consolidation
    out = tmp_path / "cli.safetensors"
    assert export_main([str(two / "ddp"), "--variant", "0.9", "--out", str(out)]) == 0
    ref = export_checkpoint(load_snapshot(two / "ref_ddp.safetensors"), "0.9", tmp_path / "ref.safetensors")
    a, b = load_file(str(out)), load_file(str(ref))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
    assert export_main([str(two / "ddp"), "--variant", "0.42", "--out", str(out)]) == 2
    # W = 3 (uneven: 1, 1, 2 blocks; an FSDP2 rank without a row of the last layer), and the W = 2
    # job's DDP snapshot re-sharded over 3 ranks (its own trajectory: compared with its reference)
    reshard = (f"{two / 'ddp' / rf.SNAPSHOT_INDEX}|{two / 'ref_ddp.safetensors'}|"
               f"{two / 'fsdp' / rf.SNAPSHOT_INDEX}|{two / 'ref_fsdp.safetensors'}")
    results = spawn(bank_worker, 3, (reshard,), str(three))
    assert all(r.get("resharded") and r.get("fsdp_resharded") for r in results)
    _check_world(three, results, 3)
