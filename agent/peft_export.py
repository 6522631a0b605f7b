"""Exports of Hugging Face peft models (LoRA and the other tuners): the adapter folder, or the merged model.

A ``peft.PeftModel`` keeps the base weights frozen, so the bank averages only the adapters. At
attach, :func:`peft_record` records the adapter's config (as peft writes ``adapter_config.json``)
beside the base model's config (:mod:`emascope.pretrained`). Exports then go through peft's own
code, never a hand-made key mapping:

- ``--format peft``: :func:`save_adapter` calls ``PeftModel.save_pretrained(folder,
  state_dict=<variant>)`` (``adapter_config.json``, ``adapter_model.safetensors``, peft's
  ``README.md``), which ``PeftModel.from_pretrained(base, folder)`` loads;
- ``--format transformers``: :func:`merged_state_dict` loads the variant into a ``PeftModel`` and
  calls ``merge_and_unload()``: the base model with the averaged adapters merged in, which
  ``AutoModelForCausalLM.from_pretrained(folder)`` loads.

After the job (``emascope export``), the ``PeftModel`` is rebuilt from the recorded configs on the
``meta`` device (no memory, no weights initialised): the base transformers class from its config,
then ``peft.get_peft_model`` with the recorded adapter config. In the training process the live
model itself serves (its weights are never modified). Adapters injected without a ``PeftModel``
(``model.add_adapter(...)``) are recorded as such and their ``from_pretrained`` exports refused
(the keys hold ``base_layer``/``lora_A``: a plain model class would silently load them wrong).

Detection is by class names (``PeftModel`` / ``BaseTunerLayer`` from a ``peft`` module); peft is
imported only to export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from emascope.snapshot import write_state_dict

#: File names peft writes (``peft.utils.constants``), the ones :func:`save_adapter` moves into place.
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "README.md")


def _has_class(module: nn.Module, name: str) -> bool:
    return any(c.__name__ == name and c.__module__.split(".", 1)[0] == "peft" for c in type(module).__mro__)


def find_peft(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(prefix, module)`` of the one outermost ``peft.PeftModel`` in ``model`` (``model`` itself:
    prefix ``""``), else ``None`` (none, or several)."""
    if _has_class(model, "PeftModel"):
        return "", model
    found = [(name, sub) for name, sub in model.named_modules() if name and _has_class(sub, "PeftModel")]
    outer = [(n, m) for n, m in found if not any(n.startswith(p + ".") for p, _ in found)]
    return (outer[0][0] + ".", outer[0][1]) if len(outer) == 1 else None


def has_tuner_layers(module: nn.Module) -> bool:
    """Whether peft injected adapter layers (``BaseTunerLayer``) into ``module``."""
    return any(_has_class(m, "BaseTunerLayer") for m in module.modules())


def adapter_config_dict(config: Any) -> dict[str, Any]:
    """A peft config as ``PeftConfig.save_pretrained`` writes it (``to_dict()``, sets as lists)."""
    return json.loads(json.dumps(config.to_dict(), default=list))


def peft_record(model: nn.Module, base_prefix: str) -> dict[str, Any] | None:
    """The ``"peft"`` part of ``model_config.json`` for ``model`` whose transformers model sits at
    ``base_prefix``; ``None`` without peft adapters. ``prefix``: the ``PeftModel``'s key prefix in
    the attached module, ``None`` for adapters injected without one. Raises when peft's config does
    not serialise (the caller records no config then)."""
    found = find_peft(model)
    if found is None:
        base = model.get_submodule(base_prefix[:-1]) if base_prefix else model
        if not has_tuner_layers(base):
            return None
        return {"prefix": None, "class": None, "adapter_name": None, "config": None, "library_version": _version()}
    prefix, peft_model = found
    name = peft_model.active_adapter
    if not isinstance(name, str):
        raise ValueError(f"several active adapters {name!r}: export one at a time")
    return {"prefix": prefix, "class": type(peft_model).__name__, "adapter_name": name,
            "config": adapter_config_dict(peft_model.peft_config[name]), "library_version": _version()}


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("peft")
    except Exception:  # noqa: BLE001
        return ""


