"""Post-hoc synthesis of any decay (docs/synthesis.md): profile math against brute-force per-step
sums, synthesised weights on a real training trajectory against float64 EMAs computed here,
EDM2's sigma_rel against a direct power-function EMA, refusals, the CLI and the Python API."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from synthesis_helpers import gamma_of, train_with_references

from emascope import load_snapshot
from emascope import profiles as P
from emascope import runformat as rf
from emascope.ema_math import DEFAULT_DECAYS
from emascope.posthoc import export_synthesized, synthesize
from emascope.synthesis import SynthesisError, Target, open_snapshots, plan_synthesis

# ------------------------------------------------------------------------------------------------
# profile math against brute force: the EMA recursion run on one-hot "weights" (theta_tau = e_tau)


def brute_profiles(decay: float, step: int, m: int, bc: bool, length: int) -> np.ndarray:
    """The profile of an EMA read at ``step``: run the bank's recursion on one-hot trajectories."""
    theta = np.eye(length)
    b = decay ** m
    ema = np.zeros(length) if bc else theta[0].copy()
    n = 0
    for t in range(1, step + 1):
        if t % m == 0:
            n += 1
            ema = b * ema + (1 - b) * theta[t]
    if bc:
        return theta[0].copy() if n == 0 else ema / (1 - b ** n)
    return ema


def brute_power(gamma: float, step: int, m: int, length: int) -> np.ndarray:
    """EDM2's power-function EMA updated at steps m, 2m, ... with beta_k = (1 - 1/k)^(gamma+1)."""
    theta = np.eye(length)
    ema = theta[0].copy()
    k = 0
    for t in range(1, step + 1):
        if t % m == 0:
            k += 1
            beta = (1 - 1 / k) ** (gamma + 1)
            ema = beta * ema + (1 - beta) * theta[t]
    return ema


@pytest.mark.parametrize("m", [1, 7])
@pytest.mark.parametrize("bc", [False, True])
def test_profiles_gram_and_power_products_match_brute_force(m, bc):
    length = 260
    decays = [0.0, 0.5, 0.9, 0.97, 0.999, 0.99999]
    steps = [0, 6, 7, 50, 140, 259]
    ds = [d for d in decays for _ in steps]
    ss = [s for _ in decays for s in steps]
    raw_steps = [0, 13, 140, 259]
    prof = P.concat(P.exponential_profiles(ds, ss, m, bc), P.raw_profiles(raw_steps, m))
    brute = np.stack([brute_profiles(d, s, m, bc, length) for d, s in zip(ds, ss, strict=True)]
                     + [np.eye(length)[s] for s in raw_steps])
    assert np.allclose(brute.sum(1), 1.0, atol=1e-12)
    # (the brute force itself divides by 1 - b**n, which loses digits for decays near 1: rtol 1e-10)
    assert np.allclose(P.dense(prof, length), brute, rtol=1e-10, atol=1e-14)
    assert np.allclose(P.gram(prof), brute @ brute.T, rtol=1e-10, atol=1e-14)
    for sigma_rel in (0.05, 0.15):
        gamma = P.sigma_rel_to_gamma(sigma_rel)
        target = P.PowerProfile(gamma, 259, m)
        ref = brute_power(gamma, 259, m, length)
        assert abs(ref.sum() - 1) < 1e-12 and ref[0] == 0.0
        assert np.allclose(P.power_cross(prof, target), brute @ ref, rtol=1e-10, atol=1e-15)
        assert P.power_norm2(target) == pytest.approx(ref @ ref, rel=1e-12)


def test_sigma_rel_to_gamma_is_edm2_eq_126():
    # EDM2 (Karras et al. 2024) quotes sigma_rel 0.05 <-> gamma 16.97 and 0.10 <-> gamma 6.94
    assert P.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert P.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.05, 0.2, 0.28):
        assert P.gamma_to_sigma_rel(P.sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-12)
        assert P.sigma_rel_to_gamma(s) == pytest.approx(gamma_of(s), rel=1e-12)
    for bad in (0.0, -0.1, 0.3, float("nan")):
        with pytest.raises(ValueError, match="sigma_rel"):
            P.sigma_rel_to_gamma(bad)


