"""The run directory as files: concurrent reading while the agent writes, torn lines, RunWriter rules.

The reader is the dashboard's own (``emascope.dashboard.data.RunReader``): it must never fail on a run that
is being written, and must see every record once it is complete.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
from scope_helpers import Denoiser, mixture, sampler, train_step

from emascope import attach
from emascope.dashboard.data import JsonlReader, RunReader, load_run
from emascope.rundir import RunWriter, prepare_run_dir, terminate_torn_line

torch.set_num_threads(1)


def _lines(path):
    return path.read_text().splitlines()


def test_reader_thread_never_fails_while_the_agent_writes(tmp_path):
    run_dir = tmp_path / "live"
    torch.manual_seed(0)
    model = Denoiser()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data, g = mixture(1000, seed=1), torch.Generator().manual_seed(0)
    scope = attach(model, opt, run_dir=run_dir, sampler=sampler, reference=mixture(200, 3), score_every=3,
                   num_samples=100, decays=(0.9, 0.99), heartbeat_interval=1.0)
    stop, failures, seen = threading.Event(), [], []

    def read_loop():
        reader = RunReader(run_dir)
        raw_offset = 0
        while not stop.is_set():
            try:
                run = reader.load()
                seen.append((len(run.metrics), len(run.events), run.state()))
                # a raw reader of complete lines never meets a line that is not JSON
                path = run_dir / "metrics.jsonl"
                data = path.read_bytes() if path.exists() else b""
                complete = data[: data.rfind(b"\n") + 1]
                for line in complete[raw_offset:].splitlines():
                    json.loads(line)
                raw_offset = len(complete)
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                failures.append(repr(exc))

    thread = threading.Thread(target=read_loop)
    thread.start()
    try:
        for i in range(15):
            train_step(model, opt, data, g)
            if i % 3 == 2:
                scope.wait()  # the background sweep writes from its thread; no stage is superseded
        scope.close()
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not failures, failures[:3]
    assert len(seen) > 5
    counts = [n for n, _, _ in seen]
    assert counts == sorted(counts)  # records only ever appear, never vanish
    assert {state for *_, state in seen} <= {"live", "finished", "unknown"}
    final = load_run(run_dir)
    assert len(final.metrics) == len(_lines(run_dir / "metrics.jsonl")) == 5 * 3 * 7
    assert final.state() == "finished" and final.bad_lines == {"metrics.jsonl": 0, "events.jsonl": 0}


@pytest.fixture
def closed_run(tmp_path):
    run_dir = tmp_path / "run"
    with attach(Denoiser(), run_dir=run_dir, evaluate=lambda m: {"a": 1.0, "b": float("nan")},
                metric_directions={"a": "lower"}, score_every=None, decays=(0.9,)) as scope:
        scope.step()
    return run_dir


def test_torn_last_line_is_held_back_then_read_when_complete(closed_run):
    metrics = closed_run / "metrics.jsonl"
    rows = len(_lines(metrics))
    assert rows == 4
    b = [json.loads(x) for x in _lines(metrics) if json.loads(x)["metric"] == "b"]
    assert all(r["value"] is None for r in b)  # NaN is written as null
    reader = JsonlReader(metrics)
    reader.read()
    assert len(reader.records) == rows and not reader.torn_tail
    line = json.dumps({"step": 2, "variant": "raw", "decay": None, "metric": "a", "value": 0.5, "time": 1.0})
    with open(metrics, "a") as f:
        f.write(line[:20])  # a writer killed mid-line
    reader.read()
    assert len(reader.records) == rows and reader.torn_tail and reader.bad_lines == 0
    run = load_run(closed_run)
    assert len(run.metrics) == rows and run.torn_tail["metrics.jsonl"]
    with open(metrics, "a") as f:
        f.write(line[20:] + "\n")
    reader.read()
    assert len(reader.records) == rows + 1 and not reader.torn_tail


def test_resume_terminates_a_torn_line_so_new_records_survive(closed_run):
    metrics = closed_run / "metrics.jsonl"
    rows = len(_lines(metrics))
    with open(metrics, "a") as f:
        f.write('{"step": 9, "varia')  # the previous job was killed mid-write
    with attach(Denoiser(), run_dir=closed_run, resume=True, evaluate=lambda m: {"a": 2.0},
                score_every=None, decays=(0.9,)) as scope:
        assert scope.current_step == 1
        scope.step()
        info = json.loads((closed_run / "run.json").read_text())
        assert info["metric_directions"] == {"a": "lower"}  # kept from the first run before any score
    run = load_run(closed_run)
    assert run.bad_lines["metrics.jsonl"] == 1  # only the fragment is lost
    assert len(run.metrics) == rows + 2  # raw and 0.9 at step 2
    assert sorted(run.metrics["step"].unique().tolist()) == [1, 2]
    assert not terminate_torn_line(metrics) and not terminate_torn_line(closed_run / "missing.jsonl")


def test_writer_heartbeat_and_failure_counting(tmp_path):
    run_dir = prepare_run_dir(tmp_path / "w")
    step = [0]
    w = RunWriter(run_dir, step_fn=lambda: step[0], heartbeat_interval=0.05)
    w.start_heartbeat()
    step[0] = 7
    time.sleep(0.3)
    hb = json.loads((run_dir / "heartbeat").read_text())
    assert hb["state"] == "running" and hb["step"] == 7 and time.time() - hb["time"] < 1.0
    w.stop_heartbeat()
    hb = json.loads((run_dir / "heartbeat").read_text())
    assert hb["state"] == "closed"
    w.event("custom", 3, value=float("inf"), arr=[np.float32(1.5), np.int64(2)])
    rec = json.loads(_lines(run_dir / "events.jsonl")[-1])
    assert rec["value"] is None and rec["arr"] == [1.5, 2] and rec["step"] == 3
    (run_dir / "samples").rmdir()
    (run_dir / "samples").write_text("not a folder")  # writes below it now fail
    w.save_points("samples/step_000000001/raw.npy", np.zeros((3, 2)))
    assert w.num_write_errors == 1 and "samples/step_000000001/raw.npy" in w.last_error
    with pytest.raises(ValueError, match="heartbeat_interval"):
        RunWriter(run_dir, heartbeat_interval=0)


def test_prepare_run_dir_rules(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        prepare_run_dir(tmp_path / "file")
    with pytest.raises(ValueError, match="exclude each other"):
        prepare_run_dir(tmp_path / "r", overwrite=True, resume=True)
    d = prepare_run_dir(tmp_path / "r")
    assert sorted(p.name for p in d.iterdir()) == ["banks", "exports", "reference", "requests", "samples", "scoring"]
    prepare_run_dir(d)  # an empty layout is not a run yet: reusable
    (d / "events.jsonl").write_text("{}\n")
    (d / "reference" / "k.npz").write_bytes(b"cache")
    with pytest.raises(ValueError, match="already holds a run.*resume=True.*overwrite=True"):
        prepare_run_dir(d)
    prepare_run_dir(d, overwrite=True)
    assert not (d / "events.jsonl").exists() and (d / "reference" / "k.npz").exists()
