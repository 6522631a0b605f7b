"""The Streamlit app through streamlit.testing.v1.AppTest, on crafted run directories."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from dashboard_fixtures import make_run, run_info, write_heartbeat
from streamlit.testing.v1 import AppTest

from emascope.dashboard import ranking
from emascope.dashboard.data import load_run
from emascope.runformat import FORMAT_VERSION as KNOWN_FORMAT_VERSION

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")


def start(monkeypatch, root: Path) -> AppTest:
    monkeypatch.setenv("EMASCOPE_DASHBOARD_PATH", str(root))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def banner(at: AppTest) -> str:
    texts = [e.value for e in at.warning] + [e.value for e in at.info]
    return next(t for t in texts if t.startswith("At step") or t.startswith("No scores"))


def test_pick_run_metric_and_stage(tmp_path, monkeypatch):
    a = make_run(tmp_path, "alpha", steps=(1000, 2000, 3000))
    make_run(tmp_path, "beta", steps=(1000, 2000), shift=0.5)
    at = start(monkeypatch, tmp_path)
    assert at.title[0].value == "beta"  # newest path by default
    at.sidebar.selectbox(key="run").set_value(str(a)).run()
    assert at.title[0].value == "alpha"
    assert banner(at).startswith("At step 3,000, the best **fid**")
    at.sidebar.selectbox(key="metric").set_value("precision").run()
    assert "the best **precision**" in banner(at)
    at.sidebar.select_slider(key="stage").set_value(1000).run()
    run = load_run(a)
    expected = ranking.recommend(run.metrics, run.directions, "precision", 1000).text
    assert banner(at) == expected
    assert not at.exception
    # the status row shows the finished state and the last step
    values = {m.label: m.value for m in at.metric}
    assert values["Status"].endswith("finished") and values["Last step"] == "3,000"
    assert values["Stages scored"] == "3"


def test_recommendation_warns_on_collapse(tmp_path, monkeypatch):
    make_run(tmp_path, "r", steps=(1000,))  # early stage: the two longest averages collapse
    at = start(monkeypatch, tmp_path)
    warn = [w.value for w in at.warning]
    assert warn and "Collapse" in warn[0] and "0.999999" in warn[0] and "disagree" in warn[0]


def test_newer_format_version_shows_message_not_crash(tmp_path, monkeypatch):
    make_run(
        tmp_path, "future", info=run_info("future", format_version=KNOWN_FORMAT_VERSION + 1), samples=False
    )
    at = start(monkeypatch, tmp_path)
    errors = [e.value for e in at.error]
    assert errors and str(KNOWN_FORMAT_VERSION + 1) in errors[0] and str(KNOWN_FORMAT_VERSION) in errors[0]


def test_empty_run_says_no_scores_yet(tmp_path, monkeypatch):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "run.json").write_text(json.dumps(run_info("fresh")))
    at = start(monkeypatch, tmp_path)
    assert any("No scores yet" in i.value for i in at.info)


def _export_tab_widgets(at: AppTest):
    name = next(t for t in at.text_input if t.label.startswith("File name"))
    button = at.button(key="export_button")
    return name, button


def test_export_live_run_request_then_status(tmp_path, monkeypatch):
    run = make_run(tmp_path, "live", steps=(1000, 2000), state="running", samples=False)
    at = start(monkeypatch, tmp_path)
    at.selectbox(key="export_variant").set_value("0.999").run()
    name, button = _export_tab_widgets(at)
    assert name.value == "ema-0.999"
    write_heartbeat(run, "running", 2000)
    button.click().run()
    reqs = list((run / "requests").glob("*.json"))
    assert len(reqs) == 1
    req = json.loads(reqs[0].read_text())
    assert req["variant"] == "0.999" and req["name"] == "ema-0.999"
    assert any("Waiting for the agent" in i.value for i in at.info)
    # the agent fulfils it
    (run / "exports").mkdir()
    (run / "exports" / "ema-0.999.safetensors").write_bytes(b"x" * 2_500_000)
    (run / "exports" / f"{req['id']}.status.json").write_text(
        json.dumps(
            {
                "id": req["id"],
                "state": "done",
                "variant": "0.999",
                "step": 2000,
                "path": "exports/ema-0.999.safetensors",
                "bytes": 2_500_000,
                "time": time.time(),
                "error": None,
            }
        )
    )
    reqs[0].unlink()
    write_heartbeat(run, "running", 2000)
    at.run()
    ok = [s.value for s in at.success]
    assert ok and "ema-0.999.safetensors" in ok[0] and "2.50 MB" in ok[0]


@pytest.mark.parametrize("bad", ["../evil", "/tmp/evil", "a/../../b"])
def test_export_name_outside_exports_is_rejected(tmp_path, monkeypatch, bad):
    run = make_run(tmp_path, "live", steps=(1000,), state="running", samples=False)
    at = start(monkeypatch, tmp_path)
    name, button = _export_tab_widgets(at)
    name.set_value(bad)
    write_heartbeat(run, "running", 1000)
    button.click().run()
    errors = [e.value for e in at.error]
    assert errors and "Export refused" in errors[0] and repr(bad) in errors[0]
    assert not (run / "requests").exists() or not list((run / "requests").iterdir())
    assert not list(tmp_path.rglob("evil*"))


def test_export_finished_run_from_snapshot(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from emascope import bank as bank_mod
    from emascope.snapshot import save_snapshot

    run = make_run(tmp_path, "done", steps=(1000,), samples=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    bank = bank_mod.EMABank(model, decays=(0.9, 0.999))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
        bank.update()
    save_snapshot(bank, run / "banks" / "latest.safetensors")
    at = start(monkeypatch, tmp_path)
    at.selectbox(key="export_variant").set_value("0.9").run()
    name, button = _export_tab_widgets(at)
    button.click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    out = run / "exports" / "ema-0.9.safetensors"
    assert out.exists()
    got = load_file(out)
    want = bank.materialize("0.9")
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k].float())
    assert any("ema-0.9.safetensors" in s.value for s in at.success)
    # exporting to the same name again is refused until the user confirms; then the child replaces it
    out.write_bytes(b"an older export")
    at.run()
    assert any("exports/ema-0.9.safetensors` already exists" in w.value for w in at.warning)
    _, button = _export_tab_widgets(at)
    button.click().run()
    assert any("Export refused: exports/ema-0.9.safetensors already exists" in e.value for e in at.error)
    assert out.read_bytes() == b"an older export"
    at.checkbox(key="export_overwrite_ema-0.9.safetensors").check().run()
    _, button = _export_tab_widgets(at)
    button.click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    got = load_file(out)
    assert all(torch.equal(got[k], want[k].to(got[k].dtype)) for k in want)


def test_stage_follows_newest_unless_moved_back(tmp_path, monkeypatch):
    from dashboard_fixtures import metric_lines, write_jsonl

    run = make_run(tmp_path, "r", steps=(1000, 2000), samples=False)
    at = start(monkeypatch, tmp_path)
    assert at.sidebar.select_slider(key="stage").value == 2000
    write_jsonl(run / "metrics.jsonl", metric_lines([3000]))
    at.run()
    assert at.sidebar.select_slider(key="stage").value == 3000  # followed the new stage
    at.sidebar.select_slider(key="stage").set_value(1000).run()
    write_jsonl(run / "metrics.jsonl", metric_lines([4000]))
    at.run()
    assert at.sidebar.select_slider(key="stage").value == 1000  # the user's choice is kept
    assert banner(at).startswith("At step 1,000")


def test_image_previews_in_gallery(tmp_path, monkeypatch):
    from PIL import Image

    info = run_info("img", sample_kind="images")
    run = make_run(tmp_path, "img", steps=(1000,), samples=False, info=info)
    folder = run / "samples" / "step_000001000"
    folder.mkdir(parents=True)
    for i, v in enumerate(["raw", "0.9", "0.9999"]):
        Image.new("RGB", (16, 16), (40 * i, 100, 200)).save(folder / f"{v}.png")
    (folder / "0.999.png").write_bytes(b"\x89PNG\r\n\x1a\n half")  # torn preview: skipped, not fatal
    at = start(monkeypatch, tmp_path)
    captions = [c.value for c in at.caption]
    assert any("0.999: preview not readable yet" in c for c in captions)
    assert len(at.image) == 3


def test_agent_errors_show_as_a_banner(tmp_path, monkeypatch):
    from dashboard_fixtures import write_jsonl

    run = make_run(tmp_path, "r", steps=(1000,))
    write_jsonl(run / "events.jsonl", [
        {"time": time.time(), "step": 1000, "type": "error", "where": "sampler", "variant": "0.9",
         "message": "RuntimeError: CUDA out of memory\nmore lines", "traceback": "..."},
        {"time": time.time(), "step": 1000, "type": "error", "where": "reference", "variant": None,
         "message": "ValueError: feature extractor 'inception-v3-compat' needs its weights file", "traceback": "..."},
    ])
    at = start(monkeypatch, tmp_path)
    shown = [w.value for w in at.warning if "reported" in w.value]
    assert shown == ["The agent reported 2 errors (reference, sampler); some scores may be missing. Last, at "
                     "step 1,000 in reference: ValueError: feature extractor 'inception-v3-compat' needs its "
                     "weights file"]
    assert load_run(run).error_banner() == shown[0]
    clean = make_run(tmp_path / "other", "ok", steps=(1000,))
    assert load_run(clean).error_banner() is None
