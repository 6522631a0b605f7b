"""attach()/Scope on a real training loop: run directory, metric values, failure isolation, steps.

A tiny MLP denoiser on 2-D data is trained with Adam; the agent follows the optimizer through its
step hook, scores every few steps with the identity extractor, and writes a real run directory.
Metric values are recomputed independently: samples regenerated from the bank's variant with the
same seed, then torch-fidelity's metric functions and the ``prdc`` package called directly.
"""

from __future__ import annotations

import errno
import json
import math
import os

import numpy as np
import pytest
import torch
from prdc import compute_prdc
from scope_helpers import Denoiser, mixture, redraw, sampler, train_step, val_loss
from torch import nn
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

import emascope.atomic
from emascope import attach

torch.set_num_threads(1)

DECAYS = (0.9, 0.99)
VARIANTS = ["raw", "0.9", "0.99"]
FEATURE_METRICS = ("fd", "kid_mean", "kid_std", "precision", "recall", "density", "coverage")
NUM_SAMPLES = 200


def _events(run_dir, type_=None):
    out = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [e for e in out if type_ is None or e["type"] == type_]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(run_dir, steps=30, score_every=10, seed=0, evaluate=True, **kw):
    """Train ``steps`` Adam steps with the agent attached through the optimizer hook."""
    torch.manual_seed(seed)
    model = Denoiser()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data, held_out = mixture(2000, seed=1), mixture(300, seed=2)
    reference = mixture(300, seed=3)
    g = torch.Generator().manual_seed(seed)
    ev = (lambda m: {"val_loss": val_loss(m, held_out), "undeclared": 1.0}) if evaluate else None
    kw.setdefault("sampler", sampler)
    kw.setdefault("scoring", "inline")  # the sweep's exact records at each stage (modes: test_scoring_modes.py)
    scope = attach(model, opt, run_dir=run_dir, reference=reference, evaluate=ev,
                   metric_directions={"val_loss": "lower"}, score_every=score_every, num_samples=NUM_SAMPLES,
                   batch_size=64, decays=DECAYS, heartbeat_interval=0.2, **kw)
    ema = {d: {k: v.detach().double().clone() for k, v in model.state_dict().items()} for d in DECAYS}
    for _ in range(steps):
        train_step(model, opt, data, g)
        for d in DECAYS:  # independent float64 reference EMA
            for k, v in model.state_dict().items():
                ema[d][k].mul_(d).add_(v.double(), alpha=1 - d)
    scope.close()
    return scope, model, reference, held_out, ema


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "exp"
    scope, model, reference, held_out, ema = _train(run_dir)
    return {"run_dir": run_dir, "scope": scope, "model": model, "reference": reference,
            "held_out": held_out, "ema": ema}


# ---------------------------------------------------------------------------------------------- layout


def test_run_json(trained):
    info = json.loads((trained["run_dir"] / "run.json").read_text())
    assert info["format"] == "emascope-run" and info["format_version"] == 1
    assert info["decays"] == list(DECAYS) and info["variants"] == VARIANTS
    n = sum(p.numel() for p in trained["model"].parameters())
    assert info["model"] == {"class": "Denoiser", "num_params": n, "num_trainable": n,
                             "dtypes": {"float32": n}}
    s = info["settings"]
    assert (s["score_every"], s["snapshot_every"], s["num_samples"], s["seed"]) == (10, 10, NUM_SAMPLES, 0)
    assert s["feature_extractor"] == "identity" and s["device"] == "cpu" and s["update_every"] == 1
    for key in ("run_id", "name", "start_time", "host", "pid", "emascope_version"):
        assert info[key] not in (None, "")
    assert info["name"] == "exp" and info["sample_kind"] == "points"
    # every metric in metrics.jsonl with a direction, except the undeclared user metric
    assert info["metric_directions"] == {
        "fd": "lower", "kid_mean": "lower", "kid_std": "lower", "precision": "higher", "recall": "higher",
        "density": "higher", "coverage": "higher", "val_loss": "lower"}


