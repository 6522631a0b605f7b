"""Exports: request files fulfilled by a live agent, ``scope.export``, and ``emascope export`` after close.

Every exported file is loaded into a fresh model with ``load_state_dict(safetensors.torch.load_file)``
and compared with the bank's variant and with an independent float64 EMA of the same trajectory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from scope_helpers import Denoiser, mixture, train_step

from emascope import attach
from emascope.cli import main as cli_main

torch.set_num_threads(1)

DECAYS = (0.9, 0.99)
EMASCOPE = Path(sys.executable).with_name("emascope")


def _drop_request(run_dir: Path, rid: str, body: dict) -> None:
    """What the dashboard does: write ``requests/<id>.json`` atomically."""
    tmp = run_dir / "requests" / f".{rid}.tmp"
    tmp.write_text(json.dumps(body))
    tmp.replace(run_dir / "requests" / f"{rid}.json")


def _fresh(path: Path) -> Denoiser:
    model = Denoiser()
    model.load_state_dict(load_file(str(path)))
    return model


def _assert_same(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    """Train 20 steps; requests are dropped after step 8 and fulfilled from step 9 on (at most
    ``REQUESTS_PER_POLL`` per check, so they spread over steps 9 and 10)."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    torch.manual_seed(0)
    model = Denoiser()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data, g = mixture(1000, seed=1), torch.Generator().manual_seed(0)
    scope = attach(model, opt, run_dir=run_dir, score_every=None, decays=DECAYS, request_interval=0.0)
    ema = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    at_export = {}
    outside = run_dir.parent / "evil.safetensors"
    for step in range(1, 21):
        train_step(model, opt, data, g)
        for k, v in model.state_dict().items():
            ema[k].mul_(0.99).add_(v.double(), alpha=0.01)
        if step == 8:
            _drop_request(run_dir, "ok1", {"id": "ok1", "variant": "0.99", "name": "ema-0.99", "dtype": None,
                                           "time": 0.0})
            _drop_request(run_dir, "ok2", {"id": "ok2", "variant": 0.9, "name": "f32", "dtype": "float32"})
            _drop_request(run_dir, "trav", {"id": "trav", "variant": "0.99", "name": "../../evil"})
            _drop_request(run_dir, "abs", {"id": "abs", "variant": "0.99", "name": str(outside)})
            _drop_request(run_dir, "idx", {"id": "other", "variant": "0.99"})
            _drop_request(run_dir, "unk", {"id": "unk", "variant": "0.12345"})
            (run_dir / "requests" / "junk.json").write_text("{not json")
            (run_dir / "requests" / "bad name!.json").write_text(json.dumps({"variant": "0.99"}))
        if step >= 9:
            at_export[step] = {"0.99": scope.bank.materialize("0.99"), "0.9": scope.bank.materialize("0.9"),
                               "ema64": {k: v.clone() for k, v in ema.items()}}
    own = scope.export(0.99)  # default path inside exports/
    user = scope.export("raw", run_dir.parent / "mine" / "raw.safetensors")
    scope.close()
    return {"run_dir": run_dir, "scope": scope, "model": model, "at_export": at_export, "ema64": ema,
            "outside": outside, "own": own, "user": user}


def _status(run_dir: Path, rid: str) -> dict:
    return json.loads((run_dir / "exports" / f"{rid}.status.json").read_text())


