"""attach() under real torch.distributed: 2 CPU processes, gloo, a DDP-wrapped model, scoring on.

``sharded`` (the default with more than one rank): every rank attaches and holds 1/W of the bank,
sweeps run on every rank (each draws its share of the sample batches, rank 0 gathers the features
and writes), snapshots are written per rank with an index, exports and export requests are
collectives. The metrics of a stage equal those of a one-process sweep over the same bank and
weights with the same seeds (recomputed here from the run's own sharded snapshot), for DDP and for
FSDP2 (``fully_shard``, a collective sampler); the FSDP2 run resumed with ``attach(resume=True)``
at the same world size reloads every rank's shard bit-exactly, the DDP run resumed by one process
re-shards. ``rank0`` (``shard=False``): only rank 0 builds a
bank, scores and writes; rank 1 neither writes nor hangs. The process group's timeout is short,
so a deadlock surfaces as an error; the job runs under a timeout and its processes are killed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dist_workers import DECAYS, STEPS, agent_hooks, agent_worker, spawn
from safetensors.torch import load_file

from emascope import runformat as rf
from emascope import shardfiles as SF

pytestmark = pytest.mark.distributed


def _events(run_dir):
    return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]


def _metrics(run_dir, step):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["step"] == step:
            out[(r["variant"], r["metric"])] = r["value"]
    return out


def _one_process_sweep(run_dir, tmp_path, step, **cfg):
    """The same stage scored by one process: the run's own sharded snapshot (consolidated offline),
    a fresh model, the same hooks and seeds."""
    from scope_helpers import Denoiser

    from emascope.config import Hooks, ScoringConfig
    from emascope.rundir import RunWriter, prepare_run_dir
    from emascope.scoring import Scorer

    bank = SF.load_bank(run_dir / rf.SNAPSHOT_INDEX)
    assert bank.step == step
    out = prepare_run_dir(tmp_path / f"one-{run_dir.name}")
    scorer = Scorer(ScoringConfig(**cfg), Hooks(**agent_hooks()), RunWriter(out), out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on the ranks: a matmul's rounding depends on the thread count
    try:
        res = scorer.sweep(Denoiser(), bank, list(bank.variants), step)
    finally:
        torch.set_num_threads(threads)
    return res, out


def _check_same_as_one_process(run_dir, tmp_path, step, **cfg):
    res, one = _one_process_sweep(run_dir, tmp_path, step, **cfg)
    got = _metrics(run_dir, step)
    want = {(v, m): val for v, scores in res.scores.items() for m, val in scores.items()}
    assert len(want) == len(DECAYS + ("raw",)) * 8 and got == want  # bit for bit (JSON floats round-trip)
    # the paired comparisons with the best (intervals) too
    (comp,) = [e for e in _events(run_dir) if e["type"] == "comparison" and e["step"] == step]
    (comp_one,) = [e for e in _events(one) if e["type"] == "comparison"]
    assert comp["metrics"] and comp["metrics"] == comp_one["metrics"] and comp["level"] == comp_one["level"]
    for v in ["raw", *[rf.variant_name(d) for d in DECAYS]]:  # the previews are the same points
        a = np.load(run_dir / rf.preview_file(step, v, ".npy"))
        b = np.load(one / rf.preview_file(step, v, ".npy"))
        assert np.array_equal(a, b), v


def test_sharded_ddp_and_fsdp2_score_on_every_rank_like_one_process(tmp_path):
    r0, r1 = spawn(agent_worker, 2, ("sharded",), str(tmp_path))
    run_dir = tmp_path / "run"
    for k, v in r0["weights"].items():  # DDP kept the replicas equal
        assert torch.equal(v, r1["weights"][k]), k
    assert r0["is_writer"] and not r1["is_writer"] and r0["sharded"] and r1["sharded"]
    assert r0["external_refused"] and r1["external_refused"]  # scoring='external' with a sharded bank
    assert r0["search_refused"] and r1["search_refused"]  # search_evals (post-hoc synthesis) likewise
    assert r0["score_now"] and not r1["score_now"] and r0["export"] and not r1["export"]
    # a refused export target (a file of the run) and a live pretrained format: ValueError on both ranks
    assert "run.json" in r0["refused"][0] and r1["refused"][0].startswith("export refused on rank 0:")
    assert all("written offline" in r["refused"][1] for r in (r0, r1))
    assert not r0["bank_is_none"] and not r1["bank_is_none"] and r1["current_step"] == STEPS
    # rank 0 alone wrote the run's files; every rank wrote its snapshot file
    info = json.loads((run_dir / "run.json").read_text())
    hb = json.loads((run_dir / "heartbeat").read_text())
    assert info["pid"] == hb["pid"] == r0["pid"] and hb["state"] == "closed"
    assert info["settings"]["placement"] == "sharded" and info["settings"]["world_size"] == 2
    assert info["settings"]["sharding"] == "ddp" and info["memory_plan"]["choice"] == "sharded"
    events = _events(run_dir)
    assert [e["type"] for e in events].count("start") == 1 and events[-1]["type"] == "close"
    assert not [e for e in events if e["type"] == "error"], [e for e in events if e["type"] == "error"]
    done = [e for e in events if e["type"] == "score_done"]
    assert [e["step"] for e in done] == [4, 8, STEPS] and all(e["world_size"] == 2 for e in done)
    assert all(e["scorer"] == "inline" for e in done)  # the default scoring="background": at the step
    assert [e for e in events if e["type"] == "notice" and e.get("where") == "background"]
    assert all((run_dir / rf.stage_done_file(s)).is_file() for s in (4, 8, STEPS))
    assert all(e["num_samples"] == 100 for e in done)
    snaps = [e for e in events if e["type"] == "snapshot"]
    assert [e["step"] for e in snaps] == [4, 8, STEPS] and {e["path"] for e in snaps} == {rf.SNAPSHOT_INDEX}
    banks = sorted(p.name for p in (run_dir / rf.BANKS).iterdir())
    assert banks == sorted([rf.SNAPSHOT_INDEX.split("/")[-1]] + [rf.snapshot_shard_file(STEPS, r, 2).split("/")[-1]
                                                                  for r in range(2)])  # older sets pruned
    # the sharded snapshot is rank 0's whole bank (its own independent bank of its replica)
    whole = SF.load_bank(run_dir / rf.SNAPSHOT_INDEX)
    assert torch.equal(whole.state_dict()["bank"], r0["own_bank"])
    # exports: scope.export (a collective) and the dashboard request (served at the step-4 snapshot)
    exported = load_file(str(run_dir / rf.export_file(rf.default_export_name("0.99", STEPS))))
    snap = SF.open_snapshot(run_dir / rf.SNAPSHOT_INDEX)
    ref = SF.export_variant(snap, "0.99", tmp_path / "ref.safetensors")
    want = load_file(str(ref))
    assert set(exported) == set(want) and all(torch.equal(exported[k], want[k]) for k in want)
    status = json.loads((run_dir / rf.status_file("req1")).read_text())
    assert status["state"] == "done" and status["step"] == 4 and status["variant"] == "0.9"
    assert (run_dir / rf.export_file("from-dashboard")).is_file() and not (run_dir / rf.request_file("req1")).exists()
    # a synthesised decay: refused with its reason (a sharded bank writes no stage snapshots; a notice says so)
    status = json.loads((run_dir / rf.status_file("req2")).read_text())
    assert status["state"] == "error" and "sharded" in status["error"], status
    assert not (run_dir / rf.export_file("synth")).exists() and not (run_dir / rf.request_file("req2")).exists()
    assert not [p for p in (run_dir / rf.BANKS).iterdir() if rf.parse_stage_snapshot_name(p.name) is not None
                or rf.parse_lead_in_snapshot_name(p.name) is not None]
    assert any(e["type"] == "notice" and e.get("where") == "snapshot" and "post-hoc synthesis" in e["message"]
               for e in events)
    # every stage's metrics are the one-process metrics (the last stage recomputed here)
    _check_same_as_one_process(run_dir, tmp_path, STEPS, num_samples=100, batch_size=30)
    _resume_in_one_process(run_dir, r0)
    # FSDP2: the sampler ran the sharded model collectively (3 batches over 2 ranks)
    assert r0["fsdp_sharded"] == "fsdp" and r0["fsdp_resumed"] and r1["fsdp_resumed"]
    fsdp_dir = tmp_path / "fsdp"
    events = _events(fsdp_dir)
    assert not [e for e in events if e["type"] == "error"], [e for e in events if e["type"] == "error"]
    assert [e["step"] for e in events if e["type"] == "score_done"] == [3, 6]
    _check_same_as_one_process(fsdp_dir, tmp_path, 6, num_samples=70, batch_size=30)


def _resume_in_one_process(run_dir, r0):
    """The sharded run continued by one process (another world size): the bank re-shards from the
    rank files, the step continues, and the next snapshot replaces the sharded set with a single file."""
    from scope_helpers import Denoiser

    from emascope import attach

    model = Denoiser()
    model.load_state_dict(r0["weights"])
    scope = attach(model, run_dir=run_dir, resume=True, decays=DECAYS, score_every=None)
    assert not scope.sharded and scope.current_step == STEPS and scope.bank.step == STEPS
    assert torch.equal(scope.bank.state_dict()["bank"], r0["own_bank"])  # rank 0's whole bank, bit for bit
    scope.step()
    scope.close()
    resumed = [e for e in _events(run_dir) if e["type"] == "resume"]
    assert resumed and resumed[-1]["snapshot_step"] == STEPS
    assert (run_dir / rf.SNAPSHOT).is_file() and not (run_dir / rf.SNAPSHOT_INDEX).exists()
    assert not [p for p in (run_dir / rf.BANKS).iterdir() if rf.parse_shard_file_name(p.name)]


def test_shard_false_only_rank0_writes_no_hang(tmp_path):
    r0, r1 = spawn(agent_worker, 2, ("rank0",), str(tmp_path))
    run_dir = tmp_path / "run"
    for k, v in r0["weights"].items():
        assert torch.equal(v, r1["weights"][k]), k
    assert r0["is_writer"] and r0["score_now"] and r0["export"] and not r0["sharded"]
    assert "is_writer" not in r1  # rank 1 never attached
    info = json.loads((run_dir / "run.json").read_text())
    assert info["pid"] == r0["pid"] and info["settings"]["placement"] == "device"
    events = _events(run_dir)
    assert not [e for e in events if e["type"] == "error"]
    assert [e["step"] for e in events if e["type"] == "score_done"] == [4, 8, STEPS]
    assert (run_dir / rf.SNAPSHOT).is_file() and not (run_dir / rf.SNAPSHOT_INDEX).exists()
    assert len(_metrics(run_dir, STEPS)) == 3 * 8


def test_rank_from_launcher_env_before_init(tmp_path, monkeypatch):
    """attach() called before init_process_group under torchrun: RANK decides who writes (shard=False:
    without a process group nothing can be sharded)."""
    from scope_helpers import Denoiser

    from emascope import attach

    monkeypatch.setenv("RANK", "1")
    scope = attach(Denoiser(), run_dir=tmp_path / "run", score_every=None, shard=False)
    scope.step()
    scope.close()
    assert not scope.is_writer and scope.bank is None and scope.current_step == 1
    assert not (tmp_path / "run").exists()
