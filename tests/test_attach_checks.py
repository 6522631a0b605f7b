"""attach() validates everything before writing anything, and a failed attach leaves nothing behind;
optimizers inside wrappers (accelerate's AcceleratedOptimizer, the real class) are unwrapped and
the bank follows the real optimizer steps (gradient accumulation, AMP's skipped steps); failures
of a sweep are said once on the console and counted; the default image extractor without
weights and without network fails at attach with a message that says what to do.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from pathlib import Path

import pytest
import torch
from scope_helpers import Denoiser, mixture, sampler
from torch import nn

from emascope import attach
from emascope.bank import EMABank

torch.set_num_threads(1)


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("emascope")}


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(path.rglob("*"))}


def _no_dropout() -> Denoiser:
    model = Denoiser()
    model.net[2].p = 0.0
    return model


# ---------------------------------------------------------------------------------------------- wrappers


class NoHookWrapper:
    """A wrapper with an inner object that is not a torch optimizer (nothing to hook)."""

    def __init__(self, inner: object) -> None:
        self.optimizer = inner

    def step(self) -> None:
        pass


def test_no_step_hook_is_a_value_error_and_nothing_is_written(tmp_path):
    before = _threads()
    model = Denoiser()
    for bad, match in ((NoHookWrapper(object()), "NoHookWrapper -> object has no step hook"),
                       (object(), "object has no step hook")):
        with pytest.raises(ValueError, match=match):
            attach(model, bad, run_dir=tmp_path / "a" / "run")
    assert not (tmp_path / "a").exists() and _threads() == before
    # an optimizer of another model: refused before anything is written, naming the chain
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"NoHookWrapper -> SGD\) does not update any parameter"):
        attach(model, NoHookWrapper(other), run_dir=tmp_path / "b")
    assert not (tmp_path / "b").exists() and _threads() == before


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons: reset them after the test (the HF tests build their own)."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_accelerated_optimizer_with_gradient_accumulation_counts_real_steps(tmp_path, fresh_accelerate_state):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = _no_dropout()
    model, opt = accelerator.prepare(model, torch.optim.Adam(model.parameters(), lr=1e-2))
    assert type(opt).__name__ == "AcceleratedOptimizer"  # the wrapper that crashed attach before
    scope = attach(model, opt, run_dir=tmp_path / "run", score_every=None, decays=(0.9,))
    ref = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    data, g = mixture(256, 1), torch.Generator().manual_seed(2)
    real_steps = 0
    for _ in range(10):
        with accelerator.accumulate(model):
            x = data[torch.randint(0, 256, (32,), generator=g)]
            loss = ((model(x + 0.3 * torch.randn(x.shape, generator=g), 0.3) - x) ** 2).mean()
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
        if accelerator.sync_gradients:
            real_steps += 1
            for k, v in model.state_dict().items():  # float64 reference EMA at the real steps only
                ref[k].mul_(0.9).add_(v.double(), alpha=0.1)
    assert real_steps == 5 and scope.current_step == 5 and scope.bank.step == 5
    got = scope.bank.materialize(0.9)
    for k in ref:
        torch.testing.assert_close(got[k].double(), ref[k], rtol=0, atol=1e-6)
    scope.close()
    start = json.loads((tmp_path / "run" / "events.jsonl").read_text().splitlines()[0])
    assert start["type"] == "start" and start["optimizer"] == "AcceleratedOptimizer -> Adam"


def test_accelerated_optimizer_amp_skipped_steps_are_not_counted(tmp_path, fresh_accelerate_state):
    """accelerate's fp16 path on a CPU: its AcceleratedOptimizer driving a (CPU) GradScaler."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)
    torch.manual_seed(0)
    model = _no_dropout()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    opt = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), device_placement=False, scaler=scaler)
    scope = attach(model, opt, run_dir=tmp_path / "run", score_every=None, decays=(0.5,))
    data, g = mixture(64, 1), torch.Generator().manual_seed(2)
    skipped = []
    for i in range(6):
        x = data[torch.randint(0, 64, (16,), generator=g)]
        loss = ((model(x, 0.3) - x) ** 2).mean()
        if i == 3:
            loss = loss * float("inf")  # inf gradients: GradScaler skips optimizer.step()
        scaler.scale(loss).backward()
        opt.step()
        opt.zero_grad()
        skipped.append(opt.step_was_skipped)
    assert skipped == [False, False, False, True, False, False]
    assert scope.current_step == 5 and scope.bank.step == 5
    scope.close()


