"""The run directory format (docs/run-format.md), in one place: shared by the writer and the reader.

Every file name, path pattern, the format version, variant naming and parsing, the record keys of
``metrics.jsonl`` / ``events.jsonl`` / ``heartbeat``, the export-request schema and the export
metadata live here (the pattern of TensorBoard's per-plugin ``metadata.py``). The agent's writers
(:mod:`emascope.rundir`, :mod:`emascope.requests`, :mod:`emascope.snapshot`, :mod:`emascope.scope`)
and the dashboard's readers (:mod:`emascope.dashboard.data`, ``exporting``, ``watch``) import it;
nothing else spells a run-directory path. No torch, no numpy: the standard library only.

Conventions: ``step`` is an optimizer step (int); ``decay`` is the EMA decay ``d`` in
``ema <- d * ema + (1 - d) * theta`` (0.9999, never ``1 - d``); a *variant* is ``"raw"``,
``repr(float(d))`` or ``"bema"``; times are Unix seconds.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "emascope-run"
#: The version this emascope writes; readers refuse a larger one (see :func:`check_format_version`).
FORMAT_VERSION = 1

# ---------------------------------------------------------------------------------------------
# files and folders, relative to RUN_DIR

RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"
HEARTBEAT = "heartbeat"
SAMPLES = "samples"
BANKS = "banks"
REFERENCE = "reference"
REQUESTS = "requests"
EXPORTS = "exports"
#: Claims and done markers of scoring stages (see :func:`stage_claim_file`, :func:`stage_done_file`).
SCORING = "scoring"
#: Lock file external scorers hold while they merge metric directions into run.json.
SCORING_LOCK = f"{SCORING}/run_json.lock"
#: The latest bank snapshot (safetensors, atomic replace).
SNAPSHOT = f"{BANKS}/latest.safetensors"
#: The latest snapshot of a *sharded* bank: a JSON index (atomic replace) naming one safetensors
#: file per rank (:func:`snapshot_shard_file`), written instead of :data:`SNAPSHOT`.
SNAPSHOT_INDEX = f"{BANKS}/latest.index.json"
#: The files that may hold a run's latest bank snapshot (one of them; the newer one wins).
LATEST_SNAPSHOTS = (SNAPSHOT, SNAPSHOT_INDEX)
#: ``format`` and ``version`` of a sharded snapshot's index.
SHARD_INDEX_FORMAT = "emascope-bank-shards"
SHARD_INDEX_VERSION = 1
#: The first reference points of a low-dimensional run (float32 ``[n, d]`` .npy).
REFERENCE_POINTS = f"{SAMPLES}/reference.npy"
#: The model's transformers / diffusers config, recorded at attach when the model has one (JSON
#: object, see :func:`model_config_body`); ``emascope export --format`` writes it as ``config.json``.
MODEL_CONFIG = "model_config.json"

#: A folder holding any of these holds a run (``attach`` refuses it without resume/overwrite).
RUN_MARKERS = (RUN_JSON, METRICS, EVENTS)
#: Top-level files of a run (removed by ``overwrite=True``).
RUN_FILES = (RUN_JSON, METRICS, EVENTS, HEARTBEAT, MODEL_CONFIG)
#: Folders removed by ``overwrite=True`` (the reference cache and exports are kept).
RUN_DIRS = (SAMPLES, BANKS, REQUESTS, SCORING)
#: Every folder of a run (created by ``attach``; a run's own folders are never searched for runs).
SUBDIRS = (SAMPLES, BANKS, REFERENCE, REQUESTS, EXPORTS, SCORING)
#: Append-only JSON Lines files.
APPENDED = (METRICS, EVENTS)
#: Files the dashboard watches for live refresh, and folders whose files it watches.
WATCHED_FILES = (RUN_JSON, METRICS, EVENTS, HEARTBEAT)
WATCHED_DIRS = (SAMPLES, EXPORTS)
#: Preview file extensions: PNG image grids and float32 ``[n, d]`` point arrays.
PREVIEW_EXTS = (".png", ".npy")

#: Temp files of atomic writes (:mod:`emascope.atomic`): ``.<target name>.<random>.tmp`` beside the
#: target. A writer killed mid-write leaves one behind; ``attach`` removes them (start and resume).
TEMP_SUFFIX = ".tmp"
_TEMP_RE = re.compile(r"\..+\.[A-Za-z0-9_]{8,}\.tmp")


def temp_file_name(target_name: str, token: str) -> str:
    """The temp-file name of an atomic write of ``target_name``: ``.<target_name>.<token>.tmp``."""
    return f".{target_name}.{token}{TEMP_SUFFIX}"


def is_temp_file_name(name: str) -> bool:
    """Whether ``name`` is a temp-file name made by :func:`temp_file_name` (8+ token characters)."""
    return _TEMP_RE.fullmatch(name) is not None

_STAGE_RE = re.compile(r"step_(\d{9,})")


def stage_dir_name(step: int) -> str:
    """Folder name of a scoring stage under ``samples/``: ``step_<step:09d>``."""
    return f"step_{int(step):09d}"


def parse_stage_dir_name(name: str) -> int | None:
    """The step of a ``step_<digits>`` folder name, ``None`` for any other name."""
    m = _STAGE_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def stage_dir(step: int) -> str:
    """``samples/step_<step:09d>`` (relative to RUN_DIR)."""
    return f"{SAMPLES}/{stage_dir_name(step)}"


def preview_file(step: int, variant: str, ext: str) -> str:
    """``samples/step_<step:09d>/<variant><ext>`` with ``ext`` in :data:`PREVIEW_EXTS`."""
    if ext not in PREVIEW_EXTS:
        raise ValueError(f"preview extension must be one of {PREVIEW_EXTS}, got {ext!r}")
    return f"{stage_dir(step)}/{variant}{ext}"


def stage_snapshot_file(step: int) -> str:
    """``banks/step_<step:09d>.safetensors``: the bank as it was at a scoring stage (same format as
    :data:`SNAPSHOT`), kept for out-of-process scoring and post-hoc synthesis of other decays."""
    return f"{BANKS}/{stage_dir_name(step)}.safetensors"


def shard_file_name(stem: str, rank: int, world_size: int) -> str:
    """``<stem>.rank<rank:05d>-of-<world_size:05d>.safetensors``: one rank's file of a sharded snapshot."""
    if not 0 <= int(rank) < int(world_size):
        raise ValueError(f"rank {rank!r} is not in [0, {world_size!r})")
    return f"{stem}.rank{int(rank):05d}-of-{int(world_size):05d}.safetensors"