def test_long_decays_lose_no_digits():
    """1 - b**n and the geometric sums are formed from 1 - d: decays near 1 keep their precision."""
    d, n = 0.999999, 10
    p = P.exponential_profiles([d], [n])
    assert p.omb[0] == pytest.approx(1 - d, rel=1e-12)
    exact = sum(((1 - d) * d ** (n - k)) ** 2 for k in range(1, n + 1)) + d ** (2 * n)
    assert P.gram(p)[0, 0] == pytest.approx(exact, rel=1e-14)


def test_solve_sums_to_one_and_reproduces_a_stored_profile():
    prof = P.exponential_profiles(list(DEFAULT_DECAYS) * 2, [1000] * 10 + [600] * 10)
    g = P.gram(prof)
    tp = P.exponential_profiles([0.9995], [1000])
    sol = P.solve(g, P.gram(prof, tp)[:, 0], float(P.gram(tp)[0, 0]), 1e-12)
    assert sol.coef.sum() == pytest.approx(1.0, abs=1e-12)
    # the ridge may spread the weight over near-identical profiles, but the profile is reproduced
    assert sol.residual < 1e-5 and sol.cond > 1.0 and sol.cond_gram >= sol.cond
    synth = P.dense(prof, 1001).T @ sol.coef
    assert np.abs(synth - P.dense(tp, 1001)[0]).max() < 1e-8
    between = P.exponential_profiles([0.9996], [1000])
    sol = P.solve(g, P.gram(prof, between)[:, 0], float(P.gram(between)[0, 0]), 1e-10)
    assert sol.coef.sum() == pytest.approx(1.0, abs=1e-12) and sol.residual < 1e-3


# ------------------------------------------------------------------------------------------------
# a real training trajectory


HALF = 1 - math.sqrt((1 - 0.9995) * (1 - 0.9997))          # halfway between neighbours in log(1 - d)
TARGETS = {
    "next to 0.9993": 0.99935,
    "halfway 0.9995-0.9997": HALF,
    "gap 0.5-0.9": 0.75,
    "gap 0.9-0.99": 0.96,
    "gap 0.99-0.999": 0.996,
    "gap 0.9999-0.99999": 0.99997,
}
SIGMA_RELS = [0.05, 0.15]
STEPS, EVERY = 2400, 400