def check_exportable(record: dict[str, Any], fmt: str) -> None:
    """``ValueError`` when a run with peft adapters (``record["peft"]``) cannot be exported as ``fmt``."""
    info = record.get("peft")
    if fmt == "peft" and info is None:
        raise ValueError(f"this run's model ({record['class']}) holds no peft adapters: use --format "
                         f"{record['library']} or safetensors")
    if info is not None and info["prefix"] is None and fmt in ("peft", record["library"]):
        raise ValueError("this run's adapters were injected without a peft.PeftModel (e.g. model.add_adapter): "
                         "neither an adapter folder nor a merged model can be rebuilt from the run; use --format "
                         "safetensors, or train a peft.get_peft_model(...) model")
    if info is not None and record["library"] != "transformers" and fmt != "safetensors":
        raise ValueError(f"peft exports need a transformers base model; this run's is a {record['library']} "
                         f"{record['class']}: use --format safetensors")


def strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, prefix removed."""
    return {k[len(prefix):]: t for k, t in state.items() if k.startswith(prefix)}


def skeleton(record: dict[str, Any]) -> nn.Module:
    """The run's ``PeftModel`` rebuilt on the ``meta`` device from ``record`` (no weights)."""
    import peft
    import transformers

    info = record["peft"]
    cls = getattr(transformers, record["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"transformers {transformers.__version__} has no model class {record['class']!r}")
    body = dict(record["config"])
    config = transformers.AutoConfig.for_model(body.pop("model_type"), **body)
    adapter = peft.PeftConfig.from_peft_type(**info["config"])
    with torch.device("meta"):
        model = peft.get_peft_model(cls(config), adapter, adapter_name=info["adapter_name"])
    if type(model).__name__ != info["class"]:
        raise ValueError(f"peft built a {type(model).__name__}, the run trained a {info['class']}")
    return model


def check_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    want, have = set(model.state_dict()), set(state)
    if want != have:
        raise ValueError(f"the rebuilt {type(model).__name__} does not match the run's weights: missing "
                         f"{sorted(want - have)[:3]}, unexpected {sorted(have - want)[:3]}")


def save_adapter(peft_model: nn.Module, adapter_name: str, state: dict[str, torch.Tensor], out: Path, *,
                 metadata: dict[str, str], dtype: torch.dtype | None = None) -> Path:
    """Write adapter ``adapter_name`` of ``state`` (the ``PeftModel``'s full state_dict for one variant)
    as a folder ``out`` that ``PeftModel.from_pretrained(base, out)`` loads, through
    ``peft_model.save_pretrained(..., state_dict=state)``; ``peft_model``'s own weights are not read.

    peft writes into a temp folder inside ``out``; each file then replaces its namesake in ``out``
    atomically (the weights re-saved with ``metadata`` added to peft's ``format: pt``). ``dtype``
    casts floating tensors."""
    if dtype is not None:
        state = {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".peft-", suffix=".tmp", dir=out))
    try:
        peft_model.save_pretrained(str(tmp), selected_adapters=[adapter_name], state_dict=state)
        src = tmp if adapter_name == "default" else tmp / adapter_name  # peft's sub-folder for other names
        weights = load_file(src / ADAPTER_FILES[0])
        write_state_dict(weights, out / ADAPTER_FILES[0], {"format": "pt", **metadata})
        for name in ADAPTER_FILES[1:]:
            if (src / name).is_file():
                os.replace(src / name, out / name)
            elif (tmp / name).is_file():  # the model card sits at the top even for a sub-folder adapter
                os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def merged_state_dict(peft_model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's state_dict with ``state``'s adapters merged in by peft (``merge_and_unload``).

    ``peft_model`` is a skeleton (:func:`skeleton`): ``state`` is cloned into it, so neither the
    caller's tensors nor a live model are modified."""
    check_keys(peft_model, state)
    owned: dict[int, torch.Tensor] = {}
    cloned = {k: owned.setdefault(id(t), t.detach().to("cpu", copy=True)) for k, t in state.items()}
    peft_model.load_state_dict(cloned, assign=True)
    base = peft_model.merge_and_unload()
    if hasattr(base, "tie_weights"):
        base.tie_weights()
    return base.state_dict()