_SHARD_RE = re.compile(r"(.+)\.rank(\d{5,})-of-(\d{5,})\.safetensors")


def parse_shard_file_name(name: str) -> tuple[str, int, int] | None:
    """``(stem, rank, world_size)`` of a :func:`shard_file_name`, else ``None``."""
    m = _SHARD_RE.fullmatch(name)
    if not m or int(m.group(2)) >= int(m.group(3)):
        return None
    return m.group(1), int(m.group(2)), int(m.group(3))


def snapshot_shard_file(step: int, rank: int, world_size: int) -> str:
    """``banks/latest.step_<step:09d>.rank<r:05d>-of-<W:05d>.safetensors``: rank ``r``'s file of the
    latest sharded snapshot (named by step, so the previous set stays whole until the new index
    replaces :data:`SNAPSHOT_INDEX`)."""
    return shard_file_name(f"{BANKS}/latest.{stage_dir_name(step)}", rank, world_size)


def stage_snapshot_index(step: int) -> str:
    """``banks/step_<step:09d>.index.json``: a sharded bank's snapshot at a scoring stage (the
    sharded form of :func:`stage_snapshot_file`)."""
    return f"{BANKS}/{stage_dir_name(step)}.index.json"


def stage_snapshot_shard_file(step: int, rank: int, world_size: int) -> str:
    """``banks/step_<step:09d>.rank<r:05d>-of-<W:05d>.safetensors``: rank ``r``'s file of
    :func:`stage_snapshot_index`."""
    return shard_file_name(f"{BANKS}/{stage_dir_name(step)}", rank, world_size)


def parse_stage_snapshot_name(name: str) -> int | None:
    """The step of a ``step_<digits>.safetensors`` file name under ``banks/``, else ``None``."""
    stem, dot, ext = name.partition(".")
    return parse_stage_dir_name(stem) if dot and ext == "safetensors" else None


_LEAD_RE = re.compile(r"lead_(\d{9,})")


def lead_in_snapshot_file(step: int) -> str:
    """``banks/lead_<step:09d>.safetensors``: a *lead-in* snapshot, taken a few steps before a
    scheduled scoring stage (same format as :data:`SNAPSHOT`, but only the short decays' rows; see
    docs/synthesis.md). Post-hoc synthesis uses it to build averages shorter than the stage spacing."""
    return f"{BANKS}/lead_{int(step):09d}.safetensors"


def parse_lead_in_snapshot_name(name: str) -> int | None:
    """The step of a ``lead_<digits>.safetensors`` file name under ``banks/``, else ``None``."""
    stem, dot, ext = name.partition(".")
    m = _LEAD_RE.fullmatch(stem)
    return int(m.group(1)) if m and dot and ext == "safetensors" else None


#: Leave-one-out calibration of post-hoc synthesis, per target step (JSON, atomic replace; a cache:
#: deleting it only costs recomputation). See docs/synthesis.md.
SYNTHESIS_CACHE = f"{BANKS}/synthesis.json"
#: Metadata key of a stage/lead-in snapshot naming its role: ``"stage"`` or ``"lead_in"``, and the
#: key naming the stage a lead-in belongs to (both strings, beside ``run_id`` and ``step``).
SNAPSHOT_ROLE_KEY = "role"
SNAPSHOT_STAGE_KEY = "stage"
ROLE_STAGE = "stage"
ROLE_LEAD_IN = "lead_in"
#: Storage dtypes of stage and lead-in snapshot bank rows (``banks/latest.safetensors`` is always float32).
SNAPSHOT_DTYPES = ("float32", "bfloat16", "float16")


def parse_stage_snapshot_file_step(rel: str) -> int | None:
    """The step of a ``banks/step_<digits>.safetensors`` path relative to RUN_DIR, else ``None``."""
    folder, _, name = rel.rpartition("/")
    return parse_stage_snapshot_name(name) if folder == BANKS else None


# ---------------------------------------------------------------------------------------------
# scoring stages: who scores them, claims and done markers (scoring/)

#: ``attach(scoring=...)``: where sweeps run. ``"background"``: a worker thread of the training
#: process, on a frozen copy of the bank; ``"inline"``: in the optimizer step hook (training
#: waits); ``"external"``: another process (``emascope score RUN --watch --entry mod:build``) scores
#: the stage snapshots the training process writes.
SCORING_MODES = ("background", "inline", "external")
#: ``attach(score_busy=...)``: a scoring point that arrives while a background sweep runs is
#: ``"queue"``-d (at most one waits; a newer one replaces it, the replaced one is skipped),
#: ``"skip"``-ped, or ``"wait"``-s (training blocks while another stage is already waiting).
BUSY_POLICIES = ("queue", "skip", "wait")
#: ``attach(score_copy=...)``: where a background sweep's frozen copy of the bank lives.
COPY_PLACEMENTS = ("auto", "device", "pinned", "disk")
#: ``scorer`` of in-process sweeps.
SCORER_INLINE = "inline"
SCORER_BACKGROUND = "background"
SCORER_EXTERNAL = "external"
#: Stage states shown by the dashboard (:func:`stage_states`).
STAGE_STATES = ("pending", "scoring", "done", "skipped", "failed")
_CLAIM_RE = re.compile(r"(step_\d{9,})\.claim\.(\d{1,6})")


