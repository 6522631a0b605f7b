"""Smoke test of bench/scoring_modes.py: it runs and prints its three tables (no time is asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_scoring_modes_bench_quick_prints_the_tables():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "bench" / "scoring_modes.py"), "--quick"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    for name in ("tree2d", "conv"):
        assert re.search(rf"^  {name} +[\d.]+s +[\d.]+ms +[\d.]+ms +[\d.]+% +[\d.]+x$", text, re.M), text
        assert re.search(rf"^  {name} \(shipped\) +11 x \d+ +[\d.]+s +[\d.]+s +[\d.]+x +[\d.e+-]+$", text, re.M), text
    for layer in ("18 -> 128", "128 -> 128", "128 -> 2"):  # part 2 per layer: loop vs vmap of F.linear
        assert re.search(rf"^  {layer} +[\d.]+ms +[\d.]+ms +[\d.]+x$", text, re.M), text
    for label in ("torch-fidelity kid_features_to_metric", "emascope.kid (torch, shared reference)"):
        assert re.search(rf"^  {re.escape(label)} +[\d.]+ s +[\d.]+x torch-fidelity's speed$", text, re.M), text
    err = float(re.search(r"max \|kid_mean - torch-fidelity's\| = ([\d.e+-]+)", text).group(1))
    assert err < 1e-6
