"""Nothing outside the run directory is touched (issue 15): symlinked ``requests/`` / ``exports/``,
request files that are not ours, export names, a flood of requests, and ``emascope export --out``.

Each test reproduces the attack as reported, against the real agent (``attach`` + training) or the
real request poller and the real ``emascope export`` entry point.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scope_helpers import Denoiser, mixture, train_step

from emascope import attach
from emascope import runformat as rf
from emascope.atomic import atomic_write_bytes
from emascope.cli import main as cli_main
from emascope.dashboard import exporting
from emascope.requests import RequestPoller

torch.set_num_threads(1)


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]


def _request(folder: Path, rid: str, **body) -> Path:
    path = folder / f"{rid}.json"
    path.write_text(json.dumps({"id": rid, "variant": "0.9", **body}))
    return path


def _train(tmp: Path, name: str, steps: int, prepare=None, **kwargs):
    """A real agent run: ``prepare(run_dir)`` runs after attach, then ``steps`` training steps."""
    torch.manual_seed(0)
    model = Denoiser(width=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data, g = mixture(200, seed=1), torch.Generator().manual_seed(0)
    run_dir = tmp / name
    scope = attach(model, opt, run_dir=run_dir, score_every=None, decays=(0.9, 0.99), request_interval=0.0,
                   **kwargs)
    if prepare is not None:
        prepare(run_dir)
    for _ in range(steps):
        train_step(model, opt, data, g, batch=16)
    return scope, run_dir


# ------------------------------------------------------------------ symlinked requests/ and exports/


def test_symlinked_requests_folder_is_refused_and_nothing_there_is_read_or_deleted(tmp_path):
    """The reported attack: requests/ -> another folder; the agent parsed and deleted every *.json."""
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    files = {"config.json": '{"keep": 1}', "a1.json": json.dumps({"id": "a1", "variant": "0.9"}),
             "notes.json": "not json"}
    for name, text in files.items():
        (elsewhere / name).write_text(text)

    def link_requests(run_dir):
        shutil.rmtree(run_dir / "requests")
        (run_dir / "requests").symlink_to(elsewhere, target_is_directory=True)

    scope, run_dir = _train(tmp_path, "run", 4, link_requests)
    scope.close()
    assert {p.name: p.read_text() for p in elsewhere.iterdir()} == files  # all there, unchanged
    assert not list((run_dir / "exports").glob("*"))  # nothing fulfilled, no status written
    notices = [e for e in _events(run_dir) if e["type"] == "notice" and e.get("where") == "requests"]
    assert len(notices) == 1 and "symlink" in notices[0]["message"]  # said once, not every step


def test_symlinked_exports_folder_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()

    def link_exports(run_dir):
        shutil.rmtree(run_dir / "exports")
        (run_dir / "exports").symlink_to(outside, target_is_directory=True)
        _request(run_dir / "requests", "r1", name="m")

    scope, run_dir = _train(tmp_path, "run", 3, link_exports)
    with pytest.raises(ValueError, match="symlink"):
        scope.export("0.9")  # the default path lies in exports/
    scope.close()
    assert list(outside.iterdir()) == []  # no checkpoint, no status file written through the link
    assert (run_dir / "requests" / "r1.json").exists()  # not fulfilled, not deleted
    notices = [e for e in _events(run_dir) if e["type"] == "notice" and e.get("where") == "requests"]
    assert len(notices) == 1 and "exports/" in notices[0]["message"] and "symlink" in notices[0]["message"]


def _poller(run_dir: Path, written: list, clock=None) -> tuple[RequestPoller, list, list]:
    """The agent's real poller; the export itself writes a small file atomically and is counted."""
    results, notices = [], []

    def export_fn(variant, path, dtype):
        written.append((variant, path))
        atomic_write_bytes(path, b"checkpoint")
        return 10

    kw = {"clock": clock} if clock is not None else {}
    return RequestPoller(run_dir, export_fn, resolve_variant=rf.parse_variant, on_result=results.append,
                         on_notice=notices.append, **kw), results, notices