def scorer_name(kind: str, host: str | None = None, pid: int | None = None, name: str | None = None) -> str:
    """The ``scorer`` field of sweep events: ``"inline"``, ``"background"``, or for an external
    scorer ``"external:<name or host:pid>"``."""
    if kind != SCORER_EXTERNAL:
        return kind
    return f"{SCORER_EXTERNAL}:{name}" if name else f"{SCORER_EXTERNAL}:{host}:{pid}"


def stage_claim_file(step: int, generation: int) -> str:
    """``scoring/step_<step:09d>.claim.<generation>``: an external scorer's claim on a stage.

    Created with ``O_CREAT | O_EXCL`` (one creator wins); generation ``g + 1`` takes over a stale
    generation ``g``. Its mtime is the claim's heartbeat. Body: :func:`claim_record`.
    """
    return f"{SCORING}/{stage_dir_name(step)}.claim.{int(generation)}"


def parse_stage_claim_name(name: str) -> tuple[int, int] | None:
    """``(step, generation)`` of a claim file name under ``scoring/``, else ``None``."""
    m = _CLAIM_RE.fullmatch(name)
    if not m:
        return None
    step = parse_stage_dir_name(m.group(1))
    return None if step is None else (step, int(m.group(2)))


def stage_done_file(step: int) -> str:
    """``scoring/step_<step:09d>.done.json``: the stage's metrics are in metrics.jsonl (written by
    every sweep, in any mode, after its records; body: :func:`done_record`). A stage snapshot an
    external scorer must score is kept until this file exists."""
    return f"{SCORING}/{stage_dir_name(step)}.done.json"


def parse_stage_done_name(name: str) -> int | None:
    """The step of a ``step_<digits>.done.json`` file name under ``scoring/``, else ``None``."""
    stem, dot, ext = name.partition(".")
    return parse_stage_dir_name(stem) if dot and ext == "done.json" else None


def claim_record(*, scorer: str, host: str, pid: int, time: float) -> dict[str, Any]:
    """Body of a claim file."""
    return {"scorer": scorer, "host": host, "pid": int(pid), "time": time}


def done_record(*, step: int, scorer: str, seconds: float, records: int, time: float) -> dict[str, Any]:
    """Body of a done marker: who scored the stage, how long it took, how many metric records."""
    return {"step": int(step), "scorer": scorer, "seconds": float(seconds), "records": int(records), "time": time}


