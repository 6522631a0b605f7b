"""Post-hoc synthesis of any decay (docs/synthesis.md): how accurate, and at what cost.

Part ``accuracy`` (a real training trajectory): the tree2d sample's flow-matching MLP (~50k
parameters, Adam) is trained with the agent attached (default decays, stages every
``--every`` steps with their lead-in snapshots); beside it, float64 EMAs of a grid of target
decays (log-spaced in ``1 - d`` over the bank's range, plus the points halfway between bank
decays) and EDM2 power-function EMAs (sigma_rel 0.05, 0.1, 0.2) are computed directly. For each
target, side by side: the relative weight-space error of the synthesised weights and of snapping
to the nearest bank decay, their ratio, and whether the error lies within the reported bound —
for several snapshot sets (all stages with lead-ins = the default schedule; without lead-ins; only
the last 1, 2, 4 stages) and storage dtypes (float32, float16, bfloat16 copies of the same
snapshots). ``--plot PATH`` draws error vs decay (PNG).

Part ``memory`` (a ~25M-parameter transformer-shaped model): a run directory with 3 stage
snapshots and the last stage's lead-ins (~4.8 GB on disk, in a temp folder removed afterwards);
each contender runs in a fresh process and reports wall time and peak RSS:
``emascope synthesize`` (streaming tensor by tensor, first call with its leave-one-out pass and
again with it cached) against a naive synthesis that loads each snapshot file whole
(``safetensors.torch.load_file``) and accumulates ``sum c_i row_i`` in float64.

    .venv/bin/python bench/synthesis.py                                   # both parts
    .venv/bin/python bench/synthesis.py --part accuracy --plot docs/synthesis-error.png
    .venv/bin/python bench/synthesis.py --part memory
    .venv/bin/python bench/synthesis.py --quick                           # smoke run (small, fast)

Prints tables; asserts nothing. One thread (``torch.set_num_threads(1)``) unless ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from emascope import attach, load_snapshot  # noqa: E402
from emascope import runformat as rf  # noqa: E402
from emascope.ema_math import DEFAULT_DECAYS  # noqa: E402
from emascope.posthoc import materialize  # noqa: E402
from emascope.profiles import sigma_rel_to_gamma  # noqa: E402
from emascope.snapshot import save_snapshot  # noqa: E402
from emascope.synthesis import (  # noqa: E402
    SynthesisError,
    Target,
    calibrate,
    calibration_step,
    close_all,
    nearest_decay,
    open_snapshots,
    plan_synthesis,
)

SIGMA_RELS = (0.05, 0.1, 0.2)


# ---------------------------------------------------------------------------------------------
# part 1: accuracy on a real trajectory


def target_grid(quick: bool) -> list[float]:
    """Log-spaced in 1 - d from 0.4 to 5e-7, plus the points halfway between bank decays."""
    n = 9 if quick else 22
    gaps = np.exp(np.linspace(math.log(0.4), math.log(5e-7), n))
    halves = [1 - math.sqrt((1 - a) * (1 - b)) for a, b in zip(DEFAULT_DECAYS, DEFAULT_DECAYS[1:], strict=False)]
    grid = sorted({round(float(1 - g), 12) for g in gaps} | {round(h, 12) for h in halves})
    return [d for d in grid if d not in DEFAULT_DECAYS]


def train(run_dir: Path, steps: int, every: int, targets: list[float]) -> dict:
    from emascope.samples.flow import flow_matching_loss
    from emascope.samples.tree2d import Tree2DConfig, build_model
    from emascope.samples.tree_mixture import make_tree

    cfg = Tree2DConfig()
    torch.manual_seed(0)
    tree = make_tree()
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(0)
    names = [k for k, _ in model.named_parameters()]

    def flat() -> torch.Tensor:
        return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])

    th = flat()
    d = torch.tensor(targets, dtype=torch.float64)[:, None]
    ema = th[None].repeat(len(targets), 1)
    gam = [sigma_rel_to_gamma(s) for s in SIGMA_RELS]
    pw = th[None].repeat(len(gam), 1)
    scope = attach(model, opt, run_dir=run_dir, score_every=every, stage_snapshots=None)
    t0 = time.perf_counter()
    for t in range(1, steps + 1):
        loss = flow_matching_loss(model, tree.sample(cfg.batch_size, g), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        th = flat()
        ema = d * ema + (1 - d) * th[None]
        beta = torch.tensor([(1 - 1 / t) ** (x + 1) for x in gam], dtype=torch.float64)[:, None]
        pw = beta * pw + (1 - beta) * th[None]
    scope.close(score=False)
    print(f"trained {steps} steps ({sum(p.numel() for p in model.parameters())} parameters) in "
          f"{time.perf_counter() - t0:.0f} s; stages every {every} steps")
    return {"names": names, "ema": dict(zip(targets, ema, strict=True)),
            "power": dict(zip(SIGMA_RELS, pw, strict=True))}


def reduced_copy(run_dir: Path, out: Path, dtype: torch.dtype) -> Path:
    """A copy of the run's stage and lead-in snapshots with their rows stored in ``dtype``."""
    (out / rf.BANKS).mkdir(parents=True, exist_ok=True)
    for p in (run_dir / rf.BANKS).iterdir():
        role = rf.ROLE_STAGE if rf.parse_stage_snapshot_name(p.name) is not None else \
            rf.ROLE_LEAD_IN if rf.parse_lead_in_snapshot_name(p.name) is not None else None
        if role is None:
            continue
        bank = load_snapshot(p)
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = {k: v for k, v in f.metadata().items() if k != rf.SNAPSHOT_META_KEY}
        save_snapshot(bank, out / rf.BANKS / p.name, meta, dtype=dtype)
    return out