def _run_dir(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    for sub in rf.SUBDIRS:
        (run_dir / sub).mkdir(parents=True)
    return run_dir


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_only_request_files_that_validate_are_read_and_deleted(tmp_path):
    run_dir = _run_dir(tmp_path)
    req = run_dir / "requests"
    target = tmp_path / "secret.json"
    target.write_text(json.dumps({"id": "lnk", "variant": "0.9"}))
    (req / "lnk.json").symlink_to(target)            # a symlink: never followed, never removed
    os.mkfifo(req / "fifo.json")                     # a FIFO: reading it would block forever
    (req / "dir.json").mkdir()                       # a folder
    (req / "bad name!.json").write_text("{}")        # not a request id
    (req / "big.json").write_bytes(b" " * (rf.MAX_REQUEST_BYTES + 1))  # a request id, too large
    _request(req, "ok")
    written: list = []
    poller, results, _ = _poller(run_dir, written)
    poller.poll(1)
    poller.poll(2)  # problems are reported once
    assert [p.name for _, p in written] == ["ema-0.9.safetensors"]
    assert target.exists() and (req / "lnk.json").is_symlink()
    assert (req / "fifo.json").exists() and (req / "dir.json").is_dir() and (req / "bad name!.json").exists()
    assert not (req / "ok.json").exists() and not (req / "big.json").exists()  # ours: handled and removed
    by_id = {r["id"]: r for r in results if r["id"]}
    assert by_id["ok"]["state"] == "done" and by_id["big"]["state"] == "error" and "bytes" in by_id["big"]["error"]
    left = sorted(r["error"].split("'")[1] for r in results if r["id"] is None)
    assert left == ["bad name!.json", "dir.json", "fifo.json", "lnk.json"]  # each reported exactly once
    assert not (run_dir / "exports" / "lnk.status.json").exists()


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_requests_swapped_for_a_symlink_during_a_check_deletes_nothing_outside(tmp_path):
    """The race after the check: ``requests/`` is replaced by a symlink to a folder of the user's
    while the agent handles a request. Nothing in that folder is read or removed."""
    run_dir = _run_dir(tmp_path)
    req = run_dir / "requests"
    outside = tmp_path / "outside"
    outside.mkdir()
    for rid in ("a", "b"):
        _request(req, rid)
        _request(outside, rid)  # the user's own files, named like requests
    written: list = []
    poller, results, _ = _poller(run_dir, written)
    export_fn = poller.export_fn

    def swap_then_export(variant, path, dtype):
        if not (run_dir / "requests.real").exists():
            req.rename(run_dir / "requests.real")
            req.symlink_to(outside, target_is_directory=True)
        return export_fn(variant, path, dtype)

    poller.export_fn = swap_then_export
    poller.poll(1)
    assert sorted(p.name for p in outside.iterdir()) == ["a.json", "b.json"]  # untouched
    assert all(json.loads((outside / n).read_text())["id"] in ("a", "b") for n in ("a.json", "b.json"))
    poller.poll(2)  # the next check sees the symlink and refuses the folder
    assert sorted(p.name for p in outside.iterdir()) == ["a.json", "b.json"]


def test_exports_swapped_for_a_symlink_during_a_check_gets_nothing_more(tmp_path):
    """``exports/`` replaced by a symlink right after a checkpoint was written: no status file, no
    further checkpoint goes through the link; the next request waits, one notice says why."""
    run_dir = _run_dir(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    for rid in ("a", "b"):
        _request(run_dir / "requests", rid, name=f"m{rid}")
    written: list = []
    poller, results, notices = _poller(run_dir, written)
    export_fn = poller.export_fn

    def export_then_swap(variant, path, dtype):
        n = export_fn(variant, path, dtype)
        (run_dir / "exports").rename(run_dir / "exports.real")
        (run_dir / "exports").symlink_to(outside, target_is_directory=True)
        return n

    poller.export_fn = export_then_swap
    poller.poll(1)
    assert list(outside.iterdir()) == [] and len(written) == 1
    assert (run_dir / "exports.real" / "ma.safetensors").is_file()
    assert (run_dir / "requests" / "b.json").exists()  # not handled, not deleted
    assert len(notices) == 1 and "symlink" in notices[0]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")
def test_exports_swapped_for_a_symlink_between_the_check_and_the_write_writes_nothing_outside(tmp_path):
    """The instant the check used to leave open: ``exports/`` replaced by a symlink to the user's folder
    after the check, before the checkpoint is written. The checkpoint is written through the folder
    opened at the check (it lands in the real one, now ``exports.real``), nothing goes through the link,
    and the status file, checked afresh, is not written through it either."""
    run_dir = _run_dir(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    _request(run_dir / "requests", "a", name="ma")
    written: list = []
    poller, results, notices = _poller(run_dir, written)
    export_fn = poller.export_fn

    def swap_then_export(variant, path, dtype):
        (run_dir / "exports").rename(run_dir / "exports.real")
        (run_dir / "exports").symlink_to(outside, target_is_directory=True)
        return export_fn(variant, path, dtype)  # writes `path` atomically (temp file + rename)

    poller.export_fn = swap_then_export
    poller.poll(1)
    assert list(outside.iterdir()) == []
    assert (run_dir / "exports.real" / "ma.safetensors").read_bytes() == b"checkpoint"
    assert [p.name for p in (run_dir / "exports.real").iterdir()] == ["ma.safetensors"]  # no temp file left
    assert results[0]["state"] == "done" and any("symlink" in n for n in notices)  # status: not written


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")
def test_user_exports_into_the_run_are_written_through_the_folder_checked(tmp_path):
    """The same for exports the user starts (``emascope export``, ``scope.export()``, synthesised
    exports: ``snapshot.write_in_exports``): a swap between the check and the write lands the file in
    the real folder, nothing in the user's; a symlink already there is refused, naming the problem."""
    from emascope.snapshot import ExportError, write_in_exports

    run_dir = _run_dir(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()

    def swap_then_write(path):
        (run_dir / "exports").rename(run_dir / "exports.real")
        (run_dir / "exports").symlink_to(outside, target_is_directory=True)
        atomic_write_bytes(path, b"weights")

    out = write_in_exports(run_dir, "m.safetensors", swap_then_write)
    assert out == run_dir / "exports" / "m.safetensors"
    assert list(outside.iterdir()) == [] and (run_dir / "exports.real" / "m.safetensors").read_bytes() == b"weights"
    with pytest.raises(ExportError, match="symlink"):
        write_in_exports(run_dir, "n.safetensors", lambda p: atomic_write_bytes(p, b"x"))
    assert list(outside.iterdir()) == []


# ------------------------------------------------------------------ export names: one validation


NAMES = ["...", ".hidden", "..", ".", "ok", "ok.v2", "a/b", "../x", "x" * 129, "ema-0.9.safetensors",
         ".safetensors", "-dash", "spaced name"]


@pytest.mark.parametrize("name", NAMES)
def test_agent_and_dashboard_accept_the_same_export_names(tmp_path, name):
    """The agent accepted "..." and ".hidden" that the dashboard refused: one shared validation now."""
    run_dir = _run_dir(tmp_path)
    try:
        exporting.export_path(run_dir, name)
        dashboard_ok = True
    except ValueError:
        dashboard_ok = False
    _request(run_dir / "requests", "r1", name=name)
    written: list = []
    poller, results, _ = _poller(run_dir, written)
    poller.poll(1)
    agent_ok = results[0]["state"] == "done"
    assert agent_ok == dashboard_ok, results[0]
    if name in ("...", ".hidden", "..", "."):
        assert not agent_ok and "invalid export name" in results[0]["error"]
    for _, path in written:  # whatever was accepted lies in exports/ (written through the open folder) and is
        assert (run_dir / "exports" / path.name).is_file() and not path.name.startswith(".")  # not hidden
    assert sorted(p.name for p in (run_dir / "exports").iterdir() if p.name.startswith(".")) == []


# ------------------------------------------------------------------ a flood of requests


def test_500_requests_in_one_step_boundary_are_rate_limited_and_reported(tmp_path):
    run_dir = _run_dir(tmp_path)
    for i in range(500):
        _request(run_dir / "requests", f"r{i:03d}", name=f"m{i:03d}")
    now = [0.0]
    written: list = []
    poller, results, notices = _poller(run_dir, written, clock=lambda: now[0])
    assert poller.poll(1) == rf.REQUESTS_PER_POLL + 64
    assert len(written) == rf.REQUESTS_PER_POLL  # 4 checkpoints, not 500
    refused = [r for r in results if r["state"] == "error"]
    assert len(refused) == 64 and all("more than 64" in r["error"] for r in refused)
    assert any("deferred" in n for n in notices) and any("refused 64" in n for n in notices)
    per_poll = [len(written)]
    for step in range(2, 40):  # one check a second
        now[0] += 1.0
        before = len(written)
        poller.poll(step)
        per_poll.append(len(written) - before)
    assert max(per_poll) <= rf.REQUESTS_PER_POLL
    assert len(written) == rf.REQUESTS_PER_MINUTE  # 39 s: capped by the per-minute budget
    assert sum("deferred" in n for n in notices) == 1  # one notice per backlog, not per check
    remaining = list((run_dir / "requests").glob("*.json"))
    refused = [r for r in results if r["state"] == "error"]
    assert len(remaining) <= rf.MAX_PENDING_REQUESTS  # the backlog is bounded: the excess was refused
    assert len(remaining) + len(refused) + len(written) == 500
    now[0] += 60.0  # a minute later the budget is back; at close what is left is refused, not dropped
    poller.poll(99, final=True)
    assert not list((run_dir / "requests").glob("*.json"))
    statuses = list((run_dir / "exports").glob("*.status.json"))
    assert len(statuses) == 500  # every request got an answer
    assert sum(json.loads(p.read_text())["state"] == "done" for p in statuses) == len(written)


def test_the_live_agent_applies_the_limit_at_a_step_boundary(tmp_path):
    def flood(run_dir):
        for i in range(100):
            _request(run_dir / "requests", f"r{i:03d}", name=f"m{i:03d}")

    scope, run_dir = _train(tmp_path, "run", 2, flood)
    exports = [e for e in _events(run_dir) if e["type"] == "export"]
    done = [e for e in exports if e["ok"]]
    assert len(done) == 2 * rf.REQUESTS_PER_POLL  # two step boundaries, four checkpoints each
    assert len(list((run_dir / "exports").glob("m*.safetensors"))) == len(done)
    scope.close()
    notices = [e for e in _events(run_dir) if e["type"] == "notice" and e.get("where") == "requests"]
    assert any("deferred" in n["message"] for n in notices)
    assert not list((run_dir / "requests").glob("*.json"))  # answered (refused) at close


# ------------------------------------------------------------------ emascope export --out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    scope, run_dir = _train(tmp_path_factory.mktemp("finished"), "run", 3)
    scope.close()
    return run_dir


def test_export_out_a_folder_is_a_clear_error(finished_run, tmp_path, capsys):
    assert cli_main(["export", str(finished_run), "--variant", "0.9", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and "Traceback" not in err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_export_out_an_unwritable_place_is_a_clear_error(finished_run, capsys):
    assert cli_main(["export", str(finished_run), "--variant", "0.9", "--out", "/proc/x"]) == 2
    err = capsys.readouterr().err
    assert "cannot write '/proc/x'" in err and "Traceback" not in err


@pytest.mark.parametrize("rel", ["run.json", "banks/latest.safetensors", "metrics.jsonl", "heartbeat",
                                 "exports/../events.jsonl", "samples/x.safetensors", "new.safetensors"])
def test_export_out_never_replaces_a_file_of_the_run(finished_run, rel, capsys):
    before = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    assert cli_main(["export", str(finished_run), "--variant", "0.9", "--out", str(finished_run / rel)]) == 2
    err = capsys.readouterr().err
    assert "a file of the run itself" in err
    after = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    assert after == before


def test_export_out_under_exports_or_outside_still_works(finished_run, tmp_path, capsys):
    inside = finished_run / "exports" / "mine.safetensors"
    assert cli_main(["export", str(finished_run), "--variant", "0.9", "--out", str(inside)]) == 0
    outside = tmp_path / "new" / "dir" / "m.safetensors"  # parents are created
    assert cli_main(["export", str(finished_run), "--variant", "0.9", "--out", str(outside)]) == 0
    assert load_file(str(inside)).keys() == load_file(str(outside)).keys()
    parent_file = tmp_path / "plain"
    parent_file.write_text("x")
    assert cli_main(["export", str(finished_run), "--variant", "0.9", "--out", str(parent_file / "m")]) == 2
    assert "is not a folder" in capsys.readouterr().err


# ------------------------------------------------------------------ --format transformers (a folder export)


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    """A real run of a tiny transformers GPT-2 (config built here, no hub), closed: it has a
    ``model_config.json`` and a checksummed snapshot."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run_dir = tmp_path_factory.mktemp("gpt2") / "run"
    ids = torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(1))
    with attach(model, opt, run_dir=run_dir, score_every=None, decays=(0.9,)):
        for _ in range(2):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    assert (run_dir / rf.MODEL_CONFIG).is_file()
    return run_dir


def _tree(run_dir: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


@pytest.mark.parametrize("rel", ["run.json", "banks", "exports/../metrics.jsonl", "samples/x"])
def test_folder_export_never_writes_into_a_file_or_folder_of_the_run(gpt2_run, rel, capsys):
    before = _tree(gpt2_run)
    assert cli_main(["export", str(gpt2_run), "--variant", "0.9", "--format", "transformers",
                     "--out", str(gpt2_run / rel)]) == 2
    err = capsys.readouterr().err
    assert ("a file of the run itself" in err or "is not a folder" in err) and "Traceback" not in err
    assert _tree(gpt2_run) == before


def test_folder_export_errors_are_clear_and_write_nothing(gpt2_run, tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.write_text("keep me")
    assert cli_main(["export", str(gpt2_run), "--variant", "0.9", "--format", "transformers",
                     "--out", str(plain)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err and plain.read_text() == "keep me"
    if Path("/proc/self").is_dir():
        assert cli_main(["export", str(gpt2_run), "--variant", "0.9", "--format", "transformers",
                         "--out", "/proc/x"]) == 2
        err = capsys.readouterr().err
        assert "cannot write '/proc/x'" in err and "Traceback" not in err
    # under exports/ and outside the run: fine, and the folder loads with from_pretrained
    for out in (gpt2_run / "exports" / "mine", tmp_path / "new" / "ema"):
        assert cli_main(["export", str(gpt2_run), "--variant", "0.9", "--format", "transformers",
                         "--out", str(out)]) == 0
        assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors"}


def test_folder_export_checks_the_snapshot_checksum_and_notes_an_unverified_one(gpt2_run, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    run_dir = tmp_path / "copy"
    shutil.copytree(gpt2_run, run_dir)
    path = run_dir / rf.SNAPSHOT
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    tensors["bank"][0, 0] += 1.0  # one weight changed behind the checksum's back
    save_file(tensors, str(path), metadata=meta)
    out = tmp_path / "bad"
    assert cli_main(["export", str(run_dir), "--variant", "0.9", "--format", "transformers", "--out", str(out)]) == 2
    assert "corrupt" in capsys.readouterr().err and not out.exists()
    meta.pop(rf.SNAPSHOT_CHECKSUM_KEY)  # as an older emascope wrote it: loads, with a note
    save_file(tensors, str(path), metadata=meta)
    assert cli_main(["export", str(run_dir), "--variant", "0.9", "--format", "transformers", "--out", str(out)]) == 0
    assert "note:" in capsys.readouterr().err and (out / "model.safetensors").is_file()


def test_live_folder_export_refuses_a_file_of_the_run(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with attach(model, opt, run_dir=tmp_path / "run", score_every=None, decays=(0.9,)) as scope:
        before = (tmp_path / "run" / "run.json").read_bytes()
        with pytest.raises(ValueError, match="exists and is not a folder"):
            scope.export(0.9, tmp_path / "run" / "run.json", format="transformers")
        with pytest.raises(ValueError, match="a file of the run itself"):
            scope.export(0.9, tmp_path / "run" / "banks" / "ema", format="transformers")
        assert (tmp_path / "run" / "run.json").read_bytes() == before
        assert not (tmp_path / "run" / "banks" / "ema").exists()
        assert scope.export(0.9, format="transformers").parent.name == "exports"


def test_hostile_model_config_is_a_clear_error(gpt2_run, tmp_path, capsys):
    """A run's model_config.json nested 100,000 deep or larger than the cap: exit 2 with a message."""
    run_dir = tmp_path / "copy"
    shutil.copytree(gpt2_run, run_dir)
    config = run_dir / rf.MODEL_CONFIG
    for body, needle in ((b"[" * 100_000 + b"]" * 100_000, "nested too deeply"), (None, "larger than")):
        if body is None:
            with open(config, "wb") as f:
                f.truncate(rf.MAX_MODEL_CONFIG_BYTES + 1)  # sparse: 16 MiB of zeros
        else:
            config.write_bytes(body)
        out = tmp_path / "ema"
        assert cli_main(["export", str(run_dir), "--variant", "0.9", "--format", "transformers",
                         "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and not out.exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_resume_over_a_hostile_run_json_neither_blocks_nor_reads_without_bound(tmp_path):
    """run.json replaced by a FIFO (a read blocks forever) or a symlink to /dev/zero (an endless
    read): resume ignores it and writes a fresh run.json."""
    import threading
    import time

    for case in ("fifo", "zero", "deep"):
        scope, run_dir = _train(tmp_path, case, 2)
        scope.close()
        run_json = run_dir / rf.RUN_JSON
        run_json.unlink()
        if case == "fifo":
            os.mkfifo(run_json)
            release = threading.Timer(20.0, lambda p=run_json: open(p, "wb").close())  # bounds a regression
            release.start()
        elif case == "zero":
            if not Path("/dev/zero").exists():
                continue
            run_json.symlink_to("/dev/zero")
        else:
            run_json.write_text("[" * 100_000 + "]" * 100_000)
        t = time.monotonic()
        model = Denoiser(width=8)
        with attach(model, torch.optim.Adam(model.parameters()), run_dir=run_dir, resume=True, score_every=None,
                    decays=(0.9, 0.99)) as again:
            assert again.current_step == 2
        assert time.monotonic() - t < 15.0, case
        if case == "fifo":
            release.cancel()
        assert not run_json.is_symlink() and json.loads(run_json.read_text())["decays"] == [0.9, 0.99]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("name", [rf.EVENTS, rf.METRICS])
def test_resume_onto_an_appended_file_that_is_not_a_regular_file_is_a_clear_error(tmp_path, name):
    """events.jsonl as a FIFO: resume failed with "File or stream is not seekable"; a symlink to
    /dev/zero would swallow every record. Refused at attach, naming the file, nothing written."""
    scope, run_dir = _train(tmp_path, "run", 2)
    scope.close()
    (run_dir / name).unlink(missing_ok=True)  # (no metrics.jsonl yet: nothing was scored)
    os.mkfifo(run_dir / name)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    model = Denoiser(width=8)
    with pytest.raises(ValueError, match=f"{name} of the run .* is not a regular file"):
        attach(model, torch.optim.Adam(model.parameters()), run_dir=run_dir, resume=True, score_every=None,
               decays=(0.9, 0.99))
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("name", [rf.RUN_JSON, rf.HEARTBEAT])
def test_resume_refuses_a_huge_top_level_run_file_unread(tmp_path, name):
    """A top-level file attach may replace, grown past any run file's size (a sparse 17 GiB file
    here): it used to be read whole to undo a failed start. Now refused before anything is written,
    naming it, after reading nothing of it."""
    scope, run_dir = _train(tmp_path, "run", 2)
    scope.close()
    huge = run_dir / name
    huge.unlink(missing_ok=True)
    with open(huge, "wb") as f:
        f.truncate(17 * 2**30)  # sparse: no disk used, a whole read would need 17 GiB of memory
    before = {p: p.stat().st_size for p in run_dir.rglob("*") if p.is_file()}
    model = Denoiser(width=8)
    with pytest.raises(ValueError, match=f"{name}.* larger than 16 MiB"):
        attach(model, torch.optim.Adam(model.parameters()), run_dir=run_dir, resume=True, score_every=None,
               decays=(0.9, 0.99))
    assert {p: p.stat().st_size for p in run_dir.rglob("*") if p.is_file()} == before
