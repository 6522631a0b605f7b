"""Exports that load where users load models: a ``from_pretrained`` folder for transformers / diffusers.

At attach, :func:`model_config_record` looks for a transformers ``PreTrainedModel`` or a diffusers
``ModelMixin`` (the attached module itself, or the one such model inside it, e.g. a
LightningModule's ``self.unet``) and records the config the library would write as
``config.json`` into ``RUN_DIR/model_config.json`` (:data:`emascope.runformat.MODEL_CONFIG`).
:func:`export_pretrained` then writes any variant as a folder holding that ``config.json`` and
the weights under the library's own file name (``model.safetensors`` /
``diffusion_pytorch_model.safetensors``), which ``AutoModel*.from_pretrained(folder)`` /
``UNet2DModel.from_pretrained(folder)`` load without the training code.

Detection is by duck typing over the class hierarchy (a base class named ``PreTrainedModel`` from
a ``transformers`` module, ``ModelMixin`` from a ``diffusers`` module): neither library is
imported here, so the core never needs them installed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from emascope import runformat as rf
from emascope.atomic import atomic_write_json
from emascope.bank import EMABank
from emascope.peft_export import (
    check_exportable,
    check_keys,
    find_peft,
    merged_state_dict,
    peft_record,
    save_adapter,
    skeleton,
    strip,
)
from emascope.shardfiles import latest_snapshot, load_bank, open_snapshot
from emascope.snapshot import (
    ExportError,
    check_export_target,
    export_checkpoint,
    parse_dtype,
    snapshot_metadata,
    write_in_exports,
    write_state_dict,
)
from emascope.version import __version__

log = logging.getLogger(__name__)

#: library -> the base class every model of it derives from
_BASES = {"transformers": "PreTrainedModel", "diffusers": "ModelMixin"}


def library_of(module: nn.Module) -> str | None:
    """``"transformers"`` / ``"diffusers"`` when ``module`` is such a model (by its base classes)."""
    for cls in type(module).__mro__:
        top = cls.__module__.split(".", 1)[0]
        if _BASES.get(top) == cls.__name__:
            return top
    return None


def find_pretrained(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(prefix, submodule)`` of the transformers/diffusers model in ``model``: ``model`` itself
    (prefix ``""``), else the one outermost such submodule (prefix ``"name."``); ``None`` when there
    is none or several (ambiguous: which one would a folder hold?)."""
    if library_of(model) is not None:
        return "", model
    found: list[tuple[str, nn.Module]] = []
    for name, sub in model.named_modules():
        if name and library_of(sub) is not None and not any(name.startswith(p + ".") for p, _ in found):
            found.append((name, sub))
    return (found[0][0] + ".", found[0][1]) if len(found) == 1 else None


def _library_version(library: str) -> str:
    try:
        from importlib.metadata import version
        return version(library)
    except Exception:  # noqa: BLE001
        return ""


def config_dict(module: nn.Module, library: str) -> dict[str, Any]:
    """The dict the library writes as ``config.json`` for ``module``.

    transformers: ``config.to_json_string(use_diff=False)`` (every field), with ``architectures``
    set to the class when empty (``AutoModel*`` needs it); diffusers: ``module.to_json_string()``
    (``_class_name`` and ``_diffusers_version`` included).
    """
    if library == "transformers":
        body = json.loads(module.config.to_json_string(use_diff=False))
        if not body.get("architectures"):
            body["architectures"] = [type(module).__name__]
        return body
    return json.loads(module.to_json_string())


