"""emascope with the real Lightning and diffusers, tiny models on the CPU, no network:

- :class:`emascope.lightning.ScopeCallback` on a LightningModule holding a tiny diffusers
  ``UNet2DModel`` (gradient accumulation 2): the bank counts ``trainer.global_step`` steps, the
  agent's state rides in Lightning's checkpoints and resuming from one gives the bank of a run that
  never stopped, bit for bit; an exception in training closes the run (error recorded, heartbeat
  closed) and propagates;
- ``emascope export --format diffusers`` writes a folder ``UNet2DModel.from_pretrained`` loads, both
  for the UNet inside the LightningModule (its ``unet.`` prefix removed) and for a UNet attached
  directly; the loaded model computes what the bank's variant computes;
- Lightning's ``LightningOptimizer`` wrapper is unwrapped by ``attach``.
"""

from __future__ import annotations

import json

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")
diffusers = pytest.importorskip("diffusers")

from diffusers import UNet2DModel  # noqa: E402

from emascope import attach  # noqa: E402
from emascope.export_cli import main as export_main  # noqa: E402
from emascope.lightning import ScopeCallback  # noqa: E402

torch.set_num_threads(1)

G = torch.Generator().manual_seed(3)
IMAGES = torch.rand(24, 1, 8, 8, generator=G) * 2 - 1
NOISE = torch.randn(24, 1, 8, 8, generator=G)
PROBE = (torch.randn(4, 1, 8, 8, generator=G), torch.tensor([1, 5, 9, 20]))


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)


def denoise_loss(unet: UNet2DModel, x: torch.Tensor, noise: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    t = (idx * 7) % 50
    a = (1 - t.float() / 50).view(-1, 1, 1, 1)
    return ((unet(a.sqrt() * x + (1 - a).sqrt() * noise, t).sample - noise) ** 2).mean()


class Diffusion(L.LightningModule):
    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.unet = tiny_unet()
        self.fail_at = fail_at

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step >= self.fail_at:
            raise RuntimeError("training blew up")
        x, noise, idx = batch
        return denoise_loss(self.unet, x, noise, idx)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def loader():
    data = torch.utils.data.TensorDataset(IMAGES, NOISE, torch.arange(len(IMAGES)))
    return torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)


def val_loss(module: torch.nn.Module) -> dict[str, float]:
    return {"val_loss": float(denoise_loss(module.unet, IMAGES[:8], NOISE[:8], torch.arange(8)))}


def _trainer(root, callbacks, **kw) -> L.Trainer:
    return L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(root), accumulate_grad_batches=2,
                     callbacks=callbacks, num_sanity_val_steps=0, **kw)