@pytest.fixture(scope="module")
def traj(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("synth") / "run"
    return train_with_references(run_dir, steps=STEPS, score_every=EVERY, decays_ref=list(TARGETS.values()),
                                 sigma_rels=SIGMA_RELS)


def test_stage_and_lead_in_snapshots_are_written(traj):
    names = sorted(p.name for p in (traj.run_dir / rf.BANKS).iterdir())
    stages = [rf.parse_stage_snapshot_name(n) for n in names if rf.parse_stage_snapshot_name(n) is not None]
    leads = [rf.parse_lead_in_snapshot_name(n) for n in names if rf.parse_lead_in_snapshot_name(n) is not None]
    assert stages == list(range(EVERY, STEPS + 1, EVERY))
    assert leads == sorted(s - a for s in stages[-2:] for a in (4, 16, 64))  # lead-ins: newest two stages
    lead = load_snapshot(traj.run_dir / rf.lead_in_snapshot_file(STEPS - 16))
    assert lead.decays == (0.5, 0.9, 0.99, 0.999) and lead.step == STEPS - 16
    stage = load_snapshot(traj.run_dir / rf.stage_snapshot_file(STEPS))
    latest = load_snapshot(traj.run_dir / rf.SNAPSHOT)
    for v in stage.variants:
        a, b = stage.materialize(v), latest.materialize(v)
        assert all(torch.equal(a[k], b[k]) for k in a)
    events = [json.loads(x) for x in (traj.run_dir / rf.EVENTS).read_text().splitlines()]
    notice = [e for e in events if e["type"] == "stage_snapshot_plan"]
    assert len(notice) == 1 and notice[0]["max_stages"] == 8 and notice[0]["stage_bytes"] > 0
    # the disk cost announced at attach is what the files take (up to their JSON headers)
    stage_size = (traj.run_dir / rf.stage_snapshot_file(STEPS)).stat().st_size
    lead_size = sum((traj.run_dir / rf.lead_in_snapshot_file(STEPS - a)).stat().st_size for a in (4, 16, 64))
    assert 0 <= stage_size - notice[0]["stage_bytes"] < 64 * 1024
    assert 0 <= lead_size - notice[0]["lead_in_bytes"] < 3 * 64 * 1024
    written = [e for e in events if e["type"] == "stage_snapshot"]
    assert {e["role"] for e in written} == {"stage", "lead_in"} and len(written) == len(stages) * 4
    pruned = [p for e in events if e["type"] == "snapshot_pruned" for p in e["paths"]]
    assert sorted(pruned) == sorted(rf.lead_in_snapshot_file(s - a) for s in stages[:-2] for a in (4, 16, 64))


@pytest.mark.parametrize("where", list(TARGETS))
def test_synthesised_weights_match_a_float64_ema_within_the_reported_bound(traj, where):
    decay = TARGETS[where]
    sd, report = synthesize(traj.run_dir, decay=decay)
    assert report.ok and report.step == STEPS and report.calibration is not None
    ref = traj.ema[decay]
    err = float((traj.flat(sd) - ref).norm() / ref.norm())
    nearest = min(DEFAULT_DECAYS, key=lambda d: abs(math.log1p(-d) - math.log1p(-decay)))
    assert report.nearest["variant"] == repr(nearest)
    snap = float((traj.flat(load_snapshot(traj.run_dir / rf.SNAPSHOT).materialize(nearest)) - ref).norm() / ref.norm())
    assert err <= report.error_bound, (where, err, report.summary())
    assert err <= 0.25 * snap, (where, err, snap)
    assert report.predicted_error <= report.error_bound
    assert math.fsum(c["coef"] for c in report.coefficients) == pytest.approx(1.0, abs=1e-6)
    assert all(c["step"] <= STEPS for c in report.coefficients)


def test_a_bank_decay_is_reproduced(traj):
    import emascope

    assert emascope.synthesize is synthesize  # the Python API on a run directory, at the top level
    sd, report = emascope.synthesize(traj.run_dir, decay=0.999)
    row = load_snapshot(traj.run_dir / rf.SNAPSHOT).materialize(0.999)
    assert report.profile_residual < 1e-6
    assert max(float((sd[k] - row[k]).abs().max()) for k in row) < 1e-5


@pytest.mark.parametrize("sigma_rel", SIGMA_RELS)
def test_sigma_rel_matches_a_direct_power_function_ema(traj, sigma_rel):
    sd, report = synthesize(traj.run_dir, sigma_rel=sigma_rel)
    ref = traj.power[sigma_rel]
    err = float((traj.flat(sd) - ref).norm() / ref.norm())
    assert report.target["gamma"] == pytest.approx(gamma_of(sigma_rel))
    assert err <= report.error_bound, (err, report.summary())
    assert err < 1e-3


def test_only_snapshots_at_or_before_the_target_step_are_used(traj):
    step = 1200
    sd, report = synthesize(traj.run_dir, decay=0.999, step=step)
    assert report.step == step and max(report.snapshots) == step
    assert all(c["step"] <= step for c in report.coefficients)
    stage = load_snapshot(traj.run_dir / rf.stage_snapshot_file(step)).materialize(0.999)
    assert max(float((sd[k] - stage[k]).abs().max()) for k in stage) < 1e-5


def test_targets_outside_what_the_snapshots_hold_are_refused_or_reported_large(traj):
    # a short average at a step far from any snapshot: its weights were never stored
    with pytest.raises(SynthesisError, match="refused.*profile residual"):
        synthesize(traj.run_dir, decay=0.9, step=STEPS - 200)
    _, report = synthesize(traj.run_dir, decay=0.9, step=STEPS - 200, force=True)
    assert not report.ok and report.profile_residual > 0.2 and report.error_bound > 0.01
    with pytest.raises(SynthesisError, match="after the latest snapshot"):
        synthesize(traj.run_dir, decay=0.999, step=STEPS + 1)
    with pytest.raises(ValueError, match="decay"):
        synthesize(traj.run_dir, decay=1.0)


def test_leave_one_out_calibration_is_cached_and_consistent(traj):
    cache = json.loads((traj.run_dir / rf.SYNTHESIS_CACHE).read_text())
    cal = cache["steps"][str(STEPS)]["calibration"]
    assert {x["decay"] for x in cal["loo"]} == set(DEFAULT_DECAYS)
    # each row's leave-one-out error is recomputed here from the plan's own coefficients
    snaps = open_snapshots(traj.run_dir)
    plan = plan_synthesis(traj.run_dir, Target(decay=0.9995), snaps=snaps, ridge=cal["ridge"])
    assert plan.report.calibration.ridge == cal["ridge"]
    loo = {x["decay"]: x for x in cal["loo"]}
    assert loo[0.9995]["weight_error"] < loo[0.9995]["snap_error"]
    assert all(x["weight_error"] >= 0 and x["profile_residual"] > 0 for x in cal["loo"])


# ------------------------------------------------------------------------------------------------
# files: export, CLI, metadata


def test_export_synthesized_writes_a_loadable_checkpoint_with_its_error(traj, tmp_path):
    out, report = export_synthesized(traj.run_dir, tmp_path / "e.safetensors", decay=HALF)
    sd = load_file(str(out))
    ref, _ = synthesize(traj.run_dir, decay=HALF)
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in sd)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["synthesized"] == "true" and meta["decay"] == repr(HALF) and meta["step"] == str(STEPS)
    assert float(meta["profile_residual"]) == report.profile_residual
    assert float(meta["error_bound"]) == report.error_bound
    # --out is checked before the synthesis: never a file of the run itself, never a folder
    before = (traj.run_dir / rf.RUN_JSON).read_bytes()
    with pytest.raises(ValueError, match="a file of the run itself"):
        export_synthesized(traj.run_dir, traj.run_dir / rf.RUN_JSON, decay=HALF)
    with pytest.raises(ValueError, match="is a folder"):
        export_synthesized(traj.run_dir, tmp_path, decay=HALF)
    assert (traj.run_dir / rf.RUN_JSON).read_bytes() == before
    assert (out.stat().st_mode & 0o777) == (0o666 & ~_umask())  # the umask's mode, not safetensors' 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emascope.cli", "export", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_exports_decay_and_sigma_rel_and_names_bad_input(traj, tmp_path):
    out = tmp_path / "s.safetensors"
    rep = tmp_path / "r.json"
    done = _cli(str(traj.run_dir), "--sigma-rel", "0.05", "--out", str(out), "--report", str(rep))
    assert done.returncode == 0, done.stderr
    assert "profile residual" in done.stdout and "predicted weight error" in done.stdout
    report = json.loads(rep.read_text())
    assert report["target"]["sigma_rel"] == 0.05 and report["error_bound"] > 0
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["variant"] == "sigma_rel=0.05"
    bad = _cli(str(traj.run_dir), "--decay", "1.5")
    assert bad.returncode == 2 and "decay must be a number in (0, 1)" in bad.stderr
    refused = _cli(str(traj.run_dir), "--decay", "0.9", "--step", str(STEPS - 200), "--out", str(tmp_path / "x"))
    assert refused.returncode == 2 and "refused" in refused.stderr and not (tmp_path / "x").exists()
    both = _cli(str(traj.run_dir), "--decay", "0.99", "--variant", "0.99")
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_reduced_precision_stage_snapshots_load_and_report_their_rounding(tmp_path):
    """bf16 / fp16 stage snapshots: readable by load_snapshot and synthesis; the rounding floor of
    the report reflects the storage dtype (its measured effect is in bench/synthesis.py)."""
    floors = {}
    for dt in ("float32", "bfloat16", "float16"):
        traj = train_with_references(tmp_path / dt, steps=400, score_every=100, decays_ref=[0.996], sigma_rels=[],
                                     stage_snapshot_dtype=dt, stage_snapshots=3)
        kept = sorted(p.name for p in (traj.run_dir / rf.BANKS).glob("step_*"))
        # the retention policy keeps the oldest and the newest, and thins in between
        assert kept == ["step_000000100.safetensors", "step_000000300.safetensors", "step_000000400.safetensors"]
        with safe_open(str(traj.run_dir / rf.stage_snapshot_file(300)), framework="pt") as f:
            assert f.get_slice("bank").get_dtype() == {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dt]
        stored = load_snapshot(traj.run_dir / rf.stage_snapshot_file(300)).materialize(0.99)
        assert all(t.dtype == torch.float32 for t in stored.values())
        _, report = synthesize(traj.run_dir, decay=0.996, step=300)  # stage snapshots only (latest is at 400)
        floors[dt] = report.rounding_floor
    assert floors["float32"] < floors["float16"] < floors["bfloat16"]


