"""``emascope export RUN_DIR --variant D [--out PATH] [--dtype float32]``.

Rebuilds one variant from the run's bank snapshot (``banks/latest.safetensors``) without the
model's Python class and writes it as a ``.safetensors`` checkpoint (atomic). Default output:
``RUN_DIR/exports/ema-<variant>-step<step>.safetensors``. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


class ExportError(ValueError):
    """A user-facing export error (message printed, exit code 2)."""


def _run_id(run_dir: Path) -> str:
    try:
        return str(json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["run_id"])
    except Exception:  # noqa: BLE001 - run.json is optional for an export
        return ""


def export_variant(run_dir: str | Path, variant: str, out: str | Path | None = None,
                   dtype: str | None = None) -> Path:
    """Export ``variant`` of the run in ``run_dir``; returns the written path.

    Raises :class:`ExportError` (a ``ValueError``) for a missing run directory, a missing
    snapshot, an unknown variant (listing the available ones) or a bad dtype.
    """
    import torch

    from agent import __version__
    from agent.bank import EMABank, parse_variant

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"run directory {str(run_dir)!r} does not exist")
    snapshot = run_dir / "banks" / "latest.safetensors"
    if not snapshot.is_file():
        raise ExportError(f"{str(run_dir)!r} has no bank snapshot ({snapshot.relative_to(run_dir)}); "
                          "the run has not reached snapshot_every steps or close() yet")
    if dtype not in (None, "float32"):
        raise ExportError(f"--dtype must be float32 (or left out for the model's dtypes), got {dtype!r}")
    try:
        bank = EMABank.load_snapshot(snapshot)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"cannot read bank snapshot {str(snapshot)!r}: {exc}") from exc
    try:
        name = parse_variant(variant)
    except ValueError as exc:
        raise ExportError(f"bad variant {variant!r}: {exc}; available: {', '.join(bank.variants)}") from exc
    if name not in bank.variants:
        raise ExportError(f"unknown variant {variant!r}; available: {', '.join(bank.variants)}")
    step = int(bank.step)
    path = Path(out) if out is not None else run_dir / "exports" / f"ema-{name}-step{step}.safetensors"
    meta = {"variant": name, "decay": name if name not in ("raw", "bema") else "", "step": str(step),
            "run_id": _run_id(run_dir), "emascope_version": __version__}
    return Path(bank.export(name, path, dtype=torch.float32 if dtype else None, metadata=meta))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry (dispatched from ``emascope export``). Prints the path and size; returns exit code."""
    parser = argparse.ArgumentParser(prog="emascope export",
                                     description="Export one variant (EMA decay) of a run as .safetensors.")
    parser.add_argument("run_dir", help="run directory (holds banks/latest.safetensors)")
    parser.add_argument("--variant", required=True, help='decay such as 0.999, or "raw" / "bema"')
    parser.add_argument("--out", default=None, help="output path (default: RUN_DIR/exports/...)")
    parser.add_argument("--dtype", default=None, choices=["float32"], help="cast floating tensors")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        path = export_variant(args.run_dir, args.variant, args.out, args.dtype)
    except ExportError as exc:
        print(f"emascope export: error: {exc}", file=sys.stderr)
        return 2
    print(f"{path}  ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
