"""Synthesis where a decay is chosen: the live agent's export requests, the search between grid
decays after a sweep (synthesised variants in metrics.jsonl), the dashboard (torch-free error
report before exporting, synthesised points drawn apart), stage-snapshot retention, run format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from scope_helpers import Denoiser, mixture, train_step

from emascope import attach
from emascope import runformat as rf
from emascope import stage_snapshots as stages
from emascope.dashboard import exporting, plots
from emascope.dashboard.data import load_run
from emascope.decay_search import round_decay, search_between, to_x

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
CLEAN_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1",
             "HOME": os.environ.get("HOME", "/tmp")}


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / rf.EVENTS).read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# golden-section search (pure)


def test_search_between_narrows_on_log_one_minus_decay():
    best = 0.99612

    def f(d: float) -> float:
        return (to_x(d) - to_x(best)) ** 2

    grid = {d: f(d) for d in (0.9, 0.99, 0.999, 0.9999)}
    seen = []
    res = search_between(grid, lambda d: seen.append(d) or f(d), direction="lower", max_evals=12)
    assert not res.best_is_grid and abs(to_x(res.best_decay) - to_x(best)) < 0.05
    assert all(0.99 < d < 0.999 for d in seen) and len(seen) <= 12
    assert res.stopped
    # maximise, budget of 2, a bracket that becomes unresolvable
    res = search_between({d: -v for d, v in grid.items()}, lambda d: -f(d), direction="higher", max_evals=2)
    assert len(res.evaluated) == 2 and res.stopped.startswith("evaluation budget")
    res = search_between(grid, f, direction="lower", max_evals=10, resolvable=lambda a, b: False)
    assert res.evaluated == [] and "synthesis error" in res.stopped
    res = search_between(grid, f, direction="lower", max_evals=10, noise=20.0)  # a flat bracket
    assert res.evaluated == [] and "uncertainty" in res.stopped
    edge = search_between({0.9: 0.0, 0.99: 1.0}, f, direction="lower", max_evals=5)
    assert edge.evaluated == [] and "end of the grid" in edge.stopped
    failed = search_between(grid, lambda d: None, direction="lower", max_evals=5)
    assert len(failed.evaluated) == 1 and "failed" in failed.stopped and failed.best_is_grid


def test_round_decay_keeps_names_short():
    assert round_decay(0.99961234) == 0.999612 and repr(round_decay(0.99961234)) == "0.999612"
    assert round_decay(0.9512345) == 0.9512  # 1 - d = 0.0488 (3 significant digits)


# ------------------------------------------------------------------------------------------------
# the agent: search after a sweep, live requests


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A run whose metric is the distance to a float64 EMA of decay 0.996 (computed here, before the
    agent's hook sees the step): its best decay lies between the grid's 0.99 and 0.999."""
    run_dir = tmp_path_factory.mktemp("search") / "run"
    torch.manual_seed(0)
    model = Denoiser(32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    data, g = mixture(2000, 0), torch.Generator().manual_seed(0)

    def flat(m: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().double().reshape(-1) for p in m.parameters()])

    ref = {"ema": flat(model), "t": 0}

    def track(*_):  # registered before attach: runs before the agent's hook at every step
        ref["ema"] = 0.996 * ref["ema"] + 0.004 * flat(model)
        ref["t"] += 1
        if ref["t"] == 300:
            ref[300] = ref["ema"].clone()  # the reference at the first stage, for an out-of-process search

    opt.register_step_post_hook(track)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return {"dist": float((flat(m) - ref["ema"]).norm() / ref["ema"].norm())}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scope = attach(model, opt, run_dir=run_dir, score_every=300, decays=(0.9, 0.99, 0.999, 0.9999),
                       evaluate=evaluate, metric_directions={"dist": "lower"}, search_evals=4,
                       search_tolerance=1e-12, request_interval=0.0, scoring="inline")
        for _ in range(600):
            train_step(model, opt, data, g)
        # a live export request for a decay the bank does not hold, and a bad one
        rid = exporting.request_export(run_dir, None, "mine", decay=0.9996)
        bad = run_dir / rf.request_file("bad1")
        bad.write_text(json.dumps({"id": "bad1", "decay": 1.5, "name": "x"}))
        train_step(model, opt, data, g)  # the agent takes both requests at this step boundary
        deadline = time.time() + 300
        while exporting.export_status(run_dir, rid) is None and time.time() < deadline:
            time.sleep(0.05)  # the synthesis runs in the agent's worker thread, training is not held
        steps = scope.current_step
        scope.close(score=False)
    finally:
        torch.set_num_threads(threads)
    return {"run_dir": run_dir, "rid": rid, "steps": steps, "ref300": ref[300]}