# ------------------------------------------------------------------------------------------------
# merged rules: a synthesised export honours "overwrite"; a sharded run is refused with its reason


def test_synthesised_request_honours_overwrite(tmp_path):
    from emascope.requests import RequestPoller

    body = {"id": "s1", "decay": 0.9996, "name": "syn", "dtype": None}
    assert rf.parse_request(body, stem="s1").overwrite is False
    assert rf.parse_request({**body, "overwrite": True}, stem="s1").overwrite is True
    with pytest.raises(ValueError, match="overwrite"):
        rf.parse_request({**body, "overwrite": "yes"}, stem="s1")
    req = rf.parse_request({**body, "overwrite": True}, stem="s1")
    sent = rf.request_body(req, 1.0)
    assert sent["overwrite"] is True and rf.parse_request(sent, stem="s1") == req

    (tmp_path / rf.REQUESTS).mkdir()
    (tmp_path / rf.EXPORTS).mkdir()
    old = tmp_path / rf.export_file("syn")
    old.write_bytes(b"kept")
    calls, results = [], []

    def synthesize(request, path):
        calls.append(request.id)
        path.write_bytes(b"new")
        return 3, {"step": 7}

    def resolve(v):
        raise ValueError("not in the bank")

    poller = RequestPoller(tmp_path, lambda *a: 0, resolve_variant=resolve, on_result=results.append,
                           synthesize=synthesize)
    (tmp_path / rf.request_file("s1")).write_text(json.dumps(body))
    assert poller.poll(5) == 1
    poller.join()
    assert calls == [] and old.read_bytes() == b"kept"
    assert results[-1]["state"] == "error" and "FileExistsError" in results[-1]["error"]
    (tmp_path / rf.request_file("s2")).write_text(json.dumps({**body, "id": "s2", "overwrite": True}))
    assert poller.poll(6) == 1
    poller.join()
    assert calls == ["s2"] and old.read_bytes() == b"new" and results[-1]["state"] == "done"


