"""The four guards the mutation pass of issue 15 found missing: each test fails on the deliberate
one-line bug described there (atomic writes done in place; resume ending the torn line of
metrics.jsonl only; swap() loading only parameters with average_buffers=True; ranking ties going to
the larger decay).
"""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import torch
from bank_helpers import TinyNet
from scope_helpers import Denoiser, mixture, train_step

import emascope.atomic as atomic
from emascope import attach
from emascope import runformat as rf
from emascope.bank import EMABank
from emascope.dashboard import ranking
from emascope.rundir import prepare_run_dir

torch.set_num_threads(1)


# ------------------------------------------------------------------ atomic_write_bytes


def test_atomic_write_that_fails_midway_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    target.write_bytes(b'{"old": true}\n')
    inode = target.stat().st_ino

    def disk_error(fd):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(atomic.os, "fsync", disk_error)  # fails after the data was written, before the replace
        with pytest.raises(OSError, match="No space"):
            atomic.atomic_write_bytes(target, b'{"new": true}\n')
    assert target.read_bytes() == b'{"old": true}\n'  # intact (an in-place write had truncated it)
    assert os.listdir(tmp_path) == ["run.json"]  # no temp file remains
    atomic.atomic_write_bytes(target, b'{"new": true}\n')
    assert target.read_bytes() == b'{"new": true}\n'
    assert target.stat().st_ino != inode  # replaced by a new file, not rewritten in place
    assert os.listdir(tmp_path) == ["run.json"]


# ------------------------------------------------------------------ resume and torn lines


def _scope(run_dir, **kw):
    torch.manual_seed(0)
    model = Denoiser(width=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scope = attach(model, opt, run_dir=run_dir, score_every=None, decays=(0.9,),
                   evaluate=lambda m: {"val": 1.0}, metric_directions={"val": "lower"}, **kw)
    return scope, model, opt


@pytest.mark.parametrize("name", rf.APPENDED)
def test_resume_ends_the_torn_last_line_of_every_appended_file(tmp_path, name):
    run_dir = tmp_path / "run"
    scope, model, opt = _scope(run_dir)
    train_step(model, opt, mixture(100, seed=1), torch.Generator().manual_seed(0), batch=16)
    scope.score_now()
    scope.close()
    path = run_dir / name
    before = path.read_bytes().count(b"\n")
    with open(path, "ab") as f:
        f.write(b'{"step": 99, "torn')  # the writer was killed mid-line
    prepare_run_dir(run_dir, resume=True)  # what attach(resume=True) does first
    assert path.read_bytes().endswith(b'"torn\n')  # ended before anything is appended
    scope, _, _ = _scope(run_dir, resume=True)
    scope.score_now()
    scope.close()
    lines = path.read_bytes().split(b"\n")
    assert lines[before] == b'{"step": 99, "torn'  # the fragment, alone on its line
    first_new = json.loads(lines[before + 1])  # the first record the resumed run appended survives
    assert first_new["step"] == 1
    if name == rf.EVENTS:
        assert first_new["type"] == "start"
    else:
        assert first_new["metric"] == "val" and first_new["variant"] == "raw"


# ------------------------------------------------------------------ swap() with average_buffers


def test_swap_with_average_buffers_loads_the_averaged_buffers_too():
    torch.manual_seed(0)
    model = TinyNet()
    bank = EMABank(model, (0.9, 0.99), average_buffers=True)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(6):  # BatchNorm running stats move with every forward pass in train mode
        with torch.no_grad():
            model(torch.randn(16, 6, generator=gen) * 3 + 1)
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        bank.update()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    for variant in ("0.9", "0.99"):
        expected = bank.materialize(variant)
        assert not torch.equal(expected["bn.running_mean"], live["bn.running_mean"])  # a real difference
        with bank.swap(model, variant):
            got = model.state_dict()
            for key in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "fc1.weight"):
                assert torch.equal(got[key], expected[key]), key
        for k, v in model.state_dict().items():
            assert torch.equal(v, live[k]), k  # restored


# ------------------------------------------------------------------ ranking ties


def _metrics(values: dict[str, float], metric: str = "fd", step: int = 100) -> pd.DataFrame:
    rows = [{"step": step, "variant": v, "decay": rf.decay_of(v), "metric": metric, "value": x,
             "time": 0.0} for v, x in values.items()]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("direction", ["lower", "higher"])
def test_ties_go_to_the_smaller_decay_as_documented(direction):
    best, worse = (1.0, 2.0) if direction == "lower" else (2.0, 1.0)
    # written larger decay first (an agent attached with decays=(0.999, 0.99, 0.9) writes them so)
    metrics = _metrics({"0.999": best, "0.99": best, "0.9": worse, "raw": worse})
    table = ranking.best_per_stage(metrics, "fd", direction)
    assert table["variant"].tolist() == ["0.99"]
    assert ranking.best_of_row(metrics.set_index("variant")["value"], direction) == ("0.99", best)
    rec = ranking.recommend(metrics, {"fd": direction}, "fd")
    assert rec.best_variant == "0.99"
    drift = ranking.best_decay_drift(metrics, {"fd": direction})
    assert drift["variant"].tolist() == ["0.99"]