def model_config_record(model: nn.Module) -> dict[str, Any] | None:
    """The :data:`~emascope.runformat.MODEL_CONFIG` body for ``model``, or ``None`` when it holds no
    transformers/diffusers model. Never raises: a config the library cannot serialise is logged
    and left out (the plain safetensors export still works)."""
    try:
        found = find_pretrained(model)
        if found is None:
            return None
        prefix, module = found
        library = library_of(module)
        assert library is not None
        body = rf.model_config_body(library=library, cls=type(module).__name__,
                                    library_version=_library_version(library), prefix=prefix,
                                    config=config_dict(module, library))
        adapters = peft_record(model, prefix)
        if adapters is not None:
            body["peft"] = adapters
        return body
    except Exception as exc:  # noqa: BLE001
        log.warning("emascope: could not record the model's config (%s: %s); exports stay plain safetensors",
                    type(exc).__name__, exc)
        return None


def write_model_config(run_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write ``RUN_DIR/model_config.json`` atomically (raises on a write error: called at attach)."""
    path = Path(run_dir) / rf.MODEL_CONFIG
    atomic_write_json(path, record)
    return path


def read_model_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The recorded model config of a run, ``None`` if the run has none; ``ValueError`` if malformed,
    larger than :data:`~emascope.runformat.MAX_MODEL_CONFIG_BYTES` or nested too deeply."""
    path = Path(run_dir) / rf.MODEL_CONFIG
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:  # is_file(): a regular file, never a FIFO or device
            data = f.read(rf.MAX_MODEL_CONFIG_BYTES + 1)
        if len(data) > rf.MAX_MODEL_CONFIG_BYTES:
            raise ValueError(f"larger than {rf.MAX_MODEL_CONFIG_BYTES} bytes")
        body = json.loads(data.decode("utf-8"))
    except (OSError, ValueError) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise ValueError(f"{str(path)!r} is not readable JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"{str(path)!r} is not readable JSON: nested too deeply") from None
    return rf.parse_model_config(body)


def check_format(record: dict[str, Any], fmt: str) -> None:
    """``ValueError`` naming the problem when a run with ``record`` cannot be exported as ``fmt``."""
    if fmt != record["library"] and fmt != "peft":
        raise ValueError(f"this run's model is a {record['library']} model ({record['class']}): "
                         f"use --format {record['library']} (or safetensors), not {fmt!r}")
    check_exportable(record, fmt)


def export_pretrained_from_bank(bank: EMABank, variant: str | float, record: dict[str, Any],
                                out: str | os.PathLike, *, fmt: str, dtype: str | None = None,
                                run_id: str = "", model: nn.Module | None = None) -> Path:
    """Write ``variant`` of ``bank`` as a ``from_pretrained`` folder ``out`` (created if needed):
    ``config.json`` from ``record`` and the weights (keys under ``record["prefix"]``, prefix
    removed) as ``model.safetensors`` / ``diffusion_pytorch_model.safetensors``, both atomic.

    A run with a ``peft.PeftModel`` (``record["peft"]``): ``fmt="peft"`` writes the adapter folder,
    ``fmt="transformers"`` the merged model (:mod:`emascope.peft_export`); ``model``: the attached
    model when exporting in the training process (its live ``PeftModel`` then writes the adapter).
    ``ValueError`` when ``fmt`` does not fit the recorded model or ``out`` is a file."""
    record = rf.parse_model_config(record)
    check_format(record, fmt)
    variant = bank.resolve(variant)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{str(out)!r} exists and is not a folder (a {fmt} export is a folder)")
    if record.get("peft") is not None:
        return _export_peft(bank, variant, record, out, fmt=fmt, dtype=dtype, run_id=run_id, model=model)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / rf.PRETRAINED_CONFIG, record["config"])
    export_checkpoint(bank, variant, out / rf.PRETRAINED_WEIGHTS[fmt], dtype=dtype, run_id=run_id,
                      metadata=dict(rf.PRETRAINED_METADATA), prefix=record["prefix"])
    return out


def _export_peft(bank: EMABank, variant: str, record: dict[str, Any], out: Path, *, fmt: str,
                 dtype: str | None, run_id: str, model: nn.Module | None) -> Path:
    info = record["peft"]
    meta = rf.export_metadata(variant, bank.step, run_id=run_id, emascope_version=__version__)
    state = strip(bank.variant_state(variant), info["prefix"])  # averaged entries copied, frozen ones not
    cast = parse_dtype(dtype)
    live = find_peft(model) if model is not None and fmt == "peft" else None
    if live is not None:  # in the training process: the live PeftModel writes, its weights are not read
        return save_adapter(live[1], info["adapter_name"], state, out, metadata=meta, dtype=cast)
    peft_model = skeleton(record)
    if fmt == "peft":
        check_keys(peft_model, state)
        return save_adapter(peft_model, info["adapter_name"], state, out, metadata=meta, dtype=cast)
    merged = merged_state_dict(peft_model, state)
    if cast is not None:
        merged = {k: t.to(cast) if t.is_floating_point() else t for k, t in merged.items()}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / rf.PRETRAINED_CONFIG, record["config"])
    write_state_dict(merged, out / rf.PRETRAINED_WEIGHTS[fmt], {**rf.PRETRAINED_METADATA, **meta})
    return out