def test_search_scores_synthesised_decays_and_marks_them(searched):
    run_dir = searched["run_dir"]
    everything = _events(run_dir)
    events = [e for e in everything if e["type"] == "search"]
    assert [e["step"] for e in events] == [300, 600]
    done = [e for e in everything if e["type"] == "score_done"]
    assert [e["step"] for e in done if not e.get("synthesized")] == [300, 600]  # the bank's sweeps
    assert sum(1 for e in done if e.get("synthesized")) == sum(len(e["evaluated"]) for e in events)
    last = events[-1]
    assert last["metric"] == "dist" and last["direction"] == "lower" and last["evaluated"]
    assert last["tolerance"] == 1e-12 and last["tolerance_source"] == "search_tolerance"
    assert "uncertainty" not in last["stopped"]  # far below the differences
    assert all(0.99 < x["decay"] < 0.999 and x["profile_residual"] is not None for x in last["evaluated"])
    # the search beats the grid: the metric's optimum (0.996) lies between grid points
    assert not last["best_is_grid"] and abs(to_x(last["best_decay"]) - to_x(0.996)) < 0.25
    recs = [json.loads(x) for x in (run_dir / rf.METRICS).read_text().splitlines()]
    synth = [r for r in recs if "synthesized" in r]
    assert {r["variant"] for r in synth if r["step"] == 600} == {repr(x["decay"]) for x in last["evaluated"]}
    assert all(r["decay"] == float(r["variant"]) and r["synthesized"]["profile_residual"] >= 0 for r in synth)
    grid_best = min(r["value"] for r in recs if r["step"] == 600 and "synthesized" not in r)
    assert last["best_value"] < grid_best
    run = load_run(run_dir)
    assert set(run.metrics["variant"]) == {"raw", "0.9", "0.99", "0.999", "0.9999"}
    assert len(run.synthesized) == len(synth)
    fig = plots.metric_vs_decay(run.metrics, "dist", "lower", synthesized=run.synthesized)
    trace = next(t for t in fig.data if t.name == "synthesised decays")
    assert trace.marker.symbol == "circle-open" and len(trace.x) == len(synth)


def _flat(m: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in m.parameters()])


