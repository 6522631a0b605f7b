"""Where sweeps run: inline, in the background, out of process. Same numbers everywhere; training never waits.

Real training (the tree2d sample's MLP and the digits sample's conv net, flow matching, Adam), the
real agent, real files, and for ``scoring="external"`` a real ``emascope score`` process. Bit-for-bit
on CPU with one intra-op thread.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import scoring_entry as E
import torch
from safetensors.torch import load_file

from emascope import runformat as rf
from emascope.background import choose_copy_placement

torch.set_num_threads(1)
ENTRY = f"{Path(E.__file__).resolve()}:build"


def metrics(run_dir: Path) -> dict[tuple, float | None]:
    """(step, variant, metric) -> value; asserts no key is written twice."""
    recs = [json.loads(line) for line in (run_dir / rf.METRICS).read_text().splitlines()]
    out = {(r["step"], r["variant"], r["metric"]): r["value"] for r in recs}
    assert len(out) == len(recs), "a (step, variant, metric) was written twice"
    return out


def events(run_dir: Path, type_: str | None = None) -> list[dict]:
    out = [json.loads(line) for line in (run_dir / rf.EVENTS).read_text().splitlines()]
    return [e for e in out if type_ is None or e["type"] == type_]


def bank_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / rf.SNAPSHOT))


def scorer_cmd(run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "emascope.cli", "score", str(run_dir), "--entry", ENTRY, *args]


def scorer_env(kind: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "EMASCOPE_TEST_KIND": kind, **extra}


def start_scorer(run_dir: Path, kind: str, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(scorer_cmd(run_dir, *args), env=scorer_env(kind, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.fixture
def procs():
    """Processes a test starts; their process groups are killed at teardown, even on failure."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(timeout=30)


# ------------------------------------------------------------------------------- same numbers in every mode


