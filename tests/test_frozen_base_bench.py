"""Smoke test of bench/frozen_base.py: ``--quick`` runs in-process and prints its three tables; the
byte ratios the side file and ``score_share_frozen`` guarantee are > 1 and match the frozen base's
size (times are printed, never asserted)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUM = r"([\d,.]+)"


def _bench():
    spec = importlib.util.spec_from_file_location("frozen_base_bench", ROOT / "bench" / "frozen_base.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(text: str, label: str, cells: int) -> list[float]:
    m = re.search(rf"^  {re.escape(label)} +" + r" +".join([NUM + "(?:x|ms)?"] * cells) + r"$", text, re.M)
    assert m, (label, text)
    return [float(g.replace(",", "")) for g in m.groups()]


def test_frozen_base_bench_quick_prints_the_tables(capsys):
    _bench().main(["--quick"])
    text = capsys.readouterr().out
    m = re.search(r"frozen base ([\d,]+) parameters", text)
    assert m, text
    base = 4 * int(m.group(1).replace(",", ""))  # fp32 bytes of the frozen base
    # part 1: the side file is written once; every snapshot kind is smaller by about the base
    m = re.search(r"^  frozen side file +(\d+) +([\d,]+) +0 +-$", text, re.M)
    assert m, text
    n_side, side_bytes = int(m.group(1)), int(m.group(2).replace(",", ""))
    assert n_side == 1 and base <= side_bytes < base + 8192  # the base once, fp32, plus its header
    for kind in ("latest", "stage", "lead-in"):
        n, side, inline, ratio = _row(text, kind, 4)
        assert n >= 2 and ratio > 1
        assert side_bytes - 8192 < inline - side < side_bytes + 8192, kind  # the base, inline
    n, side_total, inline_total, ratio = _row(text, "total", 4)
    assert ratio > 1 and inline_total > side_total + (n - 1) * base
    # part 2: sharing the base copies less per stage and keeps less in the eval copy
    unshared = _row(text, "False", 5)
    shared = _row(text, "True", 5)
    assert unshared[0] - shared[0] >= base - 8192  # bytes per stage: the base is not copied
    assert unshared[3] - shared[3] >= base - 8192 and shared[3] < base / 4  # eval copy: only the adapters
    assert unshared[4] == shared[4] == 2  # every scoring point scored in both arms
    ratios = _row(text, "False / True", 4)
    assert ratios[0] > 1 and ratios[3] > 1
    # part 3: both swaps timed (no time asserted)
    assert re.search(r"^  run bank, the frozen base its own source +[\d.]+ +1\.00x$", text, re.M), text
    assert re.search(r"^  model-less bank \(load_snapshot\) into a fresh copy +[\d.]+ +[\d.]+x$", text, re.M), text
    # part 4: both arms of the training step and the housekeeping check timed (no time asserted)
    assert re.search(r"^part 4: .* (\d+) frozen entries$", text, re.M), text
    assert re.search(r"^  plain loop +[\d.]+ +1\.000x$", text, re.M), text
    assert re.search(r"^  attached \(bank update, housekeeping\) +[\d.]+ +[\d.]+x$", text, re.M), text
    assert re.search(r"^  unfrozen-layer check, once a second \(ms\) +[\d.]+ +[\d.]+x of one bank update$",
                     text, re.M), text