def _tracked_training() -> tuple:
    """The ``searched`` run's model, optimizer and data, with ``ref["ema"]``: a float64 EMA of
    decay 0.996 updated before the agent's hook at every step."""
    torch.manual_seed(0)
    model = Denoiser(32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    data, g = mixture(2000, 0), torch.Generator().manual_seed(0)
    ref = {"ema": _flat(model)}
    opt.register_step_post_hook(lambda *_: ref.update(ema=0.996 * ref["ema"] + 0.004 * _flat(model)))
    return model, opt, data, g, ref


def test_background_search_finds_what_the_inline_search_found(searched, tmp_path):
    """The default scoring="background": the worker runs the search right after the stage's sweep,
    on its own model copy. The same training (seeds, 300 steps) and the same metric at step 300 give
    the same probes and values, bit for bit, as the inline search of the ``searched`` run; the
    synthesised sweeps are named as the background scorer's."""
    run_dir = tmp_path / "bg"
    model, opt, data, g, ref = _tracked_training()
    target = {}

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return {"dist": float((_flat(m) - target["ema"]).norm() / target["ema"].norm())}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scope = attach(model, opt, run_dir=run_dir, score_every=300, decays=(0.9, 0.99, 0.999, 0.9999),
                       evaluate=evaluate, metric_directions={"dist": "lower"}, search_evals=4,
                       search_tolerance=1e-12, score_busy="wait", score_at_close=False)
        for i in range(300):
            if i == 299:
                opt.register_step_post_hook(lambda *_: target.setdefault("ema", ref["ema"].clone()))
            train_step(model, opt, data, g)
        scope.close()  # waits for the stage's sweep and its search
    finally:
        torch.set_num_threads(threads)
    events = _events(run_dir)
    (search,) = [e for e in events if e["type"] == "search"]
    (inline,) = [e for e in _events(searched["run_dir"]) if e["type"] == "search" and e["step"] == 300]
    assert search["step"] == 300 and search["evaluated"] == inline["evaluated"]
    assert search["best_decay"] == inline["best_decay"] and not search["best_is_grid"]
    synth_done = [e for e in events if e["type"] == "score_done" and e.get("synthesized")]
    assert len(synth_done) == len(search["evaluated"]) and all(e["scorer"] == "background" for e in synth_done)
    assert not [e for e in events if e["type"] == "error"]


def test_external_scorer_runs_the_search_like_the_inline_agent(searched, tmp_path):
    """scoring="external" with search_evals: the training process only writes the stage snapshot;
    the external scorer (``emascope score``'s class, fed the same model and metric) scores the
    stage and then searches between the grid decays, with the same probes and values, bit for bit,
    as the inline search of the ``searched`` run, named as its own."""
    from emascope.external import ExternalScorer

    run_dir = tmp_path / "ext"
    model, opt, data, g, ref = _tracked_training()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with attach(model, opt, run_dir=run_dir, score_every=300, decays=(0.9, 0.99, 0.999, 0.9999),
                    metric_directions={"dist": "lower"}, search_evals=4, search_tolerance=1e-12,
                    scoring="external", score_at_close=False):
            for _ in range(300):
                train_step(model, opt, data, g)
        target = ref["ema"].clone()

        def evaluate(m: torch.nn.Module) -> dict[str, float]:
            return {"dist": float((_flat(m) - target).norm() / target.norm())}

        scorer = ExternalScorer(run_dir, {"model": Denoiser(32), "evaluate": evaluate,
                                          "metric_directions": {"dist": "lower"}}, name="t", log=lambda s: None)
        assert scorer.run() == 1
    finally:
        torch.set_num_threads(threads)
    events = _events(run_dir)
    (search,) = [e for e in events if e["type"] == "search"]
    (inline,) = [e for e in _events(searched["run_dir"]) if e["type"] == "search" and e["step"] == 300]
    assert search["step"] == 300 and search["evaluated"] == inline["evaluated"]
    assert search["scorer"] == scorer.name and search["best_decay"] == inline["best_decay"]
    synth = [e for e in events if e["type"] == "score_done" and e.get("synthesized")]
    assert len(synth) == len(search["evaluated"]) and all(e["scorer"] == scorer.name for e in synth)
    assert not [e for e in events if e["type"] == "error"]


def test_search_stage_runs_out_of_process_at_an_older_stage(searched):
    """``search_stage`` on a closed run with a scorer of its own (as ``emascope score`` would call
    it): at the first stage, from the snapshots at or before it only, it finds the same values as
    the agent's own search there, and beats the grid."""
    from emascope.posthoc import StateSwap, search_stage

    run_dir, ref = searched["run_dir"], searched["ref300"]
    recs = [json.loads(x) for x in (run_dir / rf.METRICS).read_text().splitlines()]
    grid = {float(r["variant"]): r["value"] for r in recs
            if r["step"] == 300 and "synthesized" not in r and rf.decay_of(r["variant"]) is not None}
    agent_vals = {float(r["variant"]): r["value"] for r in recs if r["step"] == 300 and "synthesized" in r}
    model = Denoiser(32)

    def score(name: str, sd: dict, report) -> float:
        assert report.step == 300 and all(c["step"] <= 300 for c in report.coefficients)
        with StateSwap({name: sd}).swap(model, name) as m:
            th = torch.cat([p.detach().double().reshape(-1) for p in m.parameters()])
        return float((th - ref).norm() / ref.norm())

    out, reports = search_stage(run_dir, step=300, grid=grid, direction="lower", max_evals=3, score=score)
    assert len(out.evaluated) == 3 and set(reports) == {d for d, _ in out.evaluated}
    assert not out.best_is_grid and out.best_value < min(grid.values())
    for d, v in out.evaluated[:2]:  # same probes as the agent's search at that stage, same values
        assert v == pytest.approx(agent_vals[d], rel=1e-5, abs=1e-9)
    flat = search_stage(run_dir, step=300, grid=grid, direction="lower", max_evals=3, score=score, noise=10.0)[0]
    assert flat.evaluated == [] and "uncertainty" in flat.stopped


def test_live_request_for_any_decay_is_synthesised(searched):
    run_dir, rid = searched["run_dir"], searched["rid"]
    status = exporting.export_status(run_dir, rid)
    assert status["state"] == "done", status
    assert status["variant"] == "0.9996" and status["step"] == 600
    assert status["synthesis"]["profile_residual"] >= 0 and status["synthesis"]["error_bound"] is not None
    path = exporting.resolve_status_path(run_dir, status)
    assert path.name == "mine.safetensors" and set(load_file(str(path))) == set(Denoiser(32).state_dict())
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["synthesized"] == "true"
    bad = exporting.export_status(run_dir, "bad1")
    assert bad["state"] == "error" and "decay must be a number in (0, 1)" in bad["error"]
    assert not list((run_dir / rf.REQUESTS).glob("*.json"))


def test_dashboard_reports_the_error_before_exporting_without_torch(searched, tmp_path):
    """The dashboard, with torch unimportable, computes the error of any decay and shows it in the
    export tab before exporting; the synthesised points are drawn apart."""
    run_dir = searched["run_dir"]
    code = f"""
import os, sys
sys.modules['torch'] = None
from emascope.dashboard import exporting
rep = exporting.synthesis_preview({str(run_dir)!r}, 0.9985)
assert rep['step'] == 600 and rep['predicted_error'] is not None and rep['error_bound'] >= rep['predicted_error']
assert abs(sum(c['coef'] for c in rep['coefficients']) - 1) < 1e-6
from streamlit.testing.v1 import AppTest
os.environ['EMASCOPE_DASHBOARD_PATH'] = {str(run_dir)!r}
at = AppTest.from_file({APP!r}, default_timeout=120).run()
at.radio(key='export_mode').set_value('any decay (synthesised post hoc)').run()
at.number_input(key='export_decay').set_value(0.9985).run()
assert not at.exception, [e.value for e in at.exception]
text = [i.value for i in at.info]
assert any('Decay 0.9985 at step 600' in t and 'predicted weight-space error' in t for t in text), text
assert any('Search between grid decays at step 600' in c.value for c in at.caption)
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=CLEAN_ENV, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-3000:] + out.stderr[-3000:]


def test_export_command_line_for_a_decay():
    cmd = exporting.export_command("R", None, Path("o.safetensors"), None, decay=0.9996, force=True)
    assert cmd[-6:] == ["R", "--decay", "0.9996", "--force", "--out", "o.safetensors"]


# ------------------------------------------------------------------------------------------------
# retention, rewinds, run format


def test_thin_keeps_a_geometric_spread_of_ages():
    steps = list(range(1000, 64001, 1000))
    kept = stages.thin(steps, 8)
    assert len(kept) == 8 and kept[0] == 1000 and kept[-1] == 64000
    ages = [64000 - s for s in kept[:-1]][::-1]
    ratios = [b / a for a, b in zip(ages, ages[1:], strict=False)]
    assert all(r < 4 for r in ratios)  # no gap is much wider than the others in log(age)
    assert stages.thin(steps, 8, protected=[33000])[1:-1].count(33000) == 1
    assert stages.thin(steps, 100) == steps
    assert stages.thin([5, 10], 0) == []


def test_retention_rewind_and_lead_in_schedule(tmp_path):
    assert stages.lead_in_steps(1000, (4, 16, 64), 1) == [936, 984, 996]
    assert stages.lead_in_steps(1000, (4, 16, 64), 7) == [930, 979, 993]
    assert stages.next_stage_for_lead_in(984, 1000, (4, 16, 64)) == 1000
    assert stages.next_stage_for_lead_in(985, 1000, (4, 16, 64)) is None
    assert stages.lead_in_decays((0.5, 0.9, 0.99, 0.999, 0.9999), (4, 16, 64)) == [0.5, 0.9, 0.99, 0.999]
    torch.manual_seed(0)
    model = Denoiser(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data, g = mixture(200, 0), torch.Generator().manual_seed(0)
    scope = attach(model, opt, run_dir=tmp_path / "r", score_every=10, stage_snapshots=3, stage_lead_in=(2,))
    for _ in range(60):
        train_step(model, opt, data, g)
    ckpt = scope.state_dict()
    for _ in range(20):
        train_step(model, opt, data, g)
    banks = tmp_path / "r" / rf.BANKS
    kept = []
    for s in range(10, 81, 10):  # the policy applied after every stage, as the agent does
        kept = stages.thin([*kept, s], 3)
    assert stages.stage_snapshot_steps(tmp_path / "r") == kept and kept[0] == 10 and kept[-1] == 80
    leads = sorted(rf.parse_lead_in_snapshot_name(p.name) for p in banks.glob("lead_*"))
    assert leads == [s - 2 for s in kept[-2:]]  # lead-ins only for the newest two kept stages
    scope.load_state_dict(ckpt)  # rewind to step 60: later snapshots belong to an abandoned trajectory
    assert stages.stage_snapshot_steps(tmp_path / "r") == [s for s in kept if s <= 60]
    assert sorted(rf.parse_lead_in_snapshot_name(p.name) for p in banks.glob("lead_*")) == \
        [s - 2 for s in kept[-2:] if s <= 60]
    pruned = [e for e in _events(tmp_path / "r") if e["type"] == "snapshot_pruned"]
    assert pruned and "banks/step_000000080.safetensors" in pruned[-1]["paths"]
    scope.close(score=False)
    off = attach(Denoiser(8), run_dir=tmp_path / "off", score_every=5, stage_snapshots=0)
    off.score_now()
    off.close()
    assert not stages.stage_snapshot_steps(tmp_path / "off")


def test_request_schema_for_synthesised_exports():
    req = rf.parse_request({"id": "a", "decay": 0.9996, "name": "n"}, stem="a")
    assert req.synthesized and req.decay == 0.9996 and req.variant == "0.9996" and not req.force
    assert rf.request_body(req, 1.0)["decay"] == 0.9996
    req = rf.parse_request({"id": "a", "sigma_rel": 0.05, "force": True}, stem="a")
    assert req.variant == "sigma_rel=0.05" and req.name == "phema-0.05" and req.force
    plain = rf.parse_request({"id": "a", "variant": "0.999"}, stem="a")
    assert not plain.synthesized and "decay" not in rf.request_body(plain, 1.0)
    for bad in ({"decay": 1.0}, {"decay": 0.99, "sigma_rel": 0.1}, {"sigma_rel": 0.5}, {"decay": "x"},
                {"decay": 0.9, "force": "yes"}):
        with pytest.raises(ValueError):
            rf.parse_request({"id": "a", **bad}, stem="a")
    rec = rf.metric_record(5, "0.9996", "fd", 1.0, 2.0, synthesized={"profile_residual": 0.1})
    assert rec["decay"] == 0.9996 and rec["synthesized"] == {"profile_residual": 0.1}
    assert "synthesized" not in rf.metric_record(5, "0.9", "fd", 1.0, 2.0)
    assert rf.lead_in_snapshot_file(7) == "banks/lead_000000007.safetensors"
    assert rf.parse_lead_in_snapshot_name("lead_000000007.safetensors") == 7
    assert rf.parse_lead_in_snapshot_name("step_000000007.safetensors") is None


def test_hostile_snapshot_files_are_skipped_not_read(tmp_path):
    """A FIFO, a device symlink, garbage and a truncated copy under banks/: skipped (no hang, no
    crash); the dashboard's preview says there is nothing to synthesise from."""
    from emascope.synthesis import SynthesisError, open_snapshots

    banks = tmp_path / rf.BANKS
    banks.mkdir(parents=True)
    os.mkfifo(banks / "step_000000010.safetensors")
    os.symlink("/dev/zero", banks / "lead_000000005.safetensors")
    (banks / "step_000000020.safetensors").write_bytes(b"\xff" * 100)
    (banks / "step_000000030.safetensors").write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(SynthesisError, match="no readable bank snapshot"):
        open_snapshots(tmp_path)
    with pytest.raises(SynthesisError, match="no readable bank snapshot"):
        exporting.synthesis_preview(tmp_path, 0.999)


def test_search_without_stage_snapshots_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="search_evals > 0.*stage_snapshots=0"):
        attach(Denoiser(8), run_dir=tmp_path / "r", search_evals=3, stage_snapshots=0)
    with pytest.raises(ValueError, match="stage_snapshot_dtype"):
        attach(Denoiser(8), run_dir=tmp_path / "r", stage_snapshot_dtype="int8")
    with pytest.raises(ValueError, match="stage_lead_in"):
        attach(Denoiser(8), run_dir=tmp_path / "r", stage_lead_in=(0, 4))
    for bad in (-0.1, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="search_tolerance must be a finite number"):
            attach(Denoiser(8), run_dir=tmp_path / "r", search_evals=3, search_tolerance=bad, scoring="inline")
    assert not (tmp_path / "r").exists()