def test_sharded_run_is_refused_by_synthesis_with_its_reason(tmp_path):
    from emascope.dashboard import exporting

    (tmp_path / rf.BANKS).mkdir()
    (tmp_path / rf.SNAPSHOT_INDEX).write_text("{}")
    with pytest.raises(SynthesisError, match="sharded"):
        open_snapshots(tmp_path)
    with pytest.raises(FileNotFoundError, match="sharded"):
        exporting.export_from_snapshot(tmp_path, None, "x", decay=0.9995)
    (tmp_path / rf.EXPORTS).mkdir()
    (tmp_path / rf.export_file("x")).write_bytes(b"kept")
    with pytest.raises(exporting.ExportExists):
        exporting.export_from_snapshot(tmp_path, None, "x", decay=0.9995)
    with pytest.raises(exporting.ExportExists):
        exporting.request_export(tmp_path, None, "x", decay=0.9995)
    rid = exporting.request_export(tmp_path, None, "x", decay=0.9995, overwrite=True)
    sent = json.loads((tmp_path / rf.request_file(rid)).read_text())
    assert sent["overwrite"] is True and sent["decay"] == 0.9995


def test_synthesised_points_sit_between_their_grid_decays():
    from emascope.dashboard.plots import decay_positions, synthesized_positions

    pos = decay_positions(["raw", "0.99", "0.999", "0.9999"])
    x = synthesized_positions([0.99, 0.9968377, 0.999, 0.99999, 0.5], pos)
    assert x[0] == pytest.approx(pos["0.99"]) and x[2] == pytest.approx(pos["0.999"])
    assert pos["0.99"] < x[1] < pos["0.999"] and x[1] == pytest.approx((pos["0.99"] + pos["0.999"]) / 2, abs=1e-3)
    assert pos["0.9999"] < x[3] <= pos["0.9999"] + 0.5 and pos["0.99"] - 0.5 <= x[4] < pos["0.99"]