def test_metrics_jsonl_has_every_variant_metric_stage(trained):
    recs = _metrics(trained["run_dir"])
    keys = {(r["step"], r["variant"], r["metric"]) for r in recs}
    expected = {(s, v, m) for s in (10, 20, 30) for v in VARIANTS
                for m in (*FEATURE_METRICS, "val_loss", "undeclared")}
    assert keys == expected and len(recs) == len(expected)  # one line each, close() did not re-score
    base = {"step", "variant", "decay", "metric", "value", "time"}
    for r in recs:
        # the optional interval fields (docs/run-format.md): every metric of the generated samples has
        # its sample count, and its interval unless it is itself a spread (kid_std) or a user number
        if r["metric"] in ("val_loss", "undeclared"):
            assert set(r) == base
        elif r["metric"] == "kid_std":
            assert set(r) == base | {"n"} and r["n"] == NUM_SAMPLES
        else:
            assert set(r) == base | {"se", "lo", "hi", "n"} and r["n"] == NUM_SAMPLES, r
            assert r["lo"] <= r["value"] <= r["hi"] and r["se"] > 0
        assert r["decay"] == (None if r["variant"] == "raw" else float(r["variant"]))
        assert isinstance(r["value"], float) and math.isfinite(r["value"])


def test_events_heartbeat_samples_bank(trained):
    run_dir = trained["run_dir"]
    ev = _events(run_dir)
    types = [e["type"] for e in ev]
    assert types[0] == "start" and types[-1] == "close"
    assert [e["step"] for e in ev if e["type"] == "score_done"] == [10, 20, 30]
    assert [e["step"] for e in ev if e["type"] == "snapshot"] == [10, 20, 30]  # none repeated at close
    assert "error" not in types
    done = _events(run_dir, "score_done")[0]
    assert set(done["timings"]) == {"sampling", "features", "metrics", "user_metrics", "sample_metrics",
                                    "uncertainty", "racing"}
    assert done["samples_drawn"] == done["samples_full"] == NUM_SAMPLES * len(VARIANTS)
    assert done["num_samples"] == NUM_SAMPLES and done["seconds"] >= sum(done["timings"].values()) * 0.99
    notices = _events(run_dir, "notice")
    assert any("undeclared" in e["message"] for e in notices)  # user metric without a direction
    assert any("KID subset size 200" in e["message"] for e in notices)
    hb = json.loads((run_dir / "heartbeat").read_text())
    assert hb["state"] == "closed" and hb["step"] == 30 and hb["interval"] == 0.2
    for step in (10, 20, 30):
        for v in VARIANTS:
            pts = np.load(run_dir / "samples" / f"step_{step:09d}" / f"{v}.npy", allow_pickle=False)
            assert pts.dtype == np.float32 and pts.shape == (NUM_SAMPLES, 2)
    ref = np.load(run_dir / "samples" / "reference.npy", allow_pickle=False)
    np.testing.assert_array_equal(ref, trained["reference"].numpy())
    assert (run_dir / "banks" / "latest.safetensors").stat().st_size > 0
    assert len(list((run_dir / "reference").glob("identity-none-*.npz"))) == 1
    assert not list(run_dir.rglob(".*.tmp"))  # no temp files left behind


def test_dashboard_reader_reads_the_run(trained):
    from emascope.dashboard.data import load_run

    run = load_run(trained["run_dir"])
    assert run.error is None and run.state() == "finished" and run.last_step() == 30
    assert len(run.metrics) == len(_metrics(trained["run_dir"]))
    assert run.directions["val_loss"] == "lower"


# ---------------------------------------------------------------------------------------------- values


def _regenerate(bank, variant, seed=0, batch=64):
    """The samples the sweep drew for ``variant``: fresh model, bank weights, same seed and batches."""
    model = Denoiser()
    model.load_state_dict(bank.materialize(variant))
    model.eval()
    return redraw(model, sampler, NUM_SAMPLES, batch, seed)


