"""Batched sampling across variants: one sampler call draws a batch for every variant at once.

The variants' weights are stacked along a new leading dimension (what
``torch.func.stack_module_state`` does for a list of modules, here filled from the bank one
variant at a time so no module copies are made) and the sampler runs once under
``torch.func.vmap(..., randomness="same")``, with a model stand-in (:class:`StackedModel`) whose
calls go through ``torch.func.functional_call`` with the variant's slice of the stacked weights.
``randomness="same"`` makes every random draw of the sampler happen once, from the batch's own
generator, and be shared by all variants: exactly the draws of the one-variant-at-a-time path
(common random numbers hold, and the results equal that path's; see tests/test_batched.py).

**Contract** (declare it with ``attach(batched_sampling=True)``): the sampler is a *pure function
of the model*:

- it uses the model only by calling it (``model(x, t)``) or one of its submodules
  (``model.net(x)``), reading plain attributes (``model.sigma_data``), or asking
  ``model.parameters()`` / ``model.buffers()`` for a device or dtype; any other method
  (``model.denoise(...)``) would run with unstacked weights and is refused;
- all randomness comes from the ``generator`` it is given (no global generators);
- it does not write to the model or keep state between calls;
- it has no Python control flow that depends on tensor values (``if x.max() > 1``, ``.item()``):
  ``vmap`` cannot batch those.

A sampler that breaks the contract in a way ``vmap`` notices raises; the sweep then draws one
variant at a time (recorded once per run as a ``notice``). Memory: the stacked weights (one copy
per variant, model dtype, of all but the frozen parameters: a frozen LoRA base is the same in every
variant and passed once, unstacked) and one batch of samples per variant at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

#: Methods of the model a batched sampler may call (they do not compute with the weights).
ALLOWED_METHODS = ("parameters", "buffers", "named_parameters", "named_buffers")


class BatchedSamplingUnsupported(RuntimeError):
    """The sampler did something batched sampling cannot stack (see the module's contract)."""


class StackedModel:
    """Stand-in for the model inside the vmapped sampler: ``self(*args)`` is
    ``functional_call(module, weights, args)`` with this variant's slice of the stacked weights.

    Submodules come back as :class:`StackedModel` of their own weights; plain attributes are the
    module's; other methods raise :class:`BatchedSamplingUnsupported`.
    """

    def __init__(self, module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        self._module = module
        self._weights = weights

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self._module, self._weights, args, kwargs)

    forward = __call__

    def eval(self) -> StackedModel:
        """No-op (the sweep already put the model in eval mode)."""
        return self

    @property
    def training(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        attr = getattr(self._module, name)
        if isinstance(attr, nn.Module):
            prefix = name + "."
            return StackedModel(attr, {k[len(prefix):]: v for k, v in self._weights.items() if k.startswith(prefix)})
        if name in ALLOWED_METHODS or not callable(attr):
            return attr
        raise BatchedSamplingUnsupported(
            f"the sampler called model.{name}(...): batched sampling only supports calling the model "
            "or its submodules (see emascope.batched); set batched_sampling=False")


def weight_names(model: nn.Module) -> list[str]:
    """The names ``functional_call`` takes for ``model``: parameters then buffers, tied ones once."""
    return [k for k, _ in model.named_parameters()] + [k for k, _ in model.named_buffers()]


@torch.no_grad()
def stack_weights(model: nn.Module, states: Sequence[Callable[[], dict[str, torch.Tensor]]],
                  shared: Sequence[str] = ()) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``({name: [V, *shape]}, {name: tensor})``: every variant's weights stacked on a new leading
    dimension, and the weights named in ``shared`` (the same in every variant and never written
    by a forward: ``bank.frozen_keys()``, the frozen parameters) once, as the first state gives
    them (not copied; buffers are stacked, since a forward may update them).

    ``states[i]()`` returns variant ``i``'s full state dict (e.g. ``bank.variant_state(v)``); they
    are asked for one at a time and copied in, so only one extra state dict exists at any moment.
    Stacked tensors land on the model's own tensors' devices and dtypes.
    """
    names = weight_names(model)
    keep = set(shared)
    live = model.state_dict(keep_vars=True)
    out = {k: torch.empty((len(states), *live[k].shape), dtype=live[k].dtype, device=live[k].device)
           for k in names if k not in keep}
    once: dict[str, torch.Tensor] = {}
    for i, state in enumerate(states):
        sd = state()
        if i == 0:
            once = {k: sd[k].to(device=live[k].device, dtype=live[k].dtype) for k in names if k in keep}
        for k in out:
            out[k][i].copy_(sd[k])
    return out, once


def sample_stacked(model: nn.Module, weights: dict[str, torch.Tensor], sampler: Callable[..., Any], n: int,
                   generator: torch.Generator, shared: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``[V, n, ...]``: ``sampler(variant_model, n, generator)`` for all V variants in one vmapped call.

    ``weights``/``shared``: what :func:`stack_weights` returns (``shared``: unbatched, the same for
    every variant). ``generator`` is consumed once (its draws are shared by all variants). Raises
    whatever the sampler or ``vmap`` raises; the caller falls back to one variant at a time.
    """
    fixed = dict(shared or {})

    def one(w: dict[str, torch.Tensor]) -> torch.Tensor:
        out = sampler(StackedModel(model, {**w, **fixed}), n, generator)
        if not torch.is_tensor(out):
            raise BatchedSamplingUnsupported(f"the sampler returned {type(out).__name__}, not a tensor")
        return out

    return vmap(one, randomness="same")(weights)
