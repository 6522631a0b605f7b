"""emascope for PyTorch Lightning: a ready ``Callback``.

```python
from emascope.lightning import ScopeCallback

trainer = L.Trainer(max_steps=10_000, callbacks=[ScopeCallback(run_dir="runs/exp1", sampler=sample,
                                                                reference=real, score_every=1000)])
trainer.fit(module, data)
```

- ``on_fit_start``: :func:`emascope.attach` on the LightningModule and ``trainer.optimizers[i]``
  (``optimizer_index``, default 0); the bank follows that optimizer's real steps, which are
  ``trainer.global_step`` with gradient accumulation and AMP step skipping too. The keyword
  arguments are :func:`~emascope.attach`'s, validated when the callback is built. A module without
  optimizers (manual loops) is followed through ``trainer.global_step`` instead.
- ``on_train_batch_end``: checks that the agent's step count follows ``trainer.global_step``; a
  mismatch is said once on the console and as a ``notice`` event.
- Checkpoints: the callback's ``state_dict`` is :meth:`Scope.state_dict` (tensors and plain values,
  fine for ``weights_only`` loading), so every Lightning checkpoint carries the bank.
  ``trainer.fit(..., ckpt_path=...)`` attaches with ``resume=True`` and loads it: the run continues
  exactly from the checkpoint, whichever is newer of it and the run's own snapshot.
- ``on_fit_end``: :meth:`Scope.close`; ``on_exception``: :meth:`Scope.abort` (an ``error`` event,
  no final sweep), then Lightning re-raises.

Works with ``lightning.pytorch`` (or ``pytorch_lightning`` when only that is installed). Importing
this module imports Lightning; the core never does.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - the standalone package
    from pytorch_lightning import Callback  # type: ignore[no-redef]

from emascope.config import build_configs
from emascope.scope import Scope, attach


class ScopeCallback(Callback):
    """Attach emascope to a Lightning ``Trainer``; ``**attach_kwargs`` are :func:`emascope.attach`'s.

    ``optimizer_index``: which of ``trainer.optimizers`` drives the bank. :attr:`scope` is the
    :class:`~emascope.scope.Scope` once fitting has begun.
    """

    def __init__(self, *, optimizer_index: int = 0, **attach_kwargs: Any) -> None:
        build_configs(attach_kwargs)  # TypeError / ValueError now, not when fitting starts
        if isinstance(optimizer_index, bool) or not isinstance(optimizer_index, int) or optimizer_index < 0:
            raise ValueError(f"optimizer_index must be an int >= 0, got {optimizer_index!r}")
        self.attach_kwargs = attach_kwargs
        self.optimizer_index = optimizer_index
        self.scope: Scope | None = None
        self._saved: dict[str, Any] | None = None
        self._offset: int | None = None
        self._manual = False
        self._told = False
        self._loaded = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(run_dir=str(self.attach_kwargs["run_dir"]))

    # ------------------------------------------------------------------ fit

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.scope is not None and not self.scope.closed:
            return
        optimizers = list(trainer.optimizers)
        if optimizers and self.optimizer_index >= len(optimizers):
            raise ValueError(f"optimizer_index={self.optimizer_index} but the trainer has {len(optimizers)} "
                             "optimizer(s)")
        optimizer = optimizers[self.optimizer_index] if optimizers else None
        kwargs = dict(self.attach_kwargs)
        if trainer.ckpt_path is not None or self.scope is not None:  # resuming, or a second fit(): same run
            kwargs.pop("overwrite", None)
            kwargs["resume"] = True
        self.scope = attach(pl_module, optimizer, **kwargs)
        self._manual = optimizer is None
        self._offset, self._told, self._loaded = None, False, False
        if self._saved is not None:
            self.scope.load_state_dict(self._saved)
            self._saved, self._loaded = None, True

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # the training state (global_step) is restored from a checkpoint by now
        if self.scope is None:
            return
        if trainer.ckpt_path is not None and not self._loaded:
            self.scope.notice("lightning", f"resumed from {trainer.ckpt_path}, which holds no emascope state: the "
                              f"bank continues from the run's last snapshot (step {self.scope.current_step}), not "
                              "exactly from the checkpoint")
        self._offset = trainer.global_step - self.scope.current_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        scope = self.scope
        if scope is None or scope.closed or self._offset is None:
            return
        if self._manual:
            while scope.current_step + self._offset < trainer.global_step:
                scope.step()
            return
        if not self._told and scope.current_step + self._offset != trainer.global_step:
            self._told = True
            scope.notice("lightning", f"the agent counted {scope.current_step + self._offset} optimizer steps "
                         f"but trainer.global_step is {trainer.global_step}: with several optimizers pick the "
                         "one that steps the averaged weights (optimizer_index=)")

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.scope is not None:
            self.scope.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.scope is not None and not self.scope.closed:
            self.scope.abort(exception)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return self.scope.state_dict() if self.scope is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.scope is not None and not self.scope.closed:
            self.scope.load_state_dict(state_dict)  # strategies that restore callbacks after setup
            self._loaded = True
        else:
            self._saved = dict(state_dict)