@pytest.mark.parametrize("kind", ["tree2d", "conv"])
def test_inline_background_and_external_give_the_same_numbers(tmp_path, kind):
    """Metrics, bank and the training job's random stream are bit-identical in the three modes."""
    steps = 30 if kind == "tree2d" else 20
    _, draw_inline = E.train(tmp_path / "inline", kind, scoring="inline", steps=steps)
    _, draw_bg = E.train(tmp_path / "bg", kind, scoring="background", steps=steps)
    _, draw_ext = E.train(tmp_path / "ext", kind, scoring="external", steps=steps)
    out = subprocess.run(scorer_cmd(tmp_path / "ext"), env=scorer_env(kind), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    want = list(range(10, steps + 1, 10))
    assert f"{len(want)} stage(s) scored" in out.stdout

    inline, bg, ext = (metrics(tmp_path / m) for m in ("inline", "bg", "ext"))
    stages = {k[0] for k in inline}
    assert sorted(stages) == want and {k[1] for k in inline} == {"raw", "0.9", "0.99", "0.999"}
    assert {"fd", "kid_mean", "precision", "coverage"} <= {k[2] for k in inline}
    assert bg == inline
    assert ext == inline
    assert torch.equal(draw_bg, draw_inline) and torch.equal(draw_ext, draw_inline)
    ref = bank_tensors(tmp_path / "inline")
    for m in ("bg", "ext"):
        got = bank_tensors(tmp_path / m)
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    # who scored what, and the stage states the dashboard shows
    for m, scorer in (("inline", "inline"), ("bg", "background"), ("ext", "external:")):
        states = rf.stage_states(events(tmp_path / m))
        assert sorted(states) == want
        assert all(s["state"] == "done" and s["scorer"].startswith(scorer) for s in states.values()), states
        assert all((tmp_path / m / rf.stage_done_file(s)).is_file() for s in want)
    # the external run's training process wrote one stage snapshot per scoring point and scored nothing
    pending = events(tmp_path / "ext", "stage_pending")
    assert [e["step"] for e in pending] == want and {e["mode"] for e in pending} == {"external"}
    assert all((tmp_path / "ext" / rf.stage_snapshot_file(s)).is_file() for s in want)
    info = json.loads((tmp_path / "ext" / rf.RUN_JSON).read_text())  # directions merged by the scorer
    assert info["metric_directions"]["fd"] == "lower" and info["sample_kind"] == (
        "points" if kind == "tree2d" else "images")
    if kind == "conv":  # previews of the external scorer are the inline ones
        for v in ("raw", "0.99"):
            assert (tmp_path / "ext" / rf.preview_file(20, v, ".png")).read_bytes() == \
                (tmp_path / "inline" / rf.preview_file(20, v, ".png")).read_bytes()


def test_disk_placement_and_batched_sampling_give_the_same_numbers(tmp_path):
    """The frozen copy on disk (the stage snapshot) changes nothing; batched sampling changes
    nothing beyond float32 rounding of its batched kernels."""
    E.train(tmp_path / "inline", "tree2d", scoring="inline", steps=20)
    E.train(tmp_path / "disk", "tree2d", scoring="background", score_copy="disk", steps=20)
    E.train(tmp_path / "batched", "tree2d", scoring="background", steps=20, batched_sampling=True)
    inline = metrics(tmp_path / "inline")
    assert metrics(tmp_path / "disk") == inline
    batched = metrics(tmp_path / "batched")
    assert batched.keys() == inline.keys()
    assert batched == pytest.approx(inline, rel=1e-5, abs=1e-7)
    pending = events(tmp_path / "disk", "stage_pending")
    assert [e["copy"] for e in pending] == ["disk", "disk"]
    assert (tmp_path / "disk" / rf.stage_snapshot_file(10)).is_file()
    assert not [e for e in events(tmp_path / "batched", "notice") if e["where"] == "batched_sampling"]


def test_copy_placement_rule():
    gib = 2**30
    cuda = torch.device("cuda", 0)
    assert choose_copy_placement(gib, cuda, free_device=4 * gib, free_host=64 * gib) == "device"
    assert choose_copy_placement(3 * gib, cuda, free_device=4 * gib, free_host=64 * gib) == "pinned"
    assert choose_copy_placement(40 * gib, cuda, free_device=4 * gib, free_host=64 * gib) == "disk"
    assert choose_copy_placement(gib, "cpu", free_device=4 * gib) == "device"
    assert choose_copy_placement(3 * gib, "cpu", free_device=4 * gib) == "disk"
    assert choose_copy_placement(gib, cuda, requested="disk", free_device=4 * gib) == "disk"
    assert choose_copy_placement(gib, "cpu", requested="pinned") == "device"


def test_copy_placement_uses_the_memory_plan():
    """The frozen copy's budget is the plan's free memory less what the plan put there for the
    bank, or what is free now when that is smaller: a 1.5B-parameter bank of 10 decays planned on
    a device with 80 GiB free leaves too little room for its copy on the device (it goes to pinned
    host memory) although the device reports 200 GiB free; without a plan, what is free now decides."""
    from emascope.background import free_after_plan
    from emascope.plan import plan_memory

    gib = 2**30
    plan = plan_memory(1_500_000_000, 10, device_free=80 * gib, host_free=512 * gib)
    cost = plan.cost("device")
    dev, host = free_after_plan(plan, "device", device_now=200 * gib, host_now=None)
    assert dev == 80 * gib - cost.device_bytes and host == 512 * gib - cost.host_bytes
    nbytes = 10 * 1_500_000_000 * 4
    cuda = torch.device("cuda", 0)
    assert choose_copy_placement(nbytes, cuda, free_device=200 * gib, free_host=host) == "device"  # no plan
    assert choose_copy_placement(nbytes, cuda, free_device=dev, free_host=host) == "pinned"
    assert free_after_plan(plan, "device", device_now=gib, host_now=2 * gib) == (gib, 2 * gib)  # smaller: now
    assert free_after_plan(None, "device", device_now=None, host_now=None) == (None, None)
    assert free_after_plan(plan, "no-such-placement", device_now=5, host_now=None) == (5, None)


# ------------------------------------------------------------------------------- training never waits


def test_background_sweep_runs_while_training_goes_on(tmp_path):
    """A sweep that takes seconds: the scoring point costs the training thread milliseconds, and the
    next steps happen while the sweep runs; the policy queues one stage and supersedes the older one."""
    release, entered = threading.Event(), threading.Event()

    def slow_sampler(model, n, generator):
        entered.set()
        release.wait(20)
        return E.tree2d.make_sampler(2)(model, n, generator)

    torch.manual_seed(1)
    p = E.parts("tree2d")
    model, opt = p["model"], None
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    from emascope import attach

    scope = attach(model, opt, run_dir=tmp_path / "r", sampler=slow_sampler, reference=p["reference"],
                   score_every=5, num_samples=64, batch_size=64, decays=(0.9,), kid_subsets=2)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(1, 16):
        t = time.perf_counter()
        loss = E.flow_matching_loss(model, p["data"](g), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
        if i == 5:  # the worker has taken stage 5 (on a loaded machine it may take a moment to start)
            assert entered.wait(20)
    assert scope.last_scores is None  # the first sweep is still waiting for its sampler
    assert max(times) < 5.0  # no step waited for a sweep (each would take 20 s)
    release.set()
    scope.close()
    ev = events(tmp_path / "r")
    assert [(e["step"], e["reason"]) for e in ev if e["type"] == "score_skipped"] == [(10, "superseded")]
    assert [e["step"] for e in ev if e["type"] == "score_queued"] == [10, 15]
    assert sorted({k[0] for k in metrics(tmp_path / "r")}) == [5, 15]
    assert scope.last_scores is not None and scope.last_scores.step == 15
    states = rf.stage_states(ev)
    assert {s: st["state"] for s, st in states.items()} == {5: "done", 10: "skipped", 15: "done"}
    assert all(e["blocked_seconds"] < 2.0 for e in ev if e["type"] == "stage_pending")


def test_skip_policy_skips_without_copying(tmp_path):
    release = threading.Event()

    def slow_sampler(model, n, generator):
        release.wait(20)
        return E.tree2d.make_sampler(2)(model, n, generator)

    p = E.parts("tree2d")
    from emascope import attach

    scope = attach(p["model"], run_dir=tmp_path / "r", sampler=slow_sampler, reference=p["reference"], score_every=2,
                   num_samples=64, batch_size=64, decays=(0.9,), kid_subsets=2, score_busy="skip",
                   score_at_close=False)
    for _ in range(6):
        scope.step()
    release.set()
    scope.close()
    ev = events(tmp_path / "r")
    assert [(e["step"], e["reason"]) for e in ev if e["type"] == "score_skipped"] == [(4, "busy"), (6, "busy")]
    assert [e["step"] for e in ev if e["type"] == "stage_pending"] == [2]  # nothing frozen for skipped stages
    assert {k[0] for k in metrics(tmp_path / "r")} == {2}


def test_wait_policy_scores_every_stage(tmp_path):
    """score_busy="wait": training runs at most one stage ahead; no stage is skipped."""
    def slowish(model, n, generator):
        time.sleep(0.2)
        return E.tree2d.make_sampler(2)(model, n, generator)

    p = E.parts("tree2d")
    from emascope import attach

    scope = attach(p["model"], run_dir=tmp_path / "r", sampler=slowish, reference=p["reference"], score_every=1,
                   num_samples=64, batch_size=64, decays=(0.9,), kid_subsets=2, score_busy="wait",
                   score_at_close=False)
    for _ in range(4):
        scope.step()
    scope.close()
    ev = events(tmp_path / "r")
    assert not [e for e in ev if e["type"] == "score_skipped"]
    assert {k[0] for k in metrics(tmp_path / "r")} == {1, 2, 3, 4}
    waited = [e["waited_seconds"] for e in ev if e["type"] == "stage_pending"]
    assert waited[0] < 0.1 and max(waited) > 0.1  # a later scoring point waited for the queue


def test_raising_and_hanging_samplers_never_stall_training(tmp_path):
    """A sampler that raises: error events, the stage is still done (with errors). A sampler that
    hangs: after score_timeout without progress the sweep is abandoned and recorded; the next
    stage gets a fresh worker; the abandoned sweep never writes."""
    calls = {"n": 0}
    hang = threading.Event()

    def bad_sampler(model, n, generator):
        calls["n"] += 1
        if calls["n"] <= 4:  # stage 3: raw and 3 decays, each raising on its first batch
            raise RuntimeError("sampler broke")
        if calls["n"] == 5:  # stage 6: hangs
            hang.wait(30)
            return torch.zeros(n, 2)
        return E.tree2d.make_sampler(2)(model, n, generator)

    p = E.parts("tree2d")
    from emascope import attach

    scope = attach(p["model"], run_dir=tmp_path / "r", sampler=bad_sampler, reference=p["reference"], score_every=3,
                   num_samples=64, batch_size=64, decays=E.DECAYS, kid_subsets=2, score_timeout=3.0,
                   request_interval=0, score_at_close=False)
    t0 = time.perf_counter()
    for i in range(1, 10):
        scope.step()
        if i == 3:
            scope.wait()
        if i == 6:
            time.sleep(3.5)  # the hang outlives score_timeout; the next step's housekeeping notices
    scope.wait(30)
    scope.close()
    assert time.perf_counter() - t0 < 25
    hang.set()  # wake the abandoned sweep: it must not write anything
    time.sleep(0.5)
    ev = events(tmp_path / "r")
    errors = [e for e in ev if e["type"] == "error"]
    assert {(e["step"], e["where"]) for e in errors} == {(3, "sampler")} and len(errors) == 4
    timeouts = [e for e in ev if e["type"] == "score_timeout"]
    assert [e["step"] for e in timeouts] == [6] and timeouts[0]["cause"] == "hang"
    states = rf.stage_states(ev)
    assert states[3]["state"] == "done" and states[6]["state"] == "failed" and states[9]["state"] == "done"
    got = metrics(tmp_path / "r")
    assert {k[0] for k in got} == {9}  # stage 3 had no samples to score; stage 6 was abandoned
    assert not (tmp_path / "r" / rf.stage_done_file(6)).exists()


def test_close_waits_for_the_running_sweep_and_keeps_finished_ones(tmp_path):
    """close() waits for the running and the queued sweep; with close_timeout it stops waiting for a
    hung one, records it, and everything already finished stays written."""
    started = threading.Event()

    def slowish(model, n, generator):
        started.set()
        time.sleep(0.3)
        return E.tree2d.make_sampler(2)(model, n, generator)

    p = E.parts("tree2d")
    from emascope import attach

    scope = attach(p["model"], run_dir=tmp_path / "a", sampler=slowish, reference=p["reference"], score_every=2,
                   num_samples=64, batch_size=64, decays=(0.9,), kid_subsets=2)
    for _ in range(3):
        scope.step()
    assert started.wait(20)
    t = time.perf_counter()
    scope.close()  # stage 2 running, stage 3 (close) queued: both finish before close returns
    assert time.perf_counter() - t > 0.5
    assert {k[0] for k in metrics(tmp_path / "a")} == {2, 3}
    assert [e["type"] for e in events(tmp_path / "a")][-1] == "close"

    hang = threading.Event()
    n_calls = {"n": 0}

    def hangs_on_second_stage(model, n, generator):
        n_calls["n"] += 1
        if n_calls["n"] > 2:
            hang.wait(30)
        return E.tree2d.make_sampler(2)(model, n, generator)

    scope = attach(p["model"], run_dir=tmp_path / "b", sampler=hangs_on_second_stage, reference=p["reference"],
                   score_every=2, num_samples=64, batch_size=64, decays=(0.9,), kid_subsets=2, close_timeout=1.0)
    scope.step(), scope.step()
    scope.wait()
    scope.step(), scope.step()
    t = time.perf_counter()
    scope.close()
    assert time.perf_counter() - t < 10
    hang.set()
    time.sleep(0.3)
    ev = events(tmp_path / "b")
    assert {k[0] for k in metrics(tmp_path / "b")} == {2}  # the finished stage; nothing of the hung one
    assert [(e["step"], e["cause"]) for e in ev if e["type"] == "score_timeout"] == [(4, "close_timeout")]
    assert ev[-1]["type"] == "close"

    # the training loop raises inside `with attach(...)`: no waiting for the hung sweep at all
    hang_c, calls_c = threading.Event(), {"n": 0}

    def hangs_too(model, n, generator):
        calls_c["n"] += 1
        if calls_c["n"] > 2:
            hang_c.wait(30)
        return E.tree2d.make_sampler(2)(model, n, generator)

    t = time.perf_counter()
    with pytest.raises(RuntimeError, match="loop broke"):
        with attach(p["model"], run_dir=tmp_path / "c", sampler=hangs_too, reference=p["reference"],
                    score_every=2, num_samples=64, batch_size=64, decays=(0.9,), kid_subsets=2) as scope:
            scope.step(), scope.step()
            scope.wait()
            scope.step(), scope.step()
            raise RuntimeError("loop broke")
    assert time.perf_counter() - t < 10
    hang_c.set()
    ev = events(tmp_path / "c")
    # stage 4 was running (abandoned: failed) or not started yet (skipped), never waited for
    assert rf.stage_states(ev)[4]["state"] in ("failed", "skipped") and rf.stage_states(ev)[2]["state"] == "done"
    assert ev[-1]["type"] == "close" and {k[0] for k in metrics(tmp_path / "c")} == {2}


# ------------------------------------------------------------------------------- external scorers


def wait_for(pred, timeout: float, what: str) -> None:
    t = time.monotonic()
    while not pred():
        if time.monotonic() - t > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_two_external_scorers_score_each_stage_exactly_once(tmp_path, procs):
    run = tmp_path / "ext"
    E.train(run, "tree2d", scoring="external", steps=60, score_every=10)  # 6 stage snapshots
    for name in ("a", "b"):
        procs.append(start_scorer(run, "tree2d", "--watch", "--poll", "0.05", "--name", name))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    done = [e for e in events(run, "score_done")]
    assert sorted(e["step"] for e in done) == [10, 20, 30, 40, 50, 60]  # each stage exactly once
    assert {e["scorer"] for e in done} <= {"external:a", "external:b"}
    assert len(events(run, "score_start")) == 6
    got = metrics(run)  # no (step, variant, metric) twice
    assert {k[0] for k in got} == {10, 20, 30, 40, 50, 60}
    assert sum(int(o.split(" stage(s) scored")[0].rsplit(" ", 1)[-1]) for o in outs) == 6
    assert not list((run / rf.SCORING).glob("*.claim.*"))


def test_a_scorer_killed_mid_sweep_leaves_the_stage_to_be_scored_again(tmp_path, procs):
    run = tmp_path / "ext"
    E.train(run, "tree2d", scoring="external", steps=10, score_every=10)
    flag = tmp_path / "sampling"
    victim = start_scorer(run, "tree2d", "--name", "victim", EMASCOPE_TEST_SLOW_FILE=str(flag))
    procs.append(victim)
    wait_for(flag.exists, 120, "the first scorer to start sampling")
    claims = list((run / rf.SCORING).glob("*.claim.*"))
    assert [c.name for c in claims] == [Path(rf.stage_claim_file(10, 0)).name]
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert not (run / rf.METRICS).exists() or not metrics(run)  # no half stage
    assert not (run / rf.stage_done_file(10)).exists()
    second = start_scorer(run, "tree2d", "--name", "second")
    procs.append(second)
    out = second.communicate(timeout=240)[0]
    assert second.returncode == 0 and "1 stage(s) scored" in out, out
    got = metrics(run)
    assert {k[0] for k in got} == {10} and {k[1] for k in got} == {"raw", "0.9", "0.99", "0.999"}
    ev = events(run)
    assert [e["scorer"] for e in ev if e["type"] == "score_start"] == ["external:victim", "external:second"]
    assert [e["scorer"] for e in ev if e["type"] == "score_done"] == ["external:second"]
    assert any(e["type"] == "notice" and "stale claim" in e["message"] for e in ev)
    assert rf.stage_states(ev)[10]["state"] == "done" and rf.stage_states(ev)[10]["attempts"] == 2
    assert not list((run / rf.SCORING).glob("*.claim.*"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("copy", ["device", "pinned", "disk"])
def test_background_on_cuda_equals_inline_for_every_copy_placement(tmp_path, copy):
    """GPU: the frozen copy on the device, in pinned host memory or on disk, scored on the worker's
    own CUDA stream, gives the inline sweep's numbers (not run on the development machine: no GPU)."""
    from emascope import attach

    out = {}
    for mode in ("inline", "background"):
        p = E.parts("tree2d")
        model = p["model"].cuda()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(3)
        scope = attach(model, opt, run_dir=tmp_path / mode, sampler=p["sampler"], reference=p["reference"],
                       score_every=5, scoring=mode, score_copy=copy, **E.SETTINGS)
        for step in range(1, 11):
            loss = E.flow_matching_loss(model, p["data"](g).cuda(), torch.Generator("cuda").manual_seed(step))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 5 == 0:
                scope.wait()
        scope.close()
        out[mode] = metrics(tmp_path / mode)
    assert out["background"] == out["inline"] and {k[0] for k in out["inline"]} == {5, 10}
    assert [e["copy"] for e in events(tmp_path / "background", "stage_pending")] == [copy, copy]