def export_pretrained(run_dir: str | os.PathLike, variant: str, fmt: str, out: str | os.PathLike | None = None,
                      dtype: str | None = None, *, notice: Callable[[str], None] | None = None) -> Path:
    """``emascope export RUN_DIR --variant D --format transformers|diffusers``: rebuild ``variant``
    from the run's bank snapshot and write a ``from_pretrained`` folder (default
    ``RUN_DIR/exports/ema-<variant>-step<step>/``). :class:`~emascope.snapshot.ExportError` naming
    the problem (no recorded config, wrong library, missing, malformed or corrupt snapshot, unknown
    variant, an ``out`` inside the run but not under its ``exports/``, see
    :func:`~emascope.snapshot.check_export_target`). ``notice``: see :func:`~emascope.snapshot.load_snapshot`."""
    try:
        run_dir = rf.check_readable_run_dir(run_dir)
        record = read_model_config(run_dir)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if record is None:
        raise ExportError(f"{str(run_dir)!r} has no recorded model config ({rf.MODEL_CONFIG}): the attached model "
                          "was not a transformers or diffusers model; use --format safetensors")
    try:
        check_format(record, fmt)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    snapshot = latest_snapshot(run_dir)  # banks/latest.safetensors, or a sharded run's index
    if snapshot is None:
        raise ExportError(f"{str(run_dir)!r} has no bank snapshot ({rf.SNAPSHOT}); "
                          "the run has not reached snapshot_every steps or close() yet")
    if out is not None:
        out = check_export_target(run_dir, out, folder=True)
    try:
        rf.validate_export_dtype(dtype)
        bank = load_bank(snapshot, notice=notice)  # a sharded set is consolidated offline
        name = bank.resolve(variant)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if out is None:
        try:
            (run_dir / rf.EXPORTS).mkdir(exist_ok=True)
            rf.run_subdir(run_dir, rf.EXPORTS)
        except (OSError, ValueError) as exc:
            raise ExportError(f"cannot export into the run: {exc}") from None
    path = Path(out) if out is not None else run_dir / rf.export_dir(rf.default_export_name(name, bank.step), fmt)
    if path.exists() and not path.is_dir():
        raise ExportError(f"{str(path)!r} exists and is not a folder (a {fmt} export is a folder)")
    run_id = (open_snapshot(snapshot).run_id if snapshot.name.endswith(".json")
              else snapshot_metadata(snapshot).get("run_id", ""))
    try:
        if out is not None:
            return export_pretrained_from_bank(bank, name, record, path, fmt=fmt, dtype=dtype, run_id=run_id)
        return write_in_exports(run_dir, path.name, lambda p: export_pretrained_from_bank(
            bank, name, record, p, fmt=fmt, dtype=dtype, run_id=run_id))
    except OSError as exc:
        raise ExportError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