@pytest.mark.parametrize("variant", VARIANTS)
def test_metric_values_equal_direct_torch_fidelity_and_prdc(trained, variant):
    run_dir, bank = trained["run_dir"], trained["scope"].bank
    samples = _regenerate(bank, variant)
    saved = np.load(run_dir / "samples" / "step_000000030" / f"{variant}.npy")
    np.testing.assert_array_equal(samples.numpy(), saved)  # common seed, bank weights = scored weights
    gen, ref = samples.double(), trained["reference"].double()
    got = {r["metric"]: r["value"] for r in _metrics(run_dir) if r["step"] == 30 and r["variant"] == variant}
    fid = fid_statistics_to_metric(fid_features_to_statistics(gen), fid_features_to_statistics(ref), False)
    assert got["fd"] == pytest.approx(fid["frechet_inception_distance"], rel=1e-9)
    kid = kid_features_to_metric(gen, ref, kid_subset_size=200, kid_subsets=100, rng_seed=0, verbose=False)
    assert got["kid_mean"] == pytest.approx(kid["kernel_inception_distance_mean"], rel=1e-9)
    assert got["kid_std"] == pytest.approx(kid["kernel_inception_distance_std"], rel=1e-9)
    prc = prc_features_to_metric(gen, ref, prc_neighborhood=3, verbose=False)
    assert got["precision"] == pytest.approx(prc["precision"])
    assert got["recall"] == pytest.approx(prc["recall"])
    prdc = compute_prdc(real_features=ref.numpy(), fake_features=gen.numpy(), nearest_k=5)
    assert got["density"] == pytest.approx(prdc["density"])
    assert got["coverage"] == pytest.approx(prdc["coverage"])


def test_user_metric_is_evaluated_on_each_variant_in_eval_mode(trained):
    bank, held_out = trained["scope"].bank, trained["held_out"]
    got = {r["variant"]: r["value"] for r in _metrics(trained["run_dir"])
           if r["step"] == 30 and r["metric"] == "val_loss"}
    for variant in VARIANTS:
        model = Denoiser()
        model.load_state_dict(bank.materialize(variant))
        model.eval()  # dropout off: deterministic
        with torch.no_grad():
            assert got[variant] == pytest.approx(val_loss(model, held_out), rel=1e-6)
    assert len(set(got.values())) == 3  # the variants really differ


def test_bank_matches_float64_ema_and_model_is_live(trained):
    bank, model, ema = trained["scope"].bank, trained["model"], trained["ema"]
    assert bank.step == 30 and model.training  # scoring restored train mode
    for d in DECAYS:
        sd = bank.materialize(d)
        for k, ref in ema[d].items():
            torch.testing.assert_close(sd[k].double(), ref, rtol=0, atol=2e-6)
    for k, v in bank.materialize("raw").items():
        assert torch.equal(v, model.state_dict()[k])


# ---------------------------------------------------------------------------------------------- isolation


