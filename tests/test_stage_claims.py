"""Stage claims (O_EXCL, stale take-over), done markers, stage states from events, and how the
dashboard shows them (torch-free parts; the real scorer processes are in test_scoring_modes.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from dashboard_fixtures import make_run, write_jsonl
from streamlit.testing.v1 import AppTest

from emascope import claims
from emascope import runformat as rf
from emascope.score_cli import main as score_main

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_claim_is_taken_once_and_released(tmp_path):
    a = claims.try_claim(tmp_path, 10, scorer="a")
    assert a is not None and a.generation == 0 and a.path.name == "step_000000010.claim.0"
    assert json.loads(a.path.read_text())["pid"] == os.getpid()
    assert claims.try_claim(tmp_path, 10, scorer="b") is None  # held by a live process (this one)
    assert claims.try_claim(tmp_path, 20, scorer="b") is not None  # other stages are free
    assert a.still_mine()
    a.release()
    assert not a.path.exists()
    again = claims.try_claim(tmp_path, 10, scorer="b")
    assert again is not None and again.generation == 0
    claims.mark_done(tmp_path, 10, rf.done_record(step=10, scorer="b", seconds=1.0, records=3, time=0.0))
    assert claims.is_done(tmp_path, 10) and claims.done_steps(tmp_path) == {10}
    assert not again.still_mine()  # done: nothing more to commit
    again.release()
    assert claims.try_claim(tmp_path, 10, scorer="c") is None  # done stages are never claimed again


def test_a_claim_of_a_dead_process_is_taken_over_at_once(tmp_path):
    path = tmp_path / rf.stage_claim_file(30, 0)
    path.parent.mkdir(parents=True)
    import socket

    path.write_text(json.dumps(rf.claim_record(scorer="gone", host=socket.gethostname(), pid=_dead_pid(), time=0)))
    c = claims.try_claim(tmp_path, 30, scorer="me", stale_after=3600)  # the pid is gone: stale now
    assert c is not None and c.generation == 1
    c.release()
    assert claims.claim_generations(tmp_path, 30) == []


def test_a_claim_from_another_host_is_stale_only_without_heartbeat(tmp_path):
    path = tmp_path / rf.stage_claim_file(40, 0)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rf.claim_record(scorer="far", host="another-host", pid=1, time=0)))
    assert claims.try_claim(tmp_path, 40, scorer="me", stale_after=30) is None  # fresh heartbeat
    old = time.time() - 60
    os.utime(path, (old, old))
    c = claims.try_claim(tmp_path, 40, scorer="me", stale_after=30)
    assert c is not None and c.generation == 1
    assert c.still_mine()
    with claims.ClaimHeartbeat(c, 0.05):  # the holder's heartbeat keeps its claim fresh
        time.sleep(0.2)
    assert time.time() - c.path.stat().st_mtime < 5


def test_racing_take_overs_give_the_stage_to_exactly_one(tmp_path):
    path = tmp_path / rf.stage_claim_file(50, 0)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rf.claim_record(scorer="far", host="another-host", pid=1, time=0)))
    old = time.time() - 600
    os.utime(path, (old, old))
    barrier = threading.Barrier(8)
    won = []

    def contender(i: int) -> None:
        barrier.wait()
        c = claims.try_claim(tmp_path, 50, scorer=f"t{i}", stale_after=30)
        if c is not None:
            won.append(c)

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(won) == 1 and won[0].generation == 1
    # the old holder, back from a freeze, sees that it lost the stage
    lost = claims.Claim(tmp_path, 50, 0)
    assert not lost.still_mine() and won[0].still_mine()


def test_stage_states_from_events():
    ev = [
        {"time": 1, "step": 10, "type": "stage_pending", "mode": "background"},
        {"time": 2, "step": 10, "type": "score_start", "variants": ["raw", "0.9"], "scorer": "background"},
        {"time": 3, "step": 10, "type": "score_progress", "done": 1, "total": 2, "scorer": "background"},
        {"time": 4, "step": 20, "type": "stage_pending", "mode": "background"},
        {"time": 5, "step": 30, "type": "stage_pending", "mode": "background"},
        {"time": 6, "step": 20, "type": "score_skipped", "reason": "superseded"},
        {"time": 7, "step": 40, "type": "score_start", "variants": ["raw"], "scorer": "external:a"},
        {"time": 8, "step": 40, "type": "score_start", "variants": ["raw"], "scorer": "external:b"},
        {"time": 9, "step": 40, "type": "score_progress", "done": 1, "total": 1, "scorer": "external:a"},  # stale
        {"time": 10, "step": 40, "type": "score_done", "seconds": 2.5, "scorer": "external:b"},
        {"time": 11, "step": 50, "type": "score_start", "variants": ["raw"], "scorer": "background"},
        {"time": 12, "step": 50, "type": "score_timeout", "reason": "no progress", "scorer": "background"},
        {"time": 13, "step": "x", "type": "score_done"}, {"step": 60, "type": "nonsense"}, "not a dict", {},
    ]
    st = rf.stage_states(ev)
    assert sorted(st) == [10, 20, 30, 40, 50]
    assert (st[10]["state"], st[10]["done"], st[10]["total"], st[10]["scorer"]) == ("scoring", 1, 2, "background")
    assert st[20]["state"] == "skipped" and st[20]["reason"] == "superseded"
    assert st[30]["state"] == "pending" and st[30]["mode"] == "background"
    assert (st[40]["state"], st[40]["scorer"], st[40]["attempts"], st[40]["seconds"]) == ("done", "external:b", 2, 2.5)
    assert st[50]["state"] == "failed" and st[50]["reason"] == "no progress"


def test_dashboard_shows_stage_states_and_scorers(tmp_path, monkeypatch):
    run = make_run(tmp_path, "staged", steps=(1000, 2000))
    write_jsonl(run / "events.jsonl", [
        {"time": 2.0, "step": 1000, "type": "score_done", "seconds": 1.5, "scorer": "external:gpu-node:7"},
        {"time": 3.0, "step": 3000, "type": "stage_pending", "mode": "external"},
        {"time": 3.5, "step": 2000, "type": "score_start", "variants": ["raw", "0.9", "0.99"], "scorer": "background"},
        {"time": 3.6, "step": 2000, "type": "score_progress", "done": 2, "total": 3, "scorer": "background"},
        {"time": 4.0, "step": 4000, "type": "score_skipped", "reason": "busy"},
    ])
    monkeypatch.setenv("EMASCOPE_DASHBOARD_PATH", str(run))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception and not at.error
    caption = next(c.value for c in at.caption if c.value.startswith("Stages:"))
    assert "1 done" in caption and "1 scoring" in caption and "1 pending" in caption and "1 skipped" in caption
    assert "step 2,000: scoring 2/3 · background" in caption and "step 3,000: pending" in caption
    table = at.dataframe[-1].value
    rows = {int(r["step"]): r for r in table.to_dict("records")}
    assert rows[1000]["scorer"] == "external:gpu-node:7" and rows[2000]["progress"] == "2/3"


def test_emascope_score_refuses_bad_input_before_writing(tmp_path, capsys):
    from emascope.cli import main as cli_main

    assert cli_main([]) == 0 and "score" in capsys.readouterr().out  # listed among the subcommands
    assert score_main([str(tmp_path / "nope"), "--entry", "x:build"]) == 2
    assert "does not exist" in capsys.readouterr().err
    run = make_run(tmp_path, "inline_run", steps=(1000,))  # a run scored in-process
    entry = tmp_path / "entry.py"
    entry.write_text("def build():\n    return {}\n")
    before = sorted(p.name for p in run.rglob("*"))
    assert score_main([str(run), "--entry", f"{entry}:build"]) == 2
    assert "scored in the training process (scoring='inline')" in capsys.readouterr().err
    info = json.loads((run / rf.RUN_JSON).read_text())
    info["settings"]["scoring"] = "external"
    (run / rf.RUN_JSON).write_text(json.dumps(info))
    assert score_main([str(run), "--entry", f"{entry}:build"]) == 2
    assert "build() must return 'model'" in capsys.readouterr().err
    assert score_main([str(run), "--entry", f"{entry}:nothing"]) == 2
    assert "has no function 'nothing'" in capsys.readouterr().err
    assert score_main([str(run), "--entry", "no_colon"]) == 2
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing written