def test_search_stops_within_the_best_grid_decays_standard_error():
    """Without ``search_tolerance`` the search's noise is the standard error of the best grid
    decay's value (direction-aware); a user's tolerance wins; no standard error, no noise stop. On a
    parabola in log(1 - decay) whose bracket values differ by 0.69 at most, an se of 0.8 stops the search
    before any evaluation and an se of 1e-9 lets it spend its budget."""
    from emascope.decay_search import search_between, search_noise, to_x

    grid = {0.99: 1.0, 0.999: 0.7, 0.9999: 1.2}
    ses = {0.99: 0.05, 0.999: 0.5, 0.9999: 0.01}
    assert search_noise(grid, ses, direction="lower", tolerance=None) == (0.5, "standard_error")
    assert search_noise(grid, ses, direction="higher", tolerance=None) == (0.01, "standard_error")
    assert search_noise(grid, ses, direction="lower", tolerance=0.2) == (0.2, "search_tolerance")
    assert search_noise(grid, {0.999: None}, direction="lower", tolerance=None) == (None, None)
    assert search_noise({0.99: None}, ses, direction="lower", tolerance=None) == (None, None)

    def f(d: float) -> float:
        return 0.7 + 0.1 * (to_x(d) - to_x(0.9993)) ** 2

    calls: list[float] = []
    exact = {d: f(d) for d in grid}  # bracket values 1.41, 0.71, 1.08: they differ by 0.69 at most
    noisy = search_between(exact, lambda d: calls.append(d) or f(d), direction="lower", max_evals=5,
                           noise=search_noise(exact, {0.999: 0.8}, direction="lower", tolerance=None)[0])
    assert calls == [] and "uncertainty" in noisy.stopped
    sharp = search_between(exact, lambda d: calls.append(d) or f(d), direction="lower", max_evals=5,
                           noise=search_noise(exact, {0.999: 1e-9}, direction="lower", tolerance=None)[0])
    assert len(calls) == 5 and sharp.stopped.startswith("evaluation budget") and not sharp.best_is_grid
    assert abs(to_x(sharp.best_decay) - to_x(0.9993)) < abs(to_x(0.999) - to_x(0.9993))