# ---------------------------------------------------------------------------------------------- nothing left behind


def test_a_failure_after_the_first_write_removes_the_new_run_dir(tmp_path, monkeypatch):
    import emascope.scope as scope_mod

    def broken(*args, **kwargs):
        raise OSError("injected: the disk went away after run.json")

    before = _threads()
    monkeypatch.setattr(scope_mod, "RequestPoller", broken)
    opt = torch.optim.Adam((model := Denoiser()).parameters())
    with pytest.raises(OSError, match="injected"):
        attach(model, opt, run_dir=tmp_path / "new" / "run", score_every=None)
    assert not (tmp_path / "new").exists()  # the folders it created are gone too
    assert _threads() == before
    assert not opt._optimizer_step_post_hooks  # the hook is removed
    opt.zero_grad()
    model(torch.zeros(1, 2), 0.1).sum().backward()
    opt.step()  # training goes on without the agent
    # overwrite=True: the old run's files were deleted as asked; the half-made new ones go too, so
    # the folder holds no run and a plain attach works afterwards
    monkeypatch.undo()
    attach(model, run_dir=tmp_path / "old", score_every=None).close()
    monkeypatch.setattr(scope_mod, "RequestPoller", broken)
    with pytest.raises(OSError, match="injected"):
        attach(model, run_dir=tmp_path / "old", overwrite=True, score_every=None)
    assert not [n for n in ("run.json", "metrics.jsonl", "events.jsonl", "heartbeat")
                if (tmp_path / "old" / n).exists()]
    monkeypatch.undo()
    attach(model, run_dir=tmp_path / "old", score_every=None).close()


def test_a_failed_resume_leaves_the_run_as_it_was(tmp_path, monkeypatch):
    import emascope.scope as scope_mod

    run_dir = tmp_path / "run"
    model = Denoiser()
    opt = torch.optim.Adam(model.parameters())
    with attach(model, opt, run_dir=run_dir, score_every=None, decays=(0.9,)):
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 2), 0.1).pow(2).mean().backward()
            opt.step()
    (run_dir / "events.jsonl").open("ab").write(b'{"torn": ')  # a torn last line, as after a kill
    tree = _tree(run_dir)
    before = _threads()
    # 1. checked before writing: the snapshot holds other bank settings
    with pytest.raises(ValueError, match="decays differ"):
        attach(model, opt, run_dir=run_dir, resume=True, decays=(0.99,))
    assert _tree(run_dir) == tree
    # 2. a failure after the first write: run.json, events, heartbeat restored byte for byte
    monkeypatch.setattr(scope_mod, "RequestPoller", lambda *a, **k: (_ for _ in ()).throw(OSError("injected")))
    with pytest.raises(OSError, match="injected"):
        attach(model, opt, run_dir=run_dir, resume=True, decays=(0.9,))
    assert _tree(run_dir) == tree and _threads() == before
    # 3. an existing run without resume/overwrite: refused, untouched
    with pytest.raises(ValueError, match="already holds a run"):
        attach(model, opt, run_dir=run_dir)
    assert _tree(run_dir) == tree


# ---------------------------------------------------------------------------------------------- extractors


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, size, size, generator=g) * 2 - 1)


def _image_sampler(model, n, generator):
    return torch.tanh(model(torch.randn(n, 4, generator=generator))).view(n, 1, 16, 16)


