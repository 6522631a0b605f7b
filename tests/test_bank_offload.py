"""The host placement (``device="cpu"``: a background thread folds each copy of the weights into a
host bank) and the memory plan (``device="auto"``, ``emascope plan``), on CPU.

The host bank must give the same bits as the in-line bank on the same trajectory, apply every
update exactly once and in order (``update_every`` stays exact even when the worker is slower than
training: the training thread then waits, it never drops one), surface a worker failure at the
next call, and stop its thread on ``close()``. The plan's numbers are checked against the bank's
real allocation, and ``device="auto"`` refuses, naming the numbers, before anything is written.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch
from bank_helpers import ReferenceEMA, make_tiny, random_step, trainable

from emascope.bank import BLOCK, EMABank
from emascope.plan import (
    PlanError,
    choose,
    format_bytes,
    parse_bytes,
    plan_memory,
)

torch.set_num_threads(1)


@pytest.mark.parametrize("kw", [{}, {"update_every": 3, "bias_correction": True, "bema": True}])
def test_host_placement_is_bit_identical_to_the_inline_bank(kw):
    model = make_tiny(31)
    host = EMABank(model, [0.5, 0.9, 0.999], device="cpu", **kw)
    inline = EMABank(model, [0.5, 0.9, 0.999], **kw)
    assert host.placement == "host" and inline.placement == "device" and host._feed is not None
    ref = ReferenceEMA(trainable(model), [0.5, 0.9, 0.999], kw.get("update_every", 1),
                       kw.get("bias_correction", False))
    gen = torch.Generator().manual_seed(31)
    for t in range(1, 41):
        random_step(model, gen)
        bad = t == 12
        if bad:
            saved = model.fc1.bias.detach().clone()
            with torch.no_grad():
                model.fc1.bias[0] = float("nan")
        host.update()
        inline.update()
        ref.step(trainable(model), finite=not bad)
        if bad:  # the copy was taken at update(): restoring the weights now cannot change it
            with torch.no_grad():
                model.fc1.bias.copy_(saved)
    a, b = host.state_dict(), inline.state_dict()  # state_dict() waits for the worker
    assert torch.equal(a["bank"], b["bank"]) and torch.equal(a["bc_pow"], b["bc_pow"])
    assert host.num_skipped == inline.num_skipped == (1 if 12 % kw.get("update_every", 1) == 0 else 0)
    for v in host.variants:
        x, y = host.materialize(v), inline.materialize(v)
        assert all(torch.equal(x[k], y[k]) for k in y), v
    for d in (0.5, 0.9, 0.999):
        got = host.materialize(d, dtype=torch.float32)
        for k, want in ref.value(d).items():
            torch.testing.assert_close(got[k].double(), want, rtol=0, atol=1e-5)
    host.close()
    assert host._feed._thread is None
    assert torch.equal(host.state_dict()["bank"], a["bank"])  # readable after close
    random_step(model, gen)
    host.update()  # a later update starts a new worker
    inline.update()
    assert torch.equal(host.state_dict()["bank"], inline.state_dict()["bank"])
    host.close()


def test_a_slow_worker_makes_training_wait_and_never_drops_an_update():
    """Two host buffers: with a worker slower than the steps, the third copy waits for a free buffer;
    every update is applied once, in step order (update_every stays exact)."""
    model = make_tiny(32)
    bank = EMABank(model, [0.9], device="cpu", update_every=2)
    applied: list[int] = []
    release = threading.Event()

    def slow_apply(staging, t):
        release.wait(5)
        applied.append(t)
        bank._apply_no_grad(staging, t)

    bank._feed._apply = slow_apply
    gen = torch.Generator().manual_seed(32)
    done = threading.Event()

    def train():
        for _ in range(8):
            random_step(model, gen)
            bank.update()
        done.set()

    th = threading.Thread(target=train)
    th.start()
    time.sleep(0.5)
    assert not done.is_set()  # blocked: both buffers are waiting for the (held) worker
    release.set()
    th.join(10)
    assert done.is_set() and bank._feed.waits >= 1
    assert bank.num_updates == 4 and bank.step == 8
    assert applied == [2, 4, 6, 8]


def test_a_worker_failure_surfaces_at_the_next_call_and_close_stops_the_thread():
    model = make_tiny(33)
    bank = EMABank(model, [0.9], device="cpu")

    def boom(staging, t):
        raise RuntimeError("disk on fire")

    bank._feed._apply = boom
    bank.update()
    with pytest.raises(RuntimeError, match="update thread failed.*disk on fire"):
        bank.state_dict()
    worker = bank._feed._thread
    assert worker is not None and worker.is_alive() and worker.name == "emascope-host-bank"
    bank.close()
    assert not worker.is_alive() and bank._feed._thread is None
    with pytest.raises(RuntimeError, match="disk on fire"):  # it sticks: the bank missed an update
        bank.materialize("0.9")


def test_agent_with_a_failing_host_worker_disables_the_bank_and_trains_on(tmp_path):
    import json

    from scope_helpers import Denoiser

    from emascope import attach

    model = Denoiser()
    scope = attach(model, run_dir=tmp_path / "run", device="cpu", decays=(0.9,), score_every=None)
    assert scope.bank.placement == "host"

    def boom(staging, t):
        raise RuntimeError("worker broke")

    scope.bank._feed._apply = boom
    for _ in range(3):
        scope.step()
    scope.close()
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["type"] for e in events].count("bank_disabled") == 1
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["settings"]["placement"] == "host" and info["memory_plan"]["placement"] == "host"


# ------------------------------------------------------------------------------------ memory plan

def test_plan_numbers_match_the_bank_allocation():
    model = make_tiny(34, d_hidden=700)  # 6,433 averaged scalars: 4 blocks
    bank = EMABank(model, [0.5, 0.9, 0.99], bema=True)
    plan = bank.memory_plan
    dev = plan.cost("device")
    assert plan.params == bank.numel and plan.decays == 3 and plan.bema and plan.world == 1
    assert dev.columns == bank._blocks.shape[0] * BLOCK
    # rows (blocked, padded) exactly; the plan counts BEMA's theta0 over the padded columns too
    assert dev.bank_bytes == bank.nbytes + 4 * (dev.columns - bank.numel)
    assert dev.comm_per_update == 0 and plan.choice == "device"
    assert not plan.cost("sharded").available


def test_plan_arithmetic_and_choice():
    p = plan_memory(int(1.5e9), 10, world=8, param_bytes=2, device_free=parse_bytes("20GiB"))
    nb = -(-int(1.5e9) // BLOCK)
    cols = -(-nb // 8) * BLOCK
    sharded = p.cost("sharded")
    assert sharded.columns == cols and sharded.bank_bytes == 4 * 10 * cols
    assert sharded.device_bytes == 4 * 10 * cols + 4 * cols + (4 * 8 * cols + 4 * cols)
    assert all(c.comm_per_update == 0 for c in p.costs)
    assert p.cost("device").fits is False and sharded.fits and p.choice == "sharded" == choose(p)
    with pytest.raises(PlanError, match="placement 'device' does not fit: needs 72.6 GiB"):
        choose(p, "device")
    tight = plan_memory(int(1.5e9), 10, world=1, param_bytes=2, device_free=parse_bytes("20GiB"),
                        host_free=parse_bytes("40GiB"))
    assert tight.choice is None
    with pytest.raises(PlanError) as err:
        choose(tight)
    msg = str(err.value)
    assert "no bank placement fits" in msg and "72.6 GiB" in msg and "20.0 GiB free" in msg and "40.0 GiB free" in msg
    fsdp = plan_memory(1000, 2, world=3, sharding="fsdp")
    assert not fsdp.cost("device").available and fsdp.choice == "sharded"
    assert parse_bytes("1.5e9") == 1_500_000_000 and parse_bytes("2 MiB") == 2 * 2**20 and parse_bytes(7) == 7
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("20 parsecs")
    with pytest.raises(ValueError, match="sharding"):
        plan_memory(10, 1, sharding="zero3")
    assert format_bytes(3 * 2**30) == "3.0 GiB"


def test_device_auto_refuses_before_anything_is_written(tmp_path, monkeypatch):
    import emascope.bank as B
    from emascope import attach

    model = make_tiny(35)
    assert EMABank(model, [0.9], device="auto").placement == "device"  # plenty of memory here
    monkeypatch.setattr(B, "free_bytes", lambda device: 1024)
    with pytest.raises(ValueError, match="no bank placement fits.*1.0 KiB free"):
        attach(model, run_dir=tmp_path / "run", device="auto", decays=(0.9,))
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(B, "free_bytes", lambda device: 10**12 if device.type == "cpu" else 1024)
    # on a CPU-only machine the weights' device *is* host memory: with room, auto keeps it in line
    assert EMABank(model, [0.9], device="auto").placement == "device"


def test_emascope_plan_cli_is_torch_free_and_exits_2_when_nothing_fits():
    code = ("import sys; from emascope.cli import main; rc = main(['plan', '--params', '1.5e9', '--decays', '10', "
            "'--world', '8', '--device-free', '20GiB']); assert 'torch' not in sys.modules, 'torch imported'; "
            "sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "auto picks: sharded" in out.stdout and "sharded" in out.stdout and "comm/update" in out.stdout
    out = subprocess.run([sys.executable, "-m", "emascope.cli", "plan", "--params", "1.5e9", "--world", "1",
                          "--device-free", "20GiB", "--host-free", "40GiB"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "no bank placement fits" in out.stderr and "72.6 GiB" in out.stderr
    out = subprocess.run([sys.executable, "-m", "emascope.cli", "plan", "--params", "-3"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "must be >= 1" in out.stderr


def test_plan_block_matches_the_bank():
    from emascope import plan

    assert plan.BLOCK == BLOCK
