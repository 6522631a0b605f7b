"""Smoke test of bench/bank_update.py: it runs and prints the side-by-side table (no time is asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bank_update_bench_quick_prints_the_ratio_table():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    bench = str(ROOT / "bench" / "bank_update.py")
    cmd = [sys.executable, bench, "--quick", "--device", "cpu", "--threads", "1"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    for contender in ("emascope EMABank", "timm ModelEmaV3 xK (foreach)", "torch AveragedModel xK",
                      "ema-pytorch EMA xK (use_foreach)", "naive loop", "plain copy"):
        line = next((ln for ln in text.splitlines() if ln.startswith(contender)), None)
        assert line is not None, f"{contender!r} missing from:\n{text}"
        assert line.rstrip().endswith("x"), line  # median, min, max, ratio to the bank
    assert "K = 10 decays" in text
    assert "ratio table: bank / best peer library" in text
    assert "bank effective bandwidth" in text and "of plain copy" in text