def test_request_is_fulfilled_at_the_next_step(live_run):
    run_dir, at = live_run["run_dir"], live_run["at_export"]
    st = _status(run_dir, "ok1")
    assert st["state"] == "done" and st["error"] is None and st["step"] == 9 and st["variant"] == "0.99"
    at = at[9]
    assert st["path"] == "exports/ema-0.99.safetensors"
    path = run_dir / st["path"]
    assert st["bytes"] == path.stat().st_size
    model = _fresh(path)
    _assert_same(model, at["0.99"])
    for k, ref in at["ema64"].items():  # independent float64 EMA of the same trajectory
        torch.testing.assert_close(model.state_dict()[k].double(), ref, rtol=0, atol=2e-6)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["variant"] == "0.99" and meta["decay"] == "0.99" and meta["step"] == "9"
    assert meta["run_id"] == live_run["scope"].run_id and meta["emascope_version"]
    st2 = _status(run_dir, "ok2")  # the fifth request (by name): the next check, one step later
    assert st2["state"] == "done" and st2["path"] == "exports/f32.safetensors" and st2["step"] == 10
    _assert_same(_fresh(run_dir / st2["path"]), live_run["at_export"][10]["0.9"])
    # every request consumed; a file whose name is not a request id is not ours: left in place
    assert sorted(p.name for p in (run_dir / "requests").glob("*.json")) == ["bad name!.json"]


def test_bad_requests_are_refused_and_nothing_escapes_exports(live_run):
    run_dir = live_run["run_dir"]
    for rid, needle in (("trav", "invalid export name"), ("abs", "invalid export name"), ("idx", "bad request id"),
                        ("unk", "unknown variant"), ("junk", "JSONDecodeError")):
        st = _status(run_dir, rid)
        assert st["state"] == "error" and needle in st["error"], (rid, st)
        assert st["path"] is None
    assert not live_run["outside"].exists() and not (run_dir.parent.parent / "evil.safetensors").exists()
    written = {p.name for p in (run_dir / "exports").iterdir()}
    assert written == {"ema-0.99.safetensors", "f32.safetensors", live_run["own"].name,
                       *(f"{r}.status.json" for r in ("ok1", "ok2", "trav", "abs", "idx", "unk", "junk"))}
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    exports = [e for e in events if e["type"] == "export"]
    assert sum(e["ok"] for e in exports) == 4  # ok1, ok2, and the two scope.export calls
    assert {e["request_id"] for e in exports if not e["ok"]} == {"trav", "abs", "idx", "unk", "junk", None}


def test_scope_export_default_and_user_path(live_run):
    run_dir, scope = live_run["run_dir"], live_run["scope"]
    assert live_run["own"] == run_dir / "exports" / "ema-0.99-step20.safetensors"
    _assert_same(_fresh(live_run["own"]), scope.bank.materialize("0.99"))
    _assert_same(_fresh(live_run["user"]), live_run["model"].state_dict())
    with pytest.raises(ValueError, match="unknown variant"):
        scope.export("0.5")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(EMASCOPE), "export", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not EMASCOPE.exists(), reason="emascope console script not installed in this venv")
def test_cli_export_after_close_reproduces_the_bank(live_run, tmp_path):
    run_dir, bank = live_run["run_dir"], live_run["scope"].bank
    out = tmp_path / "elsewhere" / "ema.safetensors"
    res = _cli(str(run_dir), "--variant", "0.99", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert str(out) in res.stdout
    model = _fresh(out)
    _assert_same(model, bank.materialize("0.99"))
    for k, ref in live_run["ema64"].items():
        torch.testing.assert_close(model.state_dict()[k].double(), ref, rtol=0, atol=2e-6)
    # default path, float32, through the in-process entry point
    assert cli_main(["export", str(run_dir), "--variant", "0.90", "--dtype", "float32"]) == 0
    default = run_dir / "exports" / "ema-0.9-step20.safetensors"
    _assert_same(_fresh(default), bank.materialize("0.9"))
    with safe_open(str(default), framework="pt") as f:
        assert f.metadata()["run_id"] == live_run["scope"].run_id


def test_cli_export_errors(live_run, tmp_path, capsys):
    """Bad input: exit code 2 and a message naming the problem (in-process: no torch start-up per case)."""
    assert cli_main(["export", str(live_run["run_dir"]), "--variant", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "unknown variant" in err and "0.99" in err
    assert cli_main(["export", str(tmp_path / "nope"), "--variant", "0.99"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(["export", str(tmp_path / "empty"), "--variant", "0.99"]) == 2
    assert "no bank snapshot" in capsys.readouterr().err