def _bits(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _train_plain(steps=30, seed=0):
    torch.manual_seed(seed)
    model = Denoiser()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data, g = mixture(2000, seed=1), torch.Generator().manual_seed(seed)
    for _ in range(steps):
        train_step(model, opt, data, g)
    return model


def test_failing_sampler_is_recorded_and_training_is_untouched(tmp_path):
    calls = []

    def bad_sampler(model, n, generator):
        calls.append(model.training)
        torch.randn(1000)  # uses the global generator: must not shift the training's dropout stream
        model.net[0].weight.data.add_(1.0)  # even scribbling on the weights is undone by the swap
        raise RuntimeError("sampler exploded")

    run_dir = tmp_path / "run"
    scope, model, *_ = _train(run_dir, sampler=bad_sampler)
    assert calls and not any(calls)  # called in eval mode
    assert model.training and all(m.training for m in model.modules())
    plain = _train_plain()
    for k, v in _bits(plain).items():  # bit-identical to the same training without the agent
        assert torch.equal(v, model.state_dict()[k]), k
    errors = _events(run_dir, "error")
    assert len(errors) == 3 * len(VARIANTS)
    assert {e["where"] for e in errors} == {"sampler"} and {e["variant"] for e in errors} == set(VARIANTS)
    assert "sampler exploded" in errors[0]["message"] and "Traceback" in errors[0]["traceback"]
    assert "bad_sampler" in errors[0]["traceback"]
    # user metrics still recorded, no feature metrics
    assert {r["metric"] for r in _metrics(run_dir)} == {"val_loss", "undeclared"}
    assert _events(run_dir)[-1]["type"] == "close"


def test_training_flags_restored_exactly(tmp_path):
    torch.manual_seed(0)
    model = Denoiser()
    model.net[2].eval()  # a submodule the user keeps in eval mode
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data, g = mixture(500, seed=1), torch.Generator().manual_seed(0)
    with attach(model, opt, run_dir=tmp_path / "r", sampler=sampler, reference=mixture(100, 3),
                score_every=2, num_samples=50, decays=(0.9,)) as scope:
        for _ in range(4):
            train_step(model, opt, data, g)
        assert scope.current_step == 4
    assert [m.training for m in model.modules()] == [m is not model.net[2] for m in model.modules()]


def test_failing_metric_is_recorded_others_written(tmp_path, monkeypatch):
    import emascope.metrics

    def broken_kid(*a, **k):
        raise FloatingPointError("kid broke")

    monkeypatch.setattr(emascope.metrics, "kid", broken_kid)
    run_dir = tmp_path / "run"
    _train(run_dir, steps=10, score_every=10, evaluate=False)
    errors = _events(run_dir, "error")
    assert {e["where"] for e in errors} == {"metric:kid"} and len(errors) == len(VARIANTS)
    assert "kid broke" in errors[0]["message"]
    metrics = {r["metric"] for r in _metrics(run_dir)}
    assert metrics == {"fd", "precision", "recall", "density", "coverage"}


def test_failing_evaluate_and_non_dict_evaluate(tmp_path):
    torch.manual_seed(0)
    model = Denoiser()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data, g = mixture(500, seed=1), torch.Generator().manual_seed(0)
    outputs = iter([{"a": 1.0}, [1.0], ValueError("bad eval")] * 10)

    def evaluate(m):
        out = next(outputs)
        if isinstance(out, Exception):
            raise out
        return out

    with attach(model, opt, run_dir=tmp_path / "r", evaluate=evaluate, score_every=5, decays=(0.9, 0.99)):
        for _ in range(5):
            train_step(model, opt, data, g)
    errors = _events(tmp_path / "r", "error")
    assert [e["where"] for e in errors] == ["evaluate", "evaluate"]
    assert "must return dict" in errors[0]["message"] and "bad eval" in errors[1]["message"]
    assert [(r["variant"], r["metric"]) for r in _metrics(tmp_path / "r")] == [("raw", "a")]


def test_disk_full_training_goes_on(tmp_path, monkeypatch):
    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    run_dir = tmp_path / "run"
    torch.manual_seed(0)
    model = Denoiser()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data, g = mixture(2000, seed=1), torch.Generator().manual_seed(0)
    scope = attach(model, opt, run_dir=run_dir, sampler=sampler, reference=mixture(300, 3), score_every=5,
                   num_samples=100, decays=(0.9,), heartbeat_interval=0.05, scoring="inline")
    size_before = (run_dir / "events.jsonl").stat().st_size
    with monkeypatch.context() as mp:  # every write path of the agent fails with ENOSPC
        mp.setattr(emascope.atomic, "open", enospc, raising=False)  # JSONL appends
        mp.setattr(os, "fdopen", enospc)  # atomic replace of JSON/PNG/npy
        mp.setattr(os, "replace", enospc)  # safetensors snapshots
        for _ in range(10):
            train_step(model, opt, data, g)
        assert scope.writer.num_write_errors > 0 and "No space left" in scope.writer.last_error
        assert (run_dir / "events.jsonl").stat().st_size == size_before
        assert not (run_dir / "banks" / "latest.safetensors").exists()
    for _ in range(5):  # the disk has space again: the agent writes again
        train_step(model, opt, data, g)
    scope.close()
    assert scope.current_step == 15 and scope.bank.step == 15
    for k, v in _train_plain(15).state_dict().items():
        assert torch.equal(v, model.state_dict()[k])
    assert [e["step"] for e in _events(run_dir, "score_done")] == [15]
    assert (run_dir / "banks" / "latest.safetensors").exists()
    assert not list(run_dir.rglob(".*.tmp"))


# ---------------------------------------------------------------------------------------------- steps


def test_gradscaler_skipped_steps_and_accumulation_follow_real_steps(tmp_path):
    torch.manual_seed(0)
    model = Denoiser()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    data, g = mixture(500, seed=1), torch.Generator().manual_seed(0)
    scope = attach(model, opt, run_dir=tmp_path / "r", score_every=None, decays=(0.9,))
    real_steps = 0
    for it in range(12):
        for _micro in range(3):  # gradient accumulation: 3 backward passes per optimizer step
            x = data[torch.randint(0, len(data), (16,), generator=g)]
            loss = ((model(x + 0.3 * torch.randn(x.shape, generator=g), 0.3) - x) ** 2).mean() / 3
            scaler.scale(loss).backward()
        if it % 4 == 1:  # an overflow: GradScaler must skip this optimizer step
            model.net[0].weight.grad[0, 0] = float("inf")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        stepped = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
        real_steps += stepped
        assert stepped == (it % 4 != 1)
    assert real_steps == 9 and scope.current_step == 9 and scope.bank.step == 9
    assert scope.bank.num_skipped == 0  # skipped steps never reached the bank
    scope.close()
    assert json.loads((tmp_path / "r" / "heartbeat").read_text())["step"] == 9


def test_step_without_optimizer_and_misuse(tmp_path):
    model = Denoiser()
    scope = attach(model, run_dir=tmp_path / "a", score_every=None, decays=(0.5,))
    with torch.no_grad():
        model.net[0].bias.add_(1.0)
    scope.step()
    assert scope.current_step == 1 and scope.bank.step == 1
    ema = scope.bank.materialize(0.5)["net.0.bias"]
    torch.testing.assert_close(ema, model.net[0].bias.detach() - 0.5)
    scope.close()
    scope.close()  # idempotent
    scope.step()  # after close: ignored
    assert scope.current_step == 1
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with attach(model, opt, run_dir=tmp_path / "b", score_every=None) as scope2:
        with pytest.raises(RuntimeError, match="step hook"):
            scope2.step()
    # the hook is removed at close: later optimizer steps are not counted
    model(torch.zeros(1, 2), 0.1).sum().backward()
    opt.step()
    assert scope2.current_step == 0


def test_score_now_and_score_at_close(tmp_path):
    torch.manual_seed(0)
    model = Denoiser()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data, g = mixture(500, seed=1), torch.Generator().manual_seed(0)
    scope = attach(model, opt, run_dir=tmp_path / "r", evaluate=lambda m: {"val": val_loss(m, data[:100])},
                   metric_directions={"val": "lower"}, score_every=None, decays=(0.9,))
    for _ in range(3):
        train_step(model, opt, data, g)
    res = scope.score_now()
    assert res.step == 3 and set(res.scores) == {"raw", "0.9"} and res.errors == 0
    for _ in range(2):
        train_step(model, opt, data, g)
    scope.close()
    assert sorted({r["step"] for r in _metrics(tmp_path / "r")}) == [3, 5]
    assert scope.score_now() is None  # closed


# ---------------------------------------------------------------------------------------------- input


def test_bad_arguments_raise_clear_errors(tmp_path):
    model = Denoiser()
    with pytest.raises(ValueError, match="decay"):
        attach(model, run_dir=tmp_path / "a", decays=(0.9, 1.5))
    with pytest.raises(ValueError, match="update_every"):
        attach(model, run_dir=tmp_path / "a", update_every=0)
    with pytest.raises(ValueError, match="score_every"):
        attach(model, run_dir=tmp_path / "a", score_every=0)
    with pytest.raises(ValueError, match="sampler"):
        attach(model, run_dir=tmp_path / "a", reference=torch.zeros(10, 2))
    with pytest.raises(ValueError, match="metric_directions"):
        attach(model, run_dir=tmp_path / "a", metric_directions={"x": "up"})
    with pytest.raises(ValueError, match="optimizer"):
        attach(model, "adam", run_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="heartbeat_interval"):
        attach(model, run_dir=tmp_path / "a", heartbeat_interval=0)
    with pytest.raises(ValueError, match="request_interval"):
        attach(model, run_dir=tmp_path / "a", request_interval=-1)
    with pytest.raises(ValueError, match="num_samples"):
        attach(model, run_dir=tmp_path / "a", num_samples=1)
    with pytest.raises(ValueError, match="trainable"):
        attach(nn.Linear(2, 2).requires_grad_(False), run_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="does not update any parameter"):
        attach(model, torch.optim.SGD(Denoiser().parameters(), lr=0.1), run_dir=tmp_path / "a")
    with pytest.raises(TypeError, match="run_dir"):
        attach(model)
    assert not (tmp_path / "a").exists()  # nothing written before the arguments are checked


def test_existing_run_dir_is_refused_unless_resume_or_overwrite(tmp_path):
    run_dir = tmp_path / "r"
    attach(Denoiser(), run_dir=run_dir, score_every=None).close()
    with pytest.raises(ValueError, match="resume=True.*overwrite=True"):
        attach(Denoiser(), run_dir=run_dir)
    first_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    attach(Denoiser(), run_dir=run_dir, overwrite=True, score_every=None).close()
    assert json.loads((run_dir / "run.json").read_text())["run_id"] != first_id
    assert [e["type"] for e in _events(run_dir)] == ["start", "snapshot", "close"]


def test_resume_continues_the_bank_and_the_step_count(tmp_path):
    def run(steps_a, steps_b):
        torch.manual_seed(0)
        model = Denoiser()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        data, g = mixture(1000, seed=1), torch.Generator().manual_seed(0)
        run_dir = tmp_path / f"r{steps_a}"
        scope = attach(model, opt, run_dir=run_dir, score_every=None, decays=(0.9, 0.99))
        for _ in range(steps_a):
            train_step(model, opt, data, g)
        scope.close()
        if not steps_b:
            return scope.bank, run_dir
        # "restart the job": the training checkpoint restores model + optimizer, the agent resumes
        ckpt = {"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}
        model2 = Denoiser()
        torch.set_rng_state(ckpt["rng"])
        model2.load_state_dict(ckpt["model"])
        opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
        opt2.load_state_dict(ckpt["opt"])
        scope2 = attach(model2, opt2, run_dir=run_dir, resume=True, score_every=None, decays=(0.9, 0.99))
        assert scope2.current_step == steps_a and scope2.run_id == scope.run_id
        assert scope2.start_time == scope.start_time
        for _ in range(steps_b):
            train_step(model2, opt2, data, g)
        scope2.close()
        return scope2.bank, run_dir

    straight, _ = run(12, 0)
    resumed, run_dir = run(7, 5)
    assert resumed.step == straight.step == 12
    for v in ("raw", "0.9", "0.99"):
        for k, t in straight.materialize(v).items():
            assert torch.equal(t, resumed.materialize(v)[k]), (v, k)
    resume_ev = _events(run_dir, "resume")
    assert len(resume_ev) == 1 and resume_ev[0]["snapshot_step"] == 7 and resume_ev[0]["step"] == 7
    with pytest.raises(ValueError, match="resume=True.*decays differ"):
        attach(Denoiser(), run_dir=run_dir, resume=True, decays=(0.5,))


# ---------------------------------------------------------------------------------------------- docs


def test_docs_run_format_names_what_is_written(trained):
    """docs/run-format.md documents every event type, settings key and built-in metric written."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "run-format.md").read_text()
    events_section = doc.split("## `events.jsonl`")[1].split("## `heartbeat`")[0]
    documented_types = set(re.findall(r"^\| `([a-z_]+)`", events_section, flags=re.M))
    written = {e["type"] for e in _events(trained["run_dir"])}
    assert written <= documented_types, written - documented_types
    example = json.loads(doc.split("## `run.json`")[1].split("```json")[1].split("```")[0])
    info = json.loads((trained["run_dir"] / "run.json").read_text())
    assert set(info) == set(example)
    assert set(info["settings"]) == set(example["settings"])
    metrics_row = next(line for line in doc.splitlines() if line.startswith("| `metric`"))
    from emascope.metrics import METRIC_DIRECTIONS

    assert all(f"`{m}`" in metrics_row for m in METRIC_DIRECTIONS)


def test_run_sweep_without_bank_scores_raw_and_restores_weights(tmp_path):
    from emascope.rundir import RunWriter, prepare_run_dir
    from emascope.scoring import ScoringConfig, run_sweep

    model = Denoiser()
    before = _bits(model)

    def scribbling_evaluate(m):
        m.net[0].weight.data.zero_()
        return {"v": 1.0}

    writer = RunWriter(prepare_run_dir(tmp_path / "r"))
    res = run_sweep(model=model, bank=None, variants=["raw"], step=0, writer=writer,
                    cfg=ScoringConfig(num_samples=10), evaluate=scribbling_evaluate)
    assert res.scores == {"raw": {"v": 1.0}} and res.errors == 0
    for k, v in before.items():
        assert torch.equal(v, model.state_dict()[k])


def test_every_bank_parameter_is_an_attach_argument_with_the_same_default():
    import inspect

    from emascope.bank import EMABank

    bank_params = inspect.signature(EMABank.__init__).parameters
    attach_params = inspect.signature(attach).parameters
    for name, p in bank_params.items():
        if name in ("self", "model"):
            continue
        assert name in attach_params, name
        assert attach_params[name].default == p.default, name


def test_nonfinite_weights_skip_the_bank_and_are_reported(tmp_path):
    model = Denoiser()
    scope = attach(model, run_dir=tmp_path / "r", score_every=None, decays=(0.5,), request_interval=0)
    good = model.net[0].bias.detach().clone()
    with torch.no_grad():
        model.net[0].bias[0] = float("nan")
    scope.step()
    with torch.no_grad():
        model.net[0].bias.copy_(good + 1.0)
    scope.step()
    scope.close()
    assert scope.bank.num_skipped == 1 and scope.bank.step == 2
    torch.testing.assert_close(scope.bank.materialize(0.5)["net.0.bias"], good + 0.5)
    skips = _events(tmp_path / "r", "nonfinite_skip")
    assert [(e["step"], e["count"]) for e in skips] == [(1, 1)]


@pytest.mark.parametrize("kind", ["features", "dataset", "ndarray"])
def test_reference_forms(tmp_path, kind):
    from torch.utils.data import TensorDataset

    from emascope.features import Features

    ref = mixture(120, seed=3)
    reference = {"features": Features(ref), "dataset": TensorDataset(ref, torch.zeros(len(ref))),
                 "ndarray": ref.numpy()}[kind]
    extra = {"feature_extractor": "identity"} if kind == "features" else {}
    torch.manual_seed(0)
    model = Denoiser()
    with attach(model, run_dir=tmp_path / "r", sampler=sampler, reference=reference, score_every=None,
                num_samples=60, decays=(0.9,), **extra) as scope:
        scope.step()
    fd = [r for r in _metrics(tmp_path / "r") if r["metric"] == "fd" and r["variant"] == "raw"]
    model.eval()
    with torch.no_grad():
        gen = redraw(model, sampler, 60, 500, 0).double()
    expected = fid_statistics_to_metric(fid_features_to_statistics(gen),
                                        fid_features_to_statistics(ref.double()), False)
    assert len(fd) == 1 and fd[0]["value"] == pytest.approx(expected["frechet_inception_distance"], rel=1e-9)
    assert not _events(tmp_path / "r", "error")


def test_training_exception_inside_with_is_recorded_and_skips_the_final_sweep(tmp_path):
    calls = []

    def evaluate(m):
        calls.append(1)
        return {"v": 1.0}

    model = Denoiser()
    with pytest.raises(KeyboardInterrupt):
        with attach(model, run_dir=tmp_path / "r", evaluate=evaluate, score_every=None,
                    decays=(0.9,)) as scope:
            scope.step()
            raise KeyboardInterrupt
    assert calls == [] and scope.closed
    ev = _events(tmp_path / "r")
    assert [e["type"] for e in ev] == ["start", "error", "snapshot", "close"]
    assert ev[1]["where"] == "training" and "KeyboardInterrupt" in ev[1]["message"]
    assert json.loads((tmp_path / "r" / "heartbeat").read_text())["state"] == "closed"


def test_bank_update_error_disables_the_bank_training_goes_on(tmp_path):
    model = Denoiser()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data, g = mixture(300, seed=1), torch.Generator().manual_seed(0)
    # background (the default) with score_busy="wait": no stage is superseded, however slow the worker
    scope = attach(model, opt, run_dir=tmp_path / "r", evaluate=lambda m: {"v": val_loss(m, data[:50])},
                   score_every=2, decays=(0.9,), score_busy="wait")
    train_step(model, opt, data, g)

    def broken():
        raise RuntimeError("bank broke")

    scope.bank.update = broken
    for _ in range(3):
        train_step(model, opt, data, g)
    scope.close()
    assert scope.current_step == 4
    ev = _events(tmp_path / "r")
    assert [e["where"] for e in ev if e["type"] == "error"] == ["bank"]
    assert [e["step"] for e in ev if e["type"] == "bank_disabled"] == [2]
    assert [e["step"] for e in ev if e["type"] == "snapshot"] == []  # a half-updated bank is never saved
    recs = _metrics(tmp_path / "r")
    assert [(r["step"], r["variant"]) for r in recs] == [(2, "raw"), (4, "raw")]
    assert recs[-1]["value"] == pytest.approx(val_loss(model.eval(), data[:50]))


def test_scope_state_dict_in_the_training_checkpoint_makes_a_restart_exact(tmp_path):
    """The job checkpoints at step 7, runs on to 10 (snapshot at close), crashes, restarts from step 7."""

    def setup():
        torch.manual_seed(0)
        model = Denoiser()
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    data = mixture(1000, seed=1)
    model, opt = setup()
    g = torch.Generator().manual_seed(0)
    straight = attach(model, opt, run_dir=tmp_path / "straight", score_every=None, decays=(0.9, 0.99))
    for _ in range(12):
        train_step(model, opt, data, g)
    straight.close()

    model, opt = setup()
    g = torch.Generator().manual_seed(0)
    scope = attach(model, opt, run_dir=tmp_path / "r", score_every=None, decays=(0.9, 0.99))
    for _ in range(7):
        train_step(model, opt, data, g)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state(),
                "g": g.get_state(), "emascope": scope.state_dict()}, tmp_path / "ckpt.pt")
    for _ in range(3):
        train_step(model, opt, data, g)
    scope.close()  # snapshot at step 10: newer than the checkpoint

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model, opt = setup()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    g.set_state(ckpt["g"])
    resumed = attach(model, opt, run_dir=tmp_path / "r", resume=True, score_every=None, decays=(0.9, 0.99))
    assert resumed.current_step == 10  # from the snapshot ...
    resumed.load_state_dict(ckpt["emascope"])
    assert resumed.current_step == 7  # ... then from the checkpoint
    for _ in range(5):
        train_step(model, opt, data, g)
    resumed.close()
    assert resumed.bank.step == straight.bank.step == 12
    for v in ("raw", "0.9", "0.99"):
        for k, t in straight.bank.materialize(v).items():
            assert torch.equal(t, resumed.bank.materialize(v)[k]), (v, k)
    ev = _events(tmp_path / "r", "resume")
    assert [(e["step"], e.get("source")) for e in ev] == [(10, None), (7, "state_dict")]
    with pytest.raises(ValueError, match="not a Scope state dict"):
        resumed.load_state_dict({"step": 3})
