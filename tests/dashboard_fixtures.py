"""Crafted run directories for the dashboard tests, written file by file as docs/run-format.md says.

The numbers follow a simple model of a decay sweep: FID is U-shaped in log10(1 - decay) with an
optimum that moves to larger decays as training goes on, precision rises and recall falls with
the decay, and the two longest averages collapse (FID off the scale, recall 0) early in training.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

DECAYS = (0.5, 0.9, 0.99, 0.999, 0.9993, 0.9995, 0.9997, 0.9999, 0.99999, 0.999999)
VARIANTS = ["raw"] + [repr(d) for d in DECAYS]
DIRECTIONS = {
    "fid": "lower",
    "precision": "higher",
    "recall": "higher",
    "density": "higher",
    "coverage": "higher",
    "kid_mean": "lower",
    "isc_mean": "higher",
    "fd": "lower",
}


def run_info(
    name: str = "toy",
    *,
    format_version: int = 1,
    directions: dict | None = None,
    sample_kind: str | None = "points",
    decays=DECAYS,
) -> dict:
    return {
        "format": "emascope-run",
        "format_version": format_version,
        "run_id": f"20260101-000000-{name}",
        "name": name,
        "start_time": 1_795_000_000.0,
        "host": "testhost",
        "pid": 1,
        "emascope_version": "0.1.0",
        "decays": list(decays),
        "variants": ["raw"] + [repr(float(d)) for d in decays],
        "model": {"class": "MLP", "num_params": 10, "num_trainable": 10, "dtypes": {"float32": 10}},
        "settings": {
            "device": "cpu",
            "update_every": 1,
            "bias_correction": False,
            "bema": None,
            "score_every": 1000,
            "snapshot_every": 1000,
            "num_samples": 100,
            "seed": 0,
            "feature_extractor": "identity",
        },
        "metric_directions": DIRECTIONS if directions is None else directions,
        "sample_kind": sample_kind,
    }


def model_value(metric: str, step: int, variant: str, total: int = 10_000, shift: float = 0.0) -> float:
    """Synthetic metric value of a variant at a stage (see module doc)."""
    frac = min(step / total, 1.0)
    x = 0.0 if variant == "raw" else -math.log10(1.0 - float(variant))  # 0.3 .. 6
    opt = 2.2 + 1.5 * frac  # best decay drifts from ~0.994 to ~0.9998
    collapsed = x > opt + 1.6
    fid = 3.0 + shift - frac + 0.2 * (x - opt) ** 2
    prec = min(0.95, 0.55 + 0.06 * x)
    rec = max(0.0, 0.75 - 0.035 * x * x)
    if collapsed:
        fid, prec, rec = 400.0 + 10 * x, 0.0, 0.0
    return {
        "fid": fid,
        "fd": fid / 100,
        "precision": prec,
        "recall": rec,
        "density": prec * 1.1,
        "coverage": rec * 0.9,
        "kid_mean": fid / 1000,
        "isc_mean": 10 - fid,
    }.get(metric, x)


def metric_lines(
    steps, variants=VARIANTS, metrics=("fid", "precision", "recall"), shift: float = 0.0, total: int = 10_000
) -> list[dict]:
    out = []
    for s in steps:
        for v in variants:
            for m in metrics:
                val = model_value(m, s, v, total, shift)
                out.append(
                    {
                        "step": int(s),
                        "variant": v,
                        "decay": None if v in ("raw", "bema") else float(v),
                        "metric": m,
                        "value": None if not math.isfinite(val) else val,
                        "time": 1_795_000_000.0 + s,
                    }
                )
    return out


def write_jsonl(path: Path, records, mode: str = "a") -> None:
    with open(path, mode, encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def write_heartbeat(run: Path, state: str = "closed", step: int = 0, age: float = 0.0) -> None:
    (run / "heartbeat").write_text(
        json.dumps({"time": time.time() - age, "step": step, "pid": 1, "state": state, "interval": 2.0})
    )


def make_run(
    root: Path,
    name: str = "toy",
    steps=(1000, 2000, 3000),
    *,
    metrics=("fid", "precision", "recall"),
    state: str = "closed",
    shift: float = 0.0,
    samples: bool = True,
    info: dict | None = None,
) -> Path:
    """A finished (or live) run directory with metrics, events, heartbeat and point previews."""
    run = root / name
    run.mkdir(parents=True, exist_ok=True)
    (run / "run.json").write_text(json.dumps(info or run_info(name)))
    write_jsonl(run / "metrics.jsonl", metric_lines(steps, metrics=metrics, shift=shift), mode="w")
    events = [{"time": 1.0, "step": 0, "type": "start"}]
    for s in steps:
        events += [
            {"time": 2.0, "step": s, "type": "score_start", "variants": VARIANTS},
            {
                "time": 3.0,
                "step": s,
                "type": "score_done",
                "seconds": 1.5,
                "timings": {"sampling": 1.0, "features": 0.2, "metrics": 0.3, "user_metrics": 0.0},
                "num_samples": 100,
            },
        ]
    write_jsonl(run / "events.jsonl", events, mode="w")
    write_heartbeat(run, state, steps[-1] if steps else 0)
    if samples:
        rng = np.random.default_rng(0)
        (run / "samples").mkdir(exist_ok=True)
        np.save(run / "samples" / "reference.npy", rng.normal(size=(300, 2)).astype(np.float32))
        for s in steps:
            d = run / "samples" / f"step_{s:09d}"
            d.mkdir(exist_ok=True)
            for v in VARIANTS:
                np.save(d / f"{v}.npy", (rng.normal(size=(200, 2)) * 0.8).astype(np.float32))
    return run
