"""Smoke test of bench/agent_overhead.py: it runs and prints its tables (no time is asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_agent_overhead_bench_quick_prints_the_tables():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "bench" / "agent_overhead.py"), "--quick", "--threads", "1"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "ERRORS" not in text, text
    assert re.search(r"^  plain loop \(median step\) +[\d.]+ ms$", text, re.M), text
    assert re.search(r"^  with agent attached \(median step\) +[\d.]+ ms$", text, re.M), text
    assert re.search(r"^  ratio agent / plain +\d+\.\d{3} +\(median of per-block ratios of means", text,
                     re.M), text
    assert re.search(r"^  bank\.update\(\) alone +[\d.]+ ms", text, re.M), text
    assert re.search(r"^  ratio of 10th-percentile steps +\d+\.\d{3} ", text, re.M), text
    assert re.search(r"^  optimizer\.step\(\) \+ agent hook +[\d.]+ ms +\(agent work per step -?[\d.]+ ms",
                     text, re.M), text
    assert "11 variants x 64 samples" in text  # raw + the 10 default decays, every sample drawn
    for part in ("sampling", "features", "metrics", "other (swaps, previews, files)", "total"):
        assert re.search(rf"^  {re.escape(part)} +[\d.]+ s ", text, re.M), f"{part!r} missing:\n{text}"
    for group in ("fd", "kid", "prc", "density_coverage"):
        assert re.search(rf"^    {group} +[\d.]+ s +\(x11: ", text, re.M), f"{group!r} missing:\n{text}"