def _events(run_dir, type_):
    return [e for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines()) if e["type"] == type_]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Two epochs (6 optimizer steps, 12 batches) with a checkpoint every 3 steps."""
    root = tmp_path_factory.mktemp("lightning")
    cb = ScopeCallback(run_dir=root / "run", evaluate=val_loss, metric_directions={"val_loss": "lower"},
                       score_every=3, decays=(0.9, 0.99), score_busy="wait")  # background: every stage scored
    ckpt = L.callbacks.ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3, save_top_k=-1,
                                       filename="{step}")
    module = Diffusion()
    trainer = _trainer(root, [cb, ckpt])
    trainer.fit(module, loader())
    return {"root": root, "cb": cb, "trainer": trainer, "module": module,
            "bank": cb.scope.bank.state_dict()["bank"].clone()}


def test_callback_follows_global_step_and_closes(straight):
    scope, trainer, run_dir = straight["cb"].scope, straight["trainer"], straight["root"] / "run"
    assert trainer.global_step == 6 and scope.current_step == 6 and scope.bank.step == 6
    assert scope.closed and json.loads((run_dir / "heartbeat").read_text())["state"] == "closed"
    assert not _events(run_dir, "notice") and not _events(run_dir, "error")
    assert [e["step"] for e in _events(run_dir, "score_done")] == [3, 6]
    # the checkpoints hold the agent's state (tensors and plain values: weights_only loads them)
    ckpt = torch.load(straight["root"] / "ckpt" / "step=3.ckpt", weights_only=True)
    state = ckpt["callbacks"][straight["cb"].state_key]
    assert state["format"] == "emascope.Scope" and state["step"] == 3


def test_resume_from_a_lightning_checkpoint_is_exact(straight, tmp_path):
    root = straight["root"]
    cb = ScopeCallback(run_dir=root / "run", evaluate=val_loss, metric_directions={"val_loss": "lower"},
                       score_every=3, decays=(0.9, 0.99), score_busy="wait")
    trainer = _trainer(tmp_path, [cb])
    trainer.fit(Diffusion(), loader(), ckpt_path=str(root / "ckpt" / "step=3.ckpt"))
    assert trainer.global_step == 6 and cb.scope.current_step == 6
    assert torch.equal(cb.scope.bank.state_dict()["bank"], straight["bank"])
    resume = [e for e in _events(root / "run", "resume") if e.get("source") == "state_dict"]
    assert [e["step"] for e in resume] == [3]
    assert not [e for e in _events(root / "run", "notice") if e.get("where") == "lightning"]


def test_exception_in_training_closes_the_run_and_propagates(tmp_path):
    cb = ScopeCallback(run_dir=tmp_path / "run", score_every=None, decays=(0.9,))
    with pytest.raises(RuntimeError, match="training blew up"):
        _trainer(tmp_path, [cb]).fit(Diffusion(fail_at=2), loader())
    assert cb.scope.closed and cb.scope.current_step == 2
    assert json.loads((tmp_path / "run" / "heartbeat").read_text())["state"] == "closed"
    errors = _events(tmp_path / "run", "error")
    assert [(e["where"], e["step"]) for e in errors] == [("training", 2)] and "blew up" in errors[0]["message"]
    assert not _events(tmp_path / "run", "score_done")  # no final sweep after a crash
    assert [e["step"] for e in _events(tmp_path / "run", "snapshot")] == [2]  # the bank is kept


def _probe(unet: UNet2DModel) -> torch.Tensor:
    with torch.no_grad():
        return unet(*PROBE).sample


def test_diffusers_export_of_the_unet_inside_the_lightning_module(straight, tmp_path):
    run_dir = straight["root"] / "run"
    record = json.loads((run_dir / "model_config.json").read_text())
    assert (record["library"], record["class"], record["prefix"]) == ("diffusers", "UNet2DModel", "unet.")
    out = tmp_path / "unet-0.99"
    assert export_main([str(run_dir), "--variant", "0.99", "--format", "diffusers", "--out", str(out)]) == 0
    loaded = UNet2DModel.from_pretrained(out).eval()
    module = straight["module"].eval()
    with straight["cb"].scope.bank.swap(module, 0.99):
        want = _probe(module.unet)
    torch.testing.assert_close(_probe(loaded), want, rtol=0, atol=0)
    assert export_main([str(run_dir), "--variant", "0.99", "--format", "transformers", "--out",
                        str(tmp_path / "x")]) == 2 and not (tmp_path / "x").exists()


def test_diffusers_export_of_an_attached_unet(tmp_path):
    unet = tiny_unet(1)
    opt = torch.optim.SGD(unet.parameters(), lr=0.1)
    scope = attach(unet, opt, run_dir=tmp_path / "run", score_every=None, decays=(0.5,))
    for i in range(3):
        loss = denoise_loss(unet, IMAGES[4 * i:4 * i + 4], NOISE[4 * i:4 * i + 4], torch.arange(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = scope.export(0.5, tmp_path / "ema", format="diffusers")
    with pytest.raises(ValueError, match="use --format diffusers"):
        scope.export(0.5, tmp_path / "bad", format="transformers")
    scope.close()
    assert (tmp_path / "run" / "model_config.json").is_file()
    loaded = UNet2DModel.from_pretrained(out).eval()
    with scope.bank.swap(unet, 0.5):
        want = _probe(unet.eval())
    torch.testing.assert_close(_probe(loaded), want, rtol=0, atol=0)
    assert not (tmp_path / "bad").exists()


class ManualDiffusion(Diffusion):
    """Manual optimization, attached by hand with ``self.optimizers()``: a ``LightningOptimizer``."""

    def __init__(self, run_dir) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.run_dir = run_dir
        self.scope = None

    def on_train_start(self) -> None:
        self.scope = attach(self, self.optimizers(), run_dir=self.run_dir, score_every=None, decays=(0.9,))

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = denoise_loss(self.unet, *batch)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()

    def on_train_end(self) -> None:
        self.scope.close()


def test_lightning_optimizer_is_unwrapped(tmp_path):
    module = ManualDiffusion(tmp_path / "run")
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    trainer.fit(module, loader())
    assert trainer.global_step == 4 and module.scope.current_step == 4 and module.scope.bank.step == 4
    from lightning.pytorch.core.optimizer import LightningOptimizer

    assert isinstance(module.optimizers(), LightningOptimizer)
    # Lightning names its wrapper class after the optimizer's
    assert _events(tmp_path / "run", "start")[0]["optimizer"] == f"{type(module.optimizers()).__name__} -> Adam"
