"""emascope for the Hugging Face ``transformers`` Trainer: a ready ``TrainerCallback``.

```python
from emascope.hf import ScopeCallback

trainer = Trainer(model=model, args=args, train_dataset=data,
                  callbacks=[ScopeCallback(run_dir="runs/exp1", evaluate=val_loss, score_every=500,
                                           metric_directions={"val_loss": "lower"})])
trainer.train()
```

- ``on_train_begin``: :func:`emascope.attach` on the Trainer's model and optimizer (accelerate's
  ``AcceleratedOptimizer`` is unwrapped: the bank follows the real optimizer steps, one per
  ``state.global_step``, with gradient accumulation and AMP step skipping). The keyword arguments
  are :func:`~emascope.attach`'s, validated when the callback is built.
- ``on_step_end``: checks that the agent's step count follows ``state.global_step``; a mismatch
  (a second optimizer, a custom loop) is said once on the console and as a ``notice`` event.
- ``on_save``: the agent's state goes into the checkpoint folder
  (``OUTPUT_DIR/checkpoint-<step>/emascope_state.pt``, tensors and plain values only, loaded with
  ``torch.load(weights_only=True)``). ``trainer.train(resume_from_checkpoint=...)`` then continues
  the run exactly: at ``on_train_begin`` with ``state.global_step > 0`` the callback attaches with
  ``resume=True`` and loads that file (``resume_from=`` names another file); without one the bank
  continues from the run's last snapshot and a notice says so.
- ``on_train_end``: :meth:`Scope.close`. transformers tells callbacks nothing when ``train()``
  raises: use the callback as a context manager (``with ScopeCallback(...) as cb: ...``), which
  records the error and closes the run without a final sweep, as ``with attach(...)`` does.

Importing this module imports transformers (and torch); the core never does.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from emascope.atomic import atomic_write_bytes
from emascope.config import build_configs
from emascope.scope import Scope, attach

#: The agent's state inside a Trainer checkpoint folder.
CHECKPOINT_FILE = "emascope_state.pt"


class ScopeCallback(TrainerCallback):
    """Attach emascope to a ``transformers.Trainer``; ``**attach_kwargs`` are :func:`emascope.attach`'s.

    ``resume_from``: the ``emascope_state.pt`` to load when training resumes from a checkpoint
    (default: the one in ``OUTPUT_DIR/checkpoint-<global_step>/``). :attr:`scope` is the
    :class:`~emascope.scope.Scope` once training has begun.
    """

    def __init__(self, *, resume_from: str | os.PathLike | None = None, **attach_kwargs: Any) -> None:
        build_configs(attach_kwargs)  # TypeError / ValueError now, not when training starts
        self.attach_kwargs = attach_kwargs
        self.resume_from = resume_from
        self.scope: Scope | None = None
        self._offset = 0
        self._told = False

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if self.scope is not None and not self.scope.closed:
            return
        kwargs = dict(self.attach_kwargs)
        saved = None
        if state.global_step > 0 or self.scope is not None:  # a resumed or repeated train(): same run
            kwargs.pop("overwrite", None)
            kwargs["resume"] = True
        if state.global_step > 0:
            path = self.resume_from or os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}",
                                                    CHECKPOINT_FILE)
            if os.path.isfile(path):
                saved = torch.load(path, map_location="cpu", weights_only=True)
        self.scope = attach(model, optimizer, **kwargs)
        if saved is not None:
            self.scope.load_state_dict(saved)
        elif state.global_step > 0:
            self.scope.notice("hf", f"training resumed at global_step {state.global_step} without an "
                              f"{CHECKPOINT_FILE} in the checkpoint: the bank continues from the run's last "
                              f"snapshot (step {self.scope.current_step}), not exactly from the checkpoint")
        self._offset = state.global_step - self.scope.current_step
        self._told = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        scope = self.scope
        if scope is None or scope.closed or self._told:
            return
        if scope.current_step + self._offset != state.global_step:
            self._told = True
            scope.notice("hf", f"the agent counted {scope.current_step + self._offset} optimizer steps but the "
                         f"Trainer is at global_step {state.global_step}: is the model trained by another "
                         "optimizer too? The bank follows the optimizer the Trainer passed to callbacks")

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        scope = self.scope
        if scope is None or not scope.is_writer:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            buf = io.BytesIO()
            torch.save(scope.state_dict(), buf)
            atomic_write_bytes(os.path.join(folder, CHECKPOINT_FILE), buf.getvalue())

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.scope is not None:
            self.scope.close()

    # ------------------------------------------------------------------ exceptions

    def __enter__(self) -> ScopeCallback:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self.scope is None or self.scope.closed:
            return
        if exc is not None:
            self.scope.abort(exc)
        else:
            self.scope.close()