def stage_states(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Each stage's state from events.jsonl records, by step (the latest attempt wins).

    ``state`` is one of :data:`STAGE_STATES`: ``pending`` (``stage_pending``: frozen or snapshotted,
    waiting for a scorer), ``scoring`` (``score_start`` without ``score_done`` yet; ``done``/``total``
    variants from ``score_progress``), ``done`` (``score_done``), ``skipped`` (``score_skipped``),
    ``failed`` (``score_timeout``: the sweep hung or close() stopped waiting; ``score_failed``: it
    could not run). Also: ``scorer``,
    ``mode``, ``seconds`` (of a done sweep), ``done``/``total``, ``attempts`` (``score_start`` seen),
    ``reason`` (of a skip or failure), ``time`` (of the last event). Unknown or malformed records are
    ignored; runs written before these events existed show ``scoring``/``done`` only.
    """
    out: dict[int, dict[str, Any]] = {}
    for e in events:
        if not isinstance(e, dict):
            continue
        step, kind = e.get("step"), e.get("type")
        if isinstance(step, bool) or not isinstance(step, int) or kind not in _STAGE_EVENTS:
            continue
        if e.get("synthesized"):  # a sweep of decays synthesised post hoc (search), not of the stage
            continue
        st = out.setdefault(step, {"step": step, "state": "pending", "scorer": None, "mode": None,
                                   "seconds": None, "done": 0, "total": None, "attempts": 0, "reason": None,
                                   "time": None})
        st["time"] = finite_number(e.get("time"))
        scorer = e.get("scorer") if isinstance(e.get("scorer"), str) else None
        if kind == "stage_pending":
            st.update(state="pending", mode=e.get("mode") if isinstance(e.get("mode"), str) else None)
        elif kind == "score_start":
            variants = e.get("variants")
            st.update(state="scoring", scorer=scorer, done=0, reason=None, seconds=None,
                      total=len(variants) if isinstance(variants, list) else None, attempts=st["attempts"] + 1)
        elif kind == "score_progress" and st["state"] == "scoring" and scorer == st["scorer"]:
            done, total = e.get("done"), e.get("total")
            if isinstance(done, int) and not isinstance(done, bool):
                st["done"] = done
            if isinstance(total, int) and not isinstance(total, bool):
                st["total"] = total
        elif kind == "score_done":
            st.update(state="done", scorer=scorer or st["scorer"], seconds=finite_number(e.get("seconds")), reason=None)
            if st["total"] is not None:
                st["done"] = st["total"]
        elif kind == "score_skipped" and st["state"] != "done":
            st.update(state="skipped", reason=e.get("reason") if isinstance(e.get("reason"), str) else None)
        elif kind in ("score_timeout", "score_failed") and st["state"] != "done":
            st.update(state="failed", reason=e.get("reason") if isinstance(e.get("reason"), str) else kind)
    return out


_STAGE_EVENTS = ("stage_pending", "score_start", "score_progress", "score_done", "score_skipped", "score_timeout",
                 "score_failed")


def reference_cache_file(key: str) -> str:
    """``reference/<key>.npz``: cached reference features (``key`` from ``features.cache_key``)."""
    return f"{REFERENCE}/{key}.npz"


# ---------------------------------------------------------------------------------------------
# variants

RAW = "raw"
BEMA = "bema"
NAMED_VARIANTS = (RAW, BEMA)


def check_decay(decay: Any) -> float:
    """``float(decay)`` for a real number in [0, 1) (bools and NaN refused); else ``ValueError``."""
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise ValueError(f"decay {decay!r} is not a number")
    d = float(decay)
    if not 0.0 <= d < 1.0:  # also refuses NaN
        raise ValueError(f"decay {decay!r} is outside [0, 1)")
    return d


def variant_name(decay: float) -> str:
    """The variant string of a decay: ``repr(float(decay))``, e.g. ``0.9999 -> "0.9999"``."""
    return repr(check_decay(decay))


def parse_variant(v: str | float) -> str:
    """Normalise a variant: ``"raw"``, ``"bema"``, or a decay given as float or string.

    ``"0.99990"``, ``0.9999`` and ``" 0.9999 "`` all give ``"0.9999"``; ``"RAW"`` gives ``"raw"``.
    Anything else is a ``ValueError``. Whether a bank or run holds the variant is checked there.
    """
    if isinstance(v, str):
        s = v.strip().lower()
        if s in NAMED_VARIANTS:
            return s
        try:
            f = float(s)
        except ValueError:
            raise ValueError(f"variant {v!r} is not 'raw', 'bema' or a decay in [0, 1)") from None
        if not math.isfinite(f) or not 0.0 <= f < 1.0:
            raise ValueError(f"variant {v!r} is not 'raw', 'bema' or a decay in [0, 1)")
        return repr(f)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"variant {v!r} is not 'raw', 'bema' or a decay in [0, 1)")
    try:
        return variant_name(v)
    except ValueError:
        raise ValueError(f"variant {v!r} is not 'raw', 'bema' or a decay in [0, 1)") from None


def decay_of(variant: Any) -> float | None:
    """The decay of a fixed-decay variant string (``"0.9999"`` -> 0.9999); ``None`` for ``raw``,
    ``bema`` and anything that is not a decay in [0, 1) (``"foo"``, ``"1.0"``, ``"nan"``)."""
    if not isinstance(variant, str) or variant in NAMED_VARIANTS:
        return None
    try:
        d = float(variant)
    except ValueError:
        return None
    return d if 0.0 <= d < 1.0 else None


# ---------------------------------------------------------------------------------------------
# records (one JSON object per line of metrics.jsonl / events.jsonl; heartbeat; run.json)

#: Keys of a metrics.jsonl record, in order.
METRIC_KEYS = ("step", "variant", "decay", "metric", "value", "time")
#: Keys every events.jsonl record has (plus the fields of its type).
EVENT_KEYS = ("time", "step", "type")
#: Heartbeat states.
STATE_RUNNING = "running"
STATE_CLOSED = "closed"
#: A run is live while its heartbeat is younger than this many heartbeat intervals.
LIVE_INTERVALS = 3.0
DEFAULT_HEARTBEAT_INTERVAL = 2.0
#: Metric directions.
DIRECTIONS = ("lower", "higher")
#: Sample kinds (run.json ``sample_kind``).
SAMPLE_KINDS = ("images", "points")
#: run.json ``settings.sample_seeding``: how each variant's samples are seeded. ``"batch_sha256"``:
#: batch ``b`` from a fresh generator seeded with ``emascope.scoring.batch_seed(seed, b)``. Runs
#: written before the key existed (no key) drew all batches from one generator seeded with ``seed``.
SAMPLE_SEEDING = "batch_sha256"


#: Optional keys of a metrics.jsonl record (format 1, added with the uncertainty intervals): the
#: standard error ``se``, the interval ``lo``/``hi`` at the run's confidence level, and ``n``, the
#: number of generated samples the value was computed on. Absent when unknown (and in older runs).
METRIC_INTERVAL_KEYS = ("se", "lo", "hi", "n")
#: events.jsonl types written with the uncertainty intervals (format 1, additive).
EVENT_COMPARISON = "comparison"
EVENT_NOISE_FLOOR = "noise_floor"
#: ``noise_floor`` sources: exact samples of the data distribution given to ``attach``, or a disjoint
#: split of the reference (part of it scored against the rest).
FLOOR_SOURCES = ("exact", "reference_split")


def metric_record(step: int, variant: str, metric: str, value: float | None, time: float, *,
                  se: float | None = None, lo: float | None = None, hi: float | None = None,
                  n: int | None = None, synthesized: dict[str, Any] | None = None) -> dict[str, Any]:
    """One metrics.jsonl record; ``decay`` is derived from the variant (``None`` for raw/bema).
    The optional :data:`METRIC_INTERVAL_KEYS` are written only when given.

    ``synthesized``: for a decay the bank does not hold, scored from weights synthesised post hoc
    (docs/synthesis.md), the record gets ``"synthesized": {...}`` (:func:`synthesis_record`); plain
    records have no such key (readers written before it treat these as ordinary decays)."""
    rec = {"step": int(step), "variant": variant, "decay": decay_of(variant), "metric": metric,
           "value": value, "time": time}
    for key, v in (("se", se), ("lo", lo), ("hi", hi)):
        if v is not None:
            rec[key] = float(v)
    if n is not None:
        rec["n"] = int(n)
    if synthesized is not None:
        rec[SYNTHESIZED] = synthesized
    return rec


#: Key of a metrics.jsonl record scored on synthesised weights (absent on every other record).
SYNTHESIZED = "synthesized"


def synthesis_record(*, profile_residual: float, predicted_error: float | None,
                     error_bound: float | None) -> dict[str, Any]:
    """The ``synthesized`` object of a metrics record: the synthesis's measured error (relative,
    see docs/synthesis.md): ``profile_residual`` (relative L2 between the target and synthesised
    averaging profiles) and the leave-one-out calibrated weight-space ``predicted_error`` and
    ``error_bound`` (relative to the weights' norm; ``None`` when not calibrated)."""
    return {"profile_residual": profile_residual, "predicted_error": predicted_error,
            "error_bound": error_bound}


def comparison_entry(*, diff: float, se: float | None, lo: float | None, hi: float | None, n: int | None,
                     worse: bool | None, paired: bool) -> dict[str, Any]:
    """One variant of a ``comparison`` event: ``diff`` = its value minus the best's (metric units),
    the standard error and interval of that difference, the samples per variant it rests on, and
    whether the variant is significantly worse than the best (``null``: unknown)."""
    return {"diff": diff, "se": se, "lo": lo, "hi": hi, "n": n, "worse": worse, "paired": bool(paired)}


def event_record(type: str, step: int, time: float, **fields: Any) -> dict[str, Any]:
    """One events.jsonl record ``{"time", "step", "type", **fields}``."""
    return {"time": time, "step": int(step), "type": type, **fields}


def heartbeat_record(*, step: int, pid: int, state: str, interval: float, time: float) -> dict[str, Any]:
    """The heartbeat file's body."""
    return {"time": time, "step": int(step), "pid": int(pid), "state": state, "interval": float(interval)}


def run_json_header() -> dict[str, Any]:
    """The first keys of run.json: ``format`` and ``format_version``."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION}


class FormatVersionError(ValueError):
    """The run was written by a newer emascope than this reader understands."""


def check_format_version(info: dict[str, Any]) -> None:
    """Raise :class:`FormatVersionError` if ``info['format_version']`` is newer than
    :data:`FORMAT_VERSION`; a missing or non-integer version is a ``ValueError`` naming it."""
    version = info.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"run.json has an invalid format_version {version!r} (expected an integer)")
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"this run uses run-directory format_version {version}, but this emascope only knows "
            f"format_version {FORMAT_VERSION}: upgrade emascope to view it")


def check_readable_run_dir(run_dir: str | os.PathLike) -> Path:
    """``run_dir`` as a ``Path`` if it is a folder whose run.json (when present and readable) is of a
    format this emascope knows; ``ValueError`` naming the problem: a missing path, a file, a newer
    ``format_version`` (:class:`FormatVersionError`). An unreadable or malformed run.json is left to
    the caller (an export reads only the bank snapshot)."""
    path = Path(run_dir)
    if not path.exists():
        raise ValueError(f"run directory {str(run_dir)!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"run directory {str(run_dir)!r} is not a directory")
    if not (path / RUN_JSON).is_file():  # a FIFO would block the read
        return path
    try:
        with open(path / RUN_JSON, "rb") as f:
            info = json.loads(f.read(MAX_RUN_JSON_BYTES))
    except (OSError, ValueError, RecursionError):
        return path
    version = info.get("format_version") if isinstance(info, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        check_format_version(info)
    return path


def run_state(heartbeat: dict[str, Any] | None, now: float) -> str:
    """``"live"``, ``"finished"``, ``"stale"`` or ``"unknown"`` from a heartbeat record.

    Live: state ``running`` and ``time`` less than ``LIVE_INTERVALS * interval`` seconds old.
    """
    if not heartbeat:
        return "unknown"
    state = heartbeat.get("state")
    if state == STATE_CLOSED:
        return "finished"
    t = finite_number(heartbeat.get("time"))
    interval = finite_number(heartbeat.get("interval")) or DEFAULT_HEARTBEAT_INTERVAL
    if state == STATE_RUNNING and t is not None and now - t < LIVE_INTERVALS * interval:
        return "live"
    return "stale"


def finite_number(x: Any) -> float | None:
    """``x`` as a float when it is a finite JSON number (not a bool, not too large for a float), else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    try:
        v = float(x)
    except OverflowError:
        return None
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------------------------------------
# export requests (requests/<id>.json, exports/<id>.status.json) and exported checkpoints

ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
EXPORT_SUFFIX = ".safetensors"
#: dtypes an export may be cast to (``None``: each tensor keeps the model's dtype).
EXPORT_DTYPES = (None, "float32")
#: Metadata key of a bank snapshot holding its JSON state (safetensors metadata).
SNAPSHOT_META_KEY = "emascope"
#: Metadata key of a bank snapshot holding ``"sha256:<hex>"`` over its metadata and tensors
#: (:func:`emascope.snapshot.snapshot_checksum`); absent in snapshots written before it existed.
SNAPSHOT_CHECKSUM_KEY = "emascope_sha256"
#: Most decays a bank (and a snapshot read back) may hold.
MAX_DECAYS = 4096
#: Metadata keys of a bank snapshot whose frozen parameters (entries of kind ``"frozen"``) are not
#: stored in it but in a side file of the same ``banks/`` folder (:func:`frozen_file_name`): the
#: side file's name and its checksum (``"sha256:<hex>"``). Absent: every live value is inline (the
#: only form before snapshot format 2, and still that of sharded rank files and of
#: ``emascope.save_snapshot`` called without a side-file store).
SNAPSHOT_FROZEN_FILE_KEY = "emascope_frozen_file"
SNAPSHOT_FROZEN_SHA_KEY = "emascope_frozen_sha256"
#: Metadata key of a frozen side file naming its format (value :data:`FROZEN_FORMAT`); it also
#: carries :data:`SNAPSHOT_CHECKSUM_KEY` over its own metadata and tensors, like a snapshot.
FROZEN_FORMAT_KEY = "emascope_frozen"
FROZEN_FORMAT = "emascope-frozen/1"
_FROZEN_RE = re.compile(r"frozen-([0-9a-f]{16})\.safetensors")
_SHA_RE = re.compile(r"sha256:([0-9a-f]{64})")


class FrozenFileError(ValueError):
    """A snapshot's frozen side file is missing, corrupt, does not match the snapshot's reference,
    or its name in the snapshot is not one this format writes (message names the file)."""


def frozen_file_missing(snapshot: str | os.PathLike, side: str | os.PathLike) -> FrozenFileError:
    """The error for a snapshot whose referenced side file is not there (one wording for every reader)."""
    return FrozenFileError(f"{str(snapshot)!r}: its frozen side file {str(side)!r} is missing (it holds the "
                           "frozen parameters of the snapshot)")


def frozen_file_name(checksum: str) -> str:
    """``frozen-<first 16 hex of the sha256>.safetensors``: the content-addressed name (inside
    ``banks/``) of a frozen side file whose checksum is ``checksum`` (``"sha256:<hex>"``)."""
    m = _SHA_RE.fullmatch(checksum)
    if m is None:
        raise ValueError(f"not a sha256 checksum: {checksum!r}")
    return f"frozen-{m.group(1)[:16]}.safetensors"


def is_frozen_file_name(name: str) -> bool:
    """Whether ``name`` (a bare file name) is a frozen side file's name."""
    return _FROZEN_RE.fullmatch(name) is not None


def frozen_reference(meta: dict[str, str], snapshot: str = "the snapshot") -> tuple[str, str] | None:
    """``(file name, checksum)`` of the frozen side file a snapshot's metadata references, ``None``
    when it has none (every value inline). The name comes from a file: :class:`FrozenFileError`
    unless it is exactly ``frozen-<16 hex>.safetensors`` (no folder part, so never outside the
    snapshot's own ``banks/`` folder) agreeing with the checksum."""
    name, sha = meta.get(SNAPSHOT_FROZEN_FILE_KEY), meta.get(SNAPSHOT_FROZEN_SHA_KEY)
    if name is None and sha is None:
        return None
    if not isinstance(name, str) or not isinstance(sha, str) or not is_frozen_file_name(name) \
            or _SHA_RE.fullmatch(sha) is None or frozen_file_name(sha) != name:
        raise FrozenFileError(f"{snapshot}: bad frozen side-file reference {str(name)[:200]!r} / {str(sha)[:80]!r} "
                              "(expected frozen-<16 hex>.safetensors in its own folder and its sha256)")
    return name, sha


def validate_request_id(rid: Any) -> str:
    """A request id matching ``[A-Za-z0-9_-]{1,64}``; else ``ValueError``."""
    if not isinstance(rid, str) or not ID_RE.fullmatch(rid):
        raise ValueError(f"invalid request id {rid!r} (must match [A-Za-z0-9_-]{{1,64}})")
    return rid


def validate_export_name(name: Any) -> str:
    """The file stem of an export named by a user: ``name`` without a trailing ``.safetensors``.

    It must match ``[A-Za-z0-9._-]{1,128}`` and must not start with a dot (no hidden files, no
    ``.``/``..``/``...``). The one check used by the dashboard and the agent alike.
    """
    if not isinstance(name, str):
        raise ValueError(f"export name must be a string, got {name!r}")
    stem = name[: -len(EXPORT_SUFFIX)] if name.endswith(EXPORT_SUFFIX) else name
    if not NAME_RE.fullmatch(stem) or stem.startswith("."):
        raise ValueError(f"invalid export name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
                         "not starting with '.' (files are always written inside the run's exports/)")
    return stem


def validate_export_dtype(dtype: Any) -> str | None:
    """``None`` or ``"float32"``; else ``ValueError``."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"bad dtype {dtype!r} (allowed: null/None for the model's dtypes, 'float32')")
    return dtype


def request_file(request_id: str) -> str:
    """``requests/<id>.json``."""
    return f"{REQUESTS}/{validate_request_id(request_id)}.json"


def status_file(request_id: str) -> str:
    """``exports/<id>.status.json``."""
    return f"{EXPORTS}/{validate_request_id(request_id)}.status.json"


def export_file(name: str) -> str:
    """``exports/<name>.safetensors`` for a validated export name."""
    return f"{EXPORTS}/{validate_export_name(name)}{EXPORT_SUFFIX}"


def default_export_name(variant: str, step: int | None = None) -> str:
    """Default export stem: ``ema-<decay>`` / ``raw`` / ``bema``, with ``-step<step>`` when given."""
    base = variant if variant in NAMED_VARIANTS else f"ema-{variant}"
    return base if step is None else f"{base}-step{int(step)}"


#: Export requests: at most this many are fulfilled per check of ``requests/`` (about once a
#: second) and per minute; more wait for later checks (a ``notice`` event says so). Beyond
#: :data:`MAX_PENDING_REQUESTS` waiting requests the newest are refused (``error`` status).
REQUESTS_PER_POLL = 4
REQUESTS_PER_MINUTE = 30
MAX_PENDING_REQUESTS = 64
#: A request file larger than this is refused unread (a request is ~100 bytes).
MAX_REQUEST_BYTES = 64 * 1024
#: Temp files younger than this in folders other processes write to (:data:`SHARED_DIRS`) are
#: left alone by the stale-temp cleanup; elsewhere the agent is the only writer and removes all.
STALE_TEMP_AGE_S = 3600.0
#: Folders of a run that other processes write to as well: the dashboard (request files), a
#: finished-run export (``emascope export`` into ``exports/``) and external scorers (``emascope
#: score``: done markers and claims in ``scoring/``).
SHARED_DIRS = (REQUESTS, EXPORTS, SCORING)


def run_subdir(run_dir: str | os.PathLike, name: str) -> Path:
    """``RUN_DIR/name`` if it is a real folder of the run: not a symlink, resolving inside RUN_DIR.

    ``ValueError`` naming the problem otherwise (a symlinked ``requests/`` or ``exports/`` is
    refused: the agent would read, write or delete files elsewhere); ``FileNotFoundError`` if missing.
    """
    path = Path(run_dir) / name
    if path.is_symlink():
        try:
            where = os.readlink(path)
        except OSError:
            where = "?"
        raise ValueError(f"{name}/ of the run {str(run_dir)!r} is a symlink (to {where!r}); refused: "
                         f"emascope only uses a real {name}/ folder inside the run directory")
    if not path.exists():
        raise FileNotFoundError(f"the run {str(run_dir)!r} has no {name}/ folder")
    if not path.is_dir():
        raise ValueError(f"{name} of the run {str(run_dir)!r} is not a folder")
    inside_run(run_dir, name)
    return path


def inside_run(run_dir: str | os.PathLike, rel: str) -> Path:
    """``RUN_DIR/rel`` resolved (symlinks followed), guaranteed to lie inside the resolved RUN_DIR.

    ``ValueError`` if it resolves elsewhere (a symlinked folder pointing out, ``..``).
    """
    base = Path(run_dir).resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise ValueError(f"{rel!r} resolves outside the run directory {str(base)!r}")
    return target


@dataclass(frozen=True)
class ExportRequest:
    """A validated request: export ``variant`` to ``exports/<name>.safetensors`` as ``dtype``.

    A *synthesised* export (docs/synthesis.md) names ``decay`` (any decay in (0, 1), also one the
    bank does not hold) or ``sigma_rel`` (EDM2's power-function EMA); its ``variant`` is then
    :func:`synthesized_name`. ``force``: write it even when its measured error is large.
    ``overwrite``: replace an existing ``exports/<name>.safetensors`` (default False: the agent
    refuses the request when the file exists, and the file is left as it was); the same rule holds
    for synthesised exports.
    """

    id: str
    variant: str
    name: str
    dtype: str | None
    overwrite: bool = False
    decay: float | None = None
    sigma_rel: float | None = None
    force: bool = False

    @property
    def synthesized(self) -> bool:
        return self.decay is not None or self.sigma_rel is not None


def request_body(request: ExportRequest, time: float) -> dict[str, Any]:
    """The JSON body of ``requests/<id>.json`` (``decay``/``sigma_rel``/``force`` only when synthesised)."""
    body: dict[str, Any] = {"id": request.id, "variant": request.variant, "name": request.name,
                            "dtype": request.dtype, "overwrite": request.overwrite, "time": time}
    if request.synthesized:
        body.update(decay=request.decay, sigma_rel=request.sigma_rel, force=request.force)
    return body


def check_synthesis_target(decay: Any = None, sigma_rel: Any = None) -> tuple[float | None, float | None]:
    """Exactly one of ``decay`` (a number in (0, 1)) and ``sigma_rel`` (a number in (0, 0.2887)):
    the target of a synthesised export; ``ValueError`` naming the problem."""
    if (decay is None) == (sigma_rel is None):
        raise ValueError("give exactly one of decay and sigma_rel")
    for name, v, hi in (("decay", decay, 1.0), ("sigma_rel", sigma_rel, math.sqrt(1.0 / 12.0))):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) \
                or not 0.0 < float(v) < hi:
            raise ValueError(f"{name} must be a number in (0, {hi:.4g}), got {v!r}")
    return (None if decay is None else float(decay)), (None if sigma_rel is None else float(sigma_rel))


def synthesized_name(decay: float | None = None, sigma_rel: float | None = None) -> str:
    """The variant string of a synthesised average: the decay's variant (``"0.9996"``) or
    ``"sigma_rel=<x>"`` for EDM2's power-function profile."""
    decay, sigma_rel = check_synthesis_target(decay, sigma_rel)
    return variant_name(decay) if decay is not None else f"sigma_rel={sigma_rel!r}"


def default_synthesized_export_name(decay: float | None = None, sigma_rel: float | None = None,
                                    step: int | None = None) -> str:
    """Default export stem of a synthesised average: ``ema-<decay>-synth`` or ``phema-<sigma_rel>``,
    with ``-step<step>`` when given."""
    decay, sigma_rel = check_synthesis_target(decay, sigma_rel)
    base = f"ema-{variant_name(decay)}-synth" if decay is not None else f"phema-{sigma_rel!r}"
    return base if step is None else f"{base}-step{int(step)}"


def parse_request(body: Any, *, stem: str) -> ExportRequest:
    """Validate a request object read from ``requests/<stem>.json``; ``ValueError`` naming the bad
    field. The ``id`` field must equal the file stem (or be absent); the variant is normalised
    (:func:`parse_variant`) but whether the bank holds it is checked by the agent; ``overwrite``
    must be a JSON boolean (absent: false)."""
    if not isinstance(body, dict):
        raise ValueError(f"request must be a JSON object, got {type(body).__name__}")
    rid = body.get("id", stem)
    if not isinstance(rid, str) or not ID_RE.fullmatch(rid) or rid != stem:
        raise ValueError(f"bad request id {rid!r} (must match [A-Za-z0-9_-]{{1,64}} and the file name {stem!r})")
    overwrite = body.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise ValueError(f"bad overwrite {overwrite!r} (true or false; absent means false)")
    if body.get("decay") is not None or body.get("sigma_rel") is not None:
        decay, sigma_rel = check_synthesis_target(body.get("decay"), body.get("sigma_rel"))
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise ValueError(f"bad force {force!r} (true or false)")
        name = body.get("name") or default_synthesized_export_name(decay, sigma_rel)
        return ExportRequest(rid, synthesized_name(decay, sigma_rel), validate_export_name(name),
                             validate_export_dtype(body.get("dtype")), overwrite=overwrite,
                             decay=decay, sigma_rel=sigma_rel, force=force)
    variant = body.get("variant")
    if not isinstance(variant, (str, int, float)) or isinstance(variant, bool):
        raise ValueError(f"bad variant {variant!r}")
    variant = parse_variant(str(variant))
    name = body.get("name") or default_export_name(variant)
    return ExportRequest(rid, variant, validate_export_name(name), validate_export_dtype(body.get("dtype")),
                         overwrite=overwrite)


def status_record(*, request_id: str | None, state: str, variant: str | None, step: int, path: str | None,
                  nbytes: int | None, time: float, error: str | None,
                  synthesis: dict[str, Any] | None = None) -> dict[str, Any]:
    """The body of ``exports/<id>.status.json`` (``state``: ``"done"`` or ``"error"``); a
    synthesised export adds ``synthesis``, its error report (docs/synthesis.md)."""
    rec = {"id": request_id, "state": state, "variant": variant, "step": int(step), "path": path,
           "bytes": nbytes, "time": time, "error": error}
    if synthesis is not None:
        rec["synthesis"] = synthesis
    return rec


def export_dir(name: str, fmt: str = "transformers") -> str:
    """``exports/<name>``: the folder of a ``from_pretrained`` export (``--format transformers|diffusers``);
    ``exports/<name>-adapter`` for ``--format peft``."""
    return f"{EXPORTS}/{validate_export_name(name + ('-adapter' if fmt == 'peft' else ''))}"


#: Export formats: a plain ``.safetensors`` state dict (default), or a folder that the library's
#: ``from_pretrained`` loads: ``config.json`` + the weights file under the library's own name, or
#: (``"peft"``) a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
EXPORT_FORMATS = ("safetensors", "transformers", "diffusers", "peft")
PRETRAINED_CONFIG = "config.json"
PRETRAINED_WEIGHTS = {"transformers": "model.safetensors", "diffusers": "diffusion_pytorch_model.safetensors"}
#: safetensors metadata the libraries' loaders expect in a PyTorch weights file.
PRETRAINED_METADATA = {"format": "pt"}


def model_config_body(*, library: str, cls: str, library_version: str, prefix: str,
                      config: dict[str, Any]) -> dict[str, Any]:
    """The body of :data:`MODEL_CONFIG`: the library (``"transformers"``/``"diffusers"``), the model
    class name, the library version at attach, ``prefix`` (the model's key prefix inside the
    attached module's state dict, ``""`` when the attached module is the model) and ``config``
    (the dict the library writes as ``config.json``)."""
    if library not in PRETRAINED_WEIGHTS:
        raise ValueError(f"library must be one of {tuple(PRETRAINED_WEIGHTS)}, got {library!r}")
    return {"library": library, "class": cls, "library_version": library_version, "prefix": prefix,
            "config": config}


#: Largest ``run.json`` the agent reads back when resuming (a real one is a few kB).
MAX_RUN_JSON_BYTES = 16 * 1024 * 1024
#: Largest ``model_config.json`` read (a real config is a few kB; a hostile one is refused unread).
MAX_MODEL_CONFIG_BYTES = 16 * 1024 * 1024
#: Largest replaced top-level run file (run.json, heartbeat.json, model_config.json) ``attach`` keeps a
#: copy of to undo a failed start; a larger one is no run file of emascope's and is refused unread.
MAX_RUN_FILE_BYTES = max(MAX_RUN_JSON_BYTES, MAX_MODEL_CONFIG_BYTES)


def parse_model_config(body: Any) -> dict[str, Any]:
    """Validate a :data:`MODEL_CONFIG` body read from disk; ``ValueError`` naming the bad field."""
    if not isinstance(body, dict):
        raise ValueError(f"{MODEL_CONFIG} must hold a JSON object, got {type(body).__name__}")
    if body.get("library") not in PRETRAINED_WEIGHTS:
        raise ValueError(f"{MODEL_CONFIG}: library must be one of {tuple(PRETRAINED_WEIGHTS)}, "
                         f"got {body.get('library')!r}")
    for key in ("class", "prefix"):
        if not isinstance(body.get(key), str):
            raise ValueError(f"{MODEL_CONFIG}: {key} must be a string, got {body.get(key)!r}")
    if not isinstance(body.get("config"), dict):
        raise ValueError(f"{MODEL_CONFIG}: config must be a JSON object")
    info = body.get("peft")
    if info is not None:
        if not isinstance(info, dict):
            raise ValueError(f"{MODEL_CONFIG}: peft must be a JSON object")
        if info.get("prefix") is not None:  # a PeftModel (None: adapters injected without one)
            for key in ("prefix", "class", "adapter_name"):
                if not isinstance(info.get(key), str):
                    raise ValueError(f"{MODEL_CONFIG}: peft.{key} must be a string, got {info.get(key)!r}")
            if not isinstance(info.get("config"), dict) or not isinstance(info["config"].get("peft_type"), str):
                raise ValueError(f"{MODEL_CONFIG}: peft.config must be a JSON object with a peft_type")
    return body


def export_metadata(variant: str, step: int, *, run_id: str = "", emascope_version: str = "") -> dict[str, str]:
    """Metadata (all strings) of an exported checkpoint: variant, decay (``""`` for raw/bema), step,
    run_id, emascope_version."""
    d = decay_of(variant)
    return {"variant": variant, "decay": "" if d is None else variant, "step": str(int(step)),
            "run_id": str(run_id), "emascope_version": str(emascope_version)}


def synthesized_export_metadata(*, decay: float | None, sigma_rel: float | None, step: int, run_id: str,
                                emascope_version: str, profile_residual: float,
                                predicted_error: float | None, error_bound: float | None) -> dict[str, str]:
    """Metadata (all strings) of a synthesised checkpoint: :func:`export_metadata`'s keys (``variant``
    is :func:`synthesized_name`, ``decay`` ``""`` for a sigma_rel target) plus ``synthesized``
    (``"true"``), ``sigma_rel`` (or ``""``), ``profile_residual``, ``predicted_error`` and
    ``error_bound`` (``repr`` of the floats, ``""`` when not calibrated)."""
    out = export_metadata(synthesized_name(decay, sigma_rel), step, run_id=run_id,
                          emascope_version=emascope_version)
    out.update(decay="" if decay is None else variant_name(decay), synthesized="true",
               sigma_rel="" if sigma_rel is None else repr(float(sigma_rel)),
               profile_residual=repr(float(profile_residual)),
               predicted_error="" if predicted_error is None else repr(float(predicted_error)),
               error_bound="" if error_bound is None else repr(float(error_bound)))
    return out