def snapshot_sets(snaps: list, every: int) -> dict[str, list]:
    """Named subsets of the opened snapshots (``latest`` left out: stage files only)."""
    stages = sorted({s.step for s in snaps if s.role == rf.ROLE_STAGE})
    files = [s for s in snaps if s.role != "latest"]

    def last(k: int, leads: bool = True) -> list:
        keep = set(stages[-k:])
        return [s for s in files if (s.role == rf.ROLE_STAGE and s.step in keep)
                or (leads and s.role == rf.ROLE_LEAD_IN and s.stage in keep)]

    n = len(stages)
    out = {f"all {n} stages + lead-ins (default)": last(n), f"all {n} stages, no lead-ins": last(n, False)}
    for k in (4, 2, 1):
        if k < n:
            out[f"last {k} stage{'s' if k > 1 else ''} + lead-ins"] = last(k)
    return out


def evaluate_set(run_dir: Path, snaps: list, ref: dict, targets: list[float]) -> list[dict]:
    step = max(s.step for s in snaps if s.role == rf.ROLE_STAGE)
    stage = next(s for s in snaps if s.role == rf.ROLE_STAGE and s.step == step)
    cstep = calibration_step(snaps, step)
    cal = calibrate(snaps, cstep) if cstep is not None else None
    rows_at_t = {d: None for d in stage.decays}
    names = ref["names"]

    def flat_of(sd: dict) -> torch.Tensor:
        return torch.cat([sd[k].double().reshape(-1) for k in names])

    bank = load_snapshot(stage.path)
    for d in rows_at_t:
        rows_at_t[d] = flat_of(bank.materialize(d))
    out = []
    items = [("decay", d, ref["ema"][d]) for d in targets] + [("sigma_rel", s, ref["power"][s]) for s in SIGMA_RELS]
    for kind, value, y in items:
        target = Target(decay=value, step=step) if kind == "decay" else Target(sigma_rel=value, step=step)
        try:
            plan = plan_synthesis(run_dir, target, snaps=snaps, calibration=cal, force=True, write_cache=False)
        except SynthesisError as exc:
            out.append({"kind": kind, "value": value, "error": str(exc)})
            continue
        synth = flat_of(materialize(plan, torch.float64))
        near = float(plan.report.nearest["variant"])
        if kind == "decay":
            near = nearest_decay(stage.decays, value)
        err = float((synth - y).norm() / y.norm())
        snap = float((rows_at_t[near] - y).norm() / y.norm())
        rep = plan.report
        out.append({"kind": kind, "value": value, "synth": err, "snap": snap, "ratio": err / snap if snap else math.inf,
                    "predicted": rep.predicted_error, "bound": rep.error_bound, "residual": rep.profile_residual,
                    "within": rep.error_bound is not None and err <= rep.error_bound, "ok": rep.ok,
                    "nearest": near, "cond": rep.condition_number})
    return out