def test_offline_default_extractor_fails_at_attach_saying_what_to_do(tmp_path, monkeypatch):
    """32x32 images with feature_extractor='auto' mean Inception; its weights are not cached (an
    empty TORCH_HOME) and the network is down (sockets refuse to connect): attach raises at once,
    names the file to pass and the offline options, and writes nothing."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def no_network(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    model = nn.Linear(4, 1024)
    before = _threads()
    kw = dict(run_dir=tmp_path / "run", sampler=lambda m, n, g: _images(n, 32, 0), reference=_images(20, 32, 1))
    with pytest.raises(ValueError) as err:
        attach(model, **kw)
    msg = str(err.value)
    for needed in ("inception-v3-compat", "weights-inception-2015-12-05-6726825d.pth", "Network is unreachable",
                   "feature_extractor_weights_path=", "feature_extractor='small-images-v1'", str(tmp_path)):
        assert needed in msg, (needed, msg)
    assert not (tmp_path / "run").exists() and _threads() == before
    # the download itself failing (host reachable, transfer refused) gives the same advice
    import emascope.features as F

    monkeypatch.setattr(F, "_reachable", lambda url, timeout=10.0: None)
    with pytest.raises(ValueError, match="feature_extractor_weights_path=") as err:
        attach(model, **kw)
    assert "Network is unreachable" in str(err.value) and not (tmp_path / "run").exists()
    # points with an image extractor, images with identity: refused at attach too
    with pytest.raises(ValueError, match="takes points"):
        attach(model, run_dir=tmp_path / "run", sampler=sampler, reference=_images(20, 32, 1),
               feature_extractor="identity")
    with pytest.raises(ValueError, match="takes images"):
        attach(model, run_dir=tmp_path / "run", sampler=sampler, reference=mixture(20, 1),
               feature_extractor="small-images-v1")
    assert not (tmp_path / "run").exists()


def test_small_images_pick_the_builtin_extractor_and_a_failing_sweep_speaks_once(tmp_path, caplog):
    torch.manual_seed(0)
    model = nn.Linear(4, 256)
    fail = {"on": False}

    def flaky_sampler(m, n, g):
        if fail["on"]:
            raise RuntimeError("sampler broke")
        return _image_sampler(m, n, g)

    scope = attach(model, run_dir=tmp_path / "run", sampler=flaky_sampler, reference=_images(60, 16, 1),
                   score_every=None, num_samples=40, batch_size=20, decays=(0.9,), kid_subset_size=20)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["settings"]["feature_extractor"] == "small-images-v1"
    res = scope.score_now()
    assert res.errors == 0 and set(res.scores["raw"]) >= {"fd", "kid_mean", "precision", "coverage"}
    assert "fid" not in res.scores["raw"]  # not Inception: never called FID
    fail["on"] = True
    with caplog.at_level(logging.WARNING, logger="emascope"):
        res = scope.score_now()
        res2 = scope.score_now()
    assert res.errors == 2 and res2.errors == 2  # raw and 0.9, in every sweep
    told = [r for r in caplog.records if "sampler failed" in r.getMessage()]
    assert len(told) == 1, [r.getMessage() for r in caplog.records]  # said once on the console
    assert "sampler broke" in told[0].getMessage() and "events.jsonl" in told[0].getMessage()
    scope.close(score=False)


def test_a_reference_failure_is_counted_in_the_sweep_errors(tmp_path, caplog):
    class Exploding(torch.utils.data.Dataset):
        def __len__(self):
            return 50

        def __getitem__(self, i):
            if i >= 16:  # items attach does not read; the first sweep reads them all
                raise OSError(f"cannot read item {i}")
            return torch.zeros(2)

    with caplog.at_level(logging.WARNING, logger="emascope"):
        scope = attach(Denoiser(), run_dir=tmp_path / "run", sampler=sampler, reference=Exploding(),
                       score_every=None, num_samples=50, decays=(0.9,))
        res = scope.score_now()
    assert res.errors == 1 and not res.scores["raw"]  # before: empty scores and errors == 0
    assert any("reference failed" in r.getMessage() and "cannot read item" in r.getMessage()
               for r in caplog.records)
    scope.close(score=False)


def test_small_images_extractor_is_fixed_and_separates_distributions():
    """The built-in extractor's weights are the same in a fresh process (NumPy's legacy stream), and
    its features tell real 8x8 digits from blurred or noisy ones far beyond the split-half noise."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from emascope.features import SmallImageExtractor, module_hash
    from emascope.metrics import frechet_distance

    code = ("from emascope.features import SmallImageExtractor; print(SmallImageExtractor().weights_hash)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)  # runs meanwhile
    ext = SmallImageExtractor()
    digits = torch.from_numpy(load_digits().images).float().div(16.0).mul(2).sub(1).unsqueeze(1)  # [-1, 1]
    a, b = digits[0::2][:600], digits[1::2][:600]
    blurred = torch.nn.functional.avg_pool2d(b, 3, stride=1, padding=1, count_include_pad=False)
    noisy = (b + 0.5 * torch.randn(b.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    fa, fb = ext(a).features, ext(b).features
    assert fa.shape == (600, 256) and torch.equal(fa, ext(a).features)  # deterministic
    same = frechet_distance(fa, fb)
    assert frechet_distance(fa, ext(blurred).features) > 10 * same
    assert frechet_distance(fa, ext(noisy).features) > 5 * same  # (split-half FD is biased up at n=600, d=256)
    # uint8 and float inputs of the same images give the same features
    as_uint8 = ((a + 1) * 127.5).round().to(torch.uint8)
    torch.testing.assert_close(ext(as_uint8).features, fa, atol=0.02, rtol=0)  # uint8: +-1/255 per pixel
    out, _ = child.communicate(timeout=300)
    assert child.returncode == 0 and out.strip() == ext.weights_hash == module_hash(ext.module)


def test_nested_wrappers_unwrap_to_the_torch_optimizer_and_the_model_is_untouched():
    """Wrappers of wrappers unwrap to the torch optimizer; the checks only read the model."""
    from emascope.config import Hooks, ScoringConfig
    from emascope.scope import check_attachable

    model = Denoiser()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert check_attachable(model, NoHookWrapper(NoHookWrapper(opt)), ScoringConfig(), Hooks()) is opt
    bank = EMABank(model, [0.9])
    for k, v in bank.materialize(0.9).items():
        assert torch.equal(v, model.state_dict()[k])


class Lookahead(torch.optim.Optimizer):
    """A hookable optimizer wrapping another that moves the weights after the inner step (Zhang et al.
    2019, k=2, alpha=0.5): the bank must see the weights after the whole outer step."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        super().__init__(inner.param_groups, {})
        self.optimizer = inner
        self.slow = [p.detach().clone() for g in inner.param_groups for p in g["params"]]
        self.k = 0

    @torch.no_grad()
    def step(self, closure=None):
        self.optimizer.step()
        self.k += 1
        if self.k % 2 == 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            for slow, p in zip(self.slow, params, strict=True):
                slow.add_(p - slow, alpha=0.5)
                p.copy_(slow)


def test_a_hookable_wrapper_is_hooked_itself(tmp_path):
    model = _no_dropout()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1))
    scope = attach(model, opt, run_dir=tmp_path / "run", score_every=None, decays=(0.0,))  # decay 0: the live weights
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, 2), 0.3).pow(2).mean().backward()
        opt.step()
    assert scope.current_step == 4  # one step per outer step
    for k, v in scope.bank.materialize(0.0).items():
        assert torch.equal(v, model.state_dict()[k])  # after the lookahead move, not before it
    scope.close()