def summarize(name: str, rows: list[dict]) -> dict:
    good = [r for r in rows if "synth" in r and r["kind"] == "decay"]
    ratios = np.array([r["ratio"] for r in good])
    power = [r for r in rows if "synth" in r and r["kind"] == "sigma_rel"]
    return {"set": name, "targets": len(good), "median_ratio": float(np.median(ratios)),
            "max_ratio": float(ratios.max()), "share_quarter": float(np.mean(ratios <= 0.25)),
            "within_bound": float(np.mean([r["within"] for r in good + power])),
            "power_err": max((r["synth"] for r in power), default=math.nan)}


def accuracy(args: argparse.Namespace, tmp: Path) -> None:
    steps, every = (800, 200) if args.quick else (args.steps, args.every)
    targets = target_grid(args.quick)
    run_dir = tmp / "tree2d"
    ref = train(run_dir, steps, every, targets)
    results: dict[str, list[dict]] = {}
    summaries = []
    snaps = open_snapshots(run_dir)
    for name, subset in snapshot_sets(snaps, every).items():
        results[name] = evaluate_set(run_dir, subset, ref, targets)
        summaries.append(summarize(name, results[name]))
    close_all(snaps)
    for label, dt in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        copy = reduced_copy(run_dir, tmp / f"tree2d-{label}", dt)
        snaps = open_snapshots(copy)
        name = f"all stages + lead-ins, {label} rows"
        results[name] = evaluate_set(copy, [s for s in snaps if s.role != "latest"], ref, targets)
        summaries.append(summarize(name, results[name]))
        close_all(snaps)
    default = next(iter(results))
    print(f"\nPer target, default schedule ({default}); errors relative to the weights' norm:")
    print(f"{'target':>22} | {'synth err':>9} | {'snap err':>9} | {'synth/snap':>10} | {'bound':>9} | within")
    for r in results[default]:
        if "synth" not in r:
            print(f"{r['kind']} {r['value']!r:>14} | {r['error']}")
            continue
        label = f"{r['kind']} {r['value']!r}"
        print(f"{label:>22} | {r['synth']:9.2e} | {r['snap']:9.2e} | {r['ratio']:10.3f} | "
              f"{(r['bound'] or math.nan):9.2e} | {'yes' if r['within'] else 'NO'}")
    print("\nSummary over the decay targets (synth/snap: synthesis error / error of snapping to the nearest "
          "bank decay; within: share of all targets inside the reported bound; power: worst sigma_rel error):")
    print(f"{'snapshot set':>40} | {'median':>7} | {'max':>7} | {'<=1/4':>6} | {'within':>6} | {'power':>8}")
    for s in summaries:
        print(f"{s['set']:>40} | {s['median_ratio']:7.1e} | {s['max_ratio']:7.3f} | {s['share_quarter']:6.2f} | "
              f"{s['within_bound']:6.2f} | {s['power_err']:8.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"summaries": summaries, "results": results}, indent=1))
    if args.plot:
        plot(results, Path(args.plot), steps, every)


def plot(results: dict[str, list[dict]], path: Path, steps: int, every: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    default = names[0]
    fig, ax = plt.subplots(figsize=(8.4, 3.4), dpi=100)
    rows = [r for r in results[default] if r["kind"] == "decay" and "synth" in r]
    x = [1 - r["value"] for r in rows]
    ax.plot(x, [r["snap"] for r in rows], "o-", color="#999999", ms=3, label="snap to nearest bank decay")
    styles = {default: ("#d62728", "o-"), names[1]: ("#ff7f0e", "s--")}
    for name in names:
        if name in styles or "bfloat16" in name:
            color, style = styles.get(name, ("#1f77b4", "^:"))
            pts = [r for r in results[name] if r["kind"] == "decay" and "synth" in r]
            ax.plot([1 - r["value"] for r in pts], [r["synth"] for r in pts], style, color=color, ms=3,
                    label=f"synthesised: {name}")
    ax.plot(x, [r["bound"] for r in rows], "-", color="#d62728", alpha=0.35, lw=4,
            label="reported error bound (default)")
    for d in DEFAULT_DECAYS:
        ax.axvline(1 - d, color="#cccccc", lw=0.6, zorder=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xticks([1 - d for d in DEFAULT_DECAYS])
    ax.set_xticklabels([repr(d) for d in DEFAULT_DECAYS], rotation=45, fontsize=7)
    ax.set_xlabel("decay (grey lines: the bank's)")
    ax.set_ylabel("relative weight error")
    ax.set_title(f"Synthesised EMA vs float64 EMA, tree2d MLP, step {steps} (stages every {every})", fontsize=9)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"plot: {path} ({path.stat().st_size / 1e3:.0f} kB)")


# ---------------------------------------------------------------------------------------------
# part 2: time and memory for a 25M-parameter model


def build_run(run_dir: Path, params: int, quick: bool) -> None:
    from bank_update import build_model

    from emascope.bank import EMABank
    from emascope.stage_snapshots import lead_in_steps, write_lead_in_snapshot, write_stage_snapshot

    model = build_model(params, quick)
    bank = EMABank(model)
    every = 200
    stages = [every, 2 * every, 3 * every]
    leads = lead_in_steps(stages[-1], (4, 16, 64))
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    drift = {id(p): 1e-3 * torch.randn(p.shape, generator=gen) for p in model.parameters()}
    with torch.no_grad():
        for step in range(1, stages[-1] + 1):
            for p in model.parameters():  # a deterministic drift: the bench times I/O and arithmetic
                p.add_(drift[id(p)])
            bank.update()
            if step in stages:
                write_stage_snapshot(bank, run_dir, step)
            elif step in leads:
                write_lead_in_snapshot(bank, run_dir, step, stages[-1], lead_in=(4, 16, 64))
    size = sum(p.stat().st_size for p in (run_dir / rf.BANKS).iterdir())
    n = sum(p.numel() for p in model.parameters())
    print(f"\nrun directory: {n / 1e6:.1f}M parameters, {len(stages)} stage snapshots + {len(leads)} lead-ins, "
          f"{size / 1e9:.2f} GB, built in {time.perf_counter() - t0:.0f} s")


CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
run_dir, mode = sys.argv[1], sys.argv[2]
import emascope.posthoc, emascope.synthesis, safetensors.torch  # noqa: E401 (the baseline imports the same)
t0 = time.perf_counter()
if mode == "baseline":
    extra = {}
elif mode == "streaming":
    from emascope.posthoc import synthesize
    sd, report = synthesize(run_dir, decay=0.99961)
    extra = {"residual": report.profile_residual, "averages": report.num_averages,
             "numel": sum(t.numel() for t in sd.values())}
else:  # naive: every snapshot file loaded whole, sum c_i row_i accumulated in float64
    from safetensors.torch import load_file
    from emascope.synthesis import Target, close_all, open_snapshots, plan_synthesis
    snaps = open_snapshots(run_dir)
    plan = plan_synthesis(run_dir, Target(decay=0.99961), snaps=snaps, calibrate_loo=False)
    acc = None
    for si, s in enumerate(plan.basis.snaps):
        tensors = load_file(str(s.path))
        for k, it in enumerate(plan.basis.items):
            if it.snap != si or plan.coef[k] == 0:
                continue
            if it.row is None:
                x = torch.cat([tensors["live/" + e.name].double().reshape(-1) for e in s.layout if e.kind == "avg"])
            else:
                x = tensors["bank"][it.row].double()
            acc = x.mul_(plan.coef[k]) if acc is None else acc.add_(x, alpha=float(plan.coef[k]))
        del tensors
    close_all(snaps)
    sd = {"flat": acc.float()}
    extra = {}
seconds = time.perf_counter() - t0
# VmHWM: this process's own peak RSS (ru_maxrss survives exec, so it would show the parent's)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss": peak, **extra}))
"""


def child(run_dir: Path, mode: str, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(run_dir), mode, str(threads)], capture_output=True,
                         text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory(args: argparse.Namespace, tmp: Path) -> None:
    run_dir = tmp / "big"
    params = 2_000_000 if args.quick else args.params
    if not (run_dir / rf.BANKS).is_dir():  # with --keep, a run directory built before is reused
        (run_dir / rf.BANKS).mkdir(parents=True)
        build_run(run_dir, params, args.quick)
    (run_dir / rf.SYNTHESIS_CACHE).unlink(missing_ok=True)
    base = child(run_dir, "baseline", args.threads)        # the interpreter with torch and emascope imported
    first = child(run_dir, "streaming", args.threads)      # computes and caches the leave-one-out pass
    cached = child(run_dir, "streaming", args.threads)     # calibration read from banks/synthesis.json
    naive = child(run_dir, "naive", args.threads)
    snap = max(p.stat().st_size for p in (run_dir / rf.BANKS).glob("step_*"))
    print(f"\nSynthesising decay 0.99961 from {first['averages']} stored averages (one stage snapshot: "
          f"{snap / 1e9:.2f} GB), each in a fresh process:")
    print(f"(peak RSS above the interpreter's own {base['peak_rss'] / 1e9:.2f} GB with torch imported; the "
          f"synthesised model itself is {4 * first['numel'] / 1e9:.2f} GB in float32)")
    print(f"{'contender':>50} | {'seconds':>8} | {'peak RSS':>9} | {'RSS / streaming':>15}")
    ref = max(cached["peak_rss"] - base["peak_rss"], 1)
    for name, r in (("emascope synthesize, first (+ leave-one-out pass)", first),
                    ("emascope synthesize, calibration cached", cached),
                    ("naive: load each snapshot whole, accumulate", naive)):
        extra = r["peak_rss"] - base["peak_rss"]
        print(f"{name:>50} | {r['seconds']:8.1f} | {extra / 1e9:7.2f} GB | {extra / ref:15.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["accuracy", "memory", "both"], default="both")
    ap.add_argument("--steps", type=int, default=4000, help="training steps of the accuracy part")
    ap.add_argument("--every", type=int, default=500, help="steps between stages (accuracy part)")
    ap.add_argument("--params", type=int, default=25_000_000, help="model size of the memory part")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", default=None, help="write the error-vs-decay plot here (PNG)")
    ap.add_argument("--json", default=None, help="write all numbers here (JSON)")
    ap.add_argument("--quick", action="store_true", help="small and fast (smoke test)")
    ap.add_argument("--keep", default=None, help="keep the run directories in this folder (and reuse them)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="emascope-synthesis-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        if args.part in ("accuracy", "both"):
            accuracy(args, tmp)
        if args.part in ("memory", "both"):
            memory(args, tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
