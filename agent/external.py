"""Out-of-process scoring: score a run's stage snapshots in another process, on another machine.

With ``attach(scoring="external")`` the training process only updates the bank and writes, at every
scoring point, the stage snapshot ``banks/step_<step>.safetensors`` (and a ``stage_pending``
event). ``emascope score RUN --watch --entry my_module:build`` runs anywhere that sees the run
directory: ``build()`` returns what ``attach`` takes for scoring, and the scorer scores every stage
snapshot exactly once (claims: :mod:`emascope.claims`) with the run's own scoring settings
(run.json ``settings``), so the numbers are those an inline or background sweep would write.

``build()`` (no arguments) returns a dict with ``model`` (required: an ``nn.Module`` of the trained
architecture, on the device to score on) and any of ``sampler``, ``reference``, ``evaluate``,
``sample_metrics``, ``metric_directions`` (as for ``attach``), plus the settings that describe the
scoring machine rather than the numbers: ``feature_extractor`` (required when the run used a
callable extractor: run.json only holds its name), ``feature_extractor_weights_path``,
``feature_device``, ``feature_batch_size``.

The scorer writes what an in-process sweep writes (metrics, previews, ``score_*`` events naming it
as ``external:<host>:<pid>`` or ``external:<name>``), the stage's done marker, and merges the
metrics' directions and the sample kind into run.json (under ``scoring/run_json.lock``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib
import importlib.util
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from emascope import runformat as rf
from emascope.atomic import atomic_write_json
from emascope.claims import DEFAULT_STALE_AFTER, ClaimHeartbeat, done_steps, mark_done, try_claim
from emascope.config import Hooks, ScoringConfig
from emascope.rundir import RunWriter, StageWriter
from emascope.scoring import Scorer, SweepResult
from emascope.snapshot import load_snapshot

#: Keys ``build()`` may return: the model, the hooks of ``attach``, and machine-side settings.
HOOK_KEYS = ("sampler", "reference", "evaluate", "sample_metrics", "metric_directions")
MACHINE_KEYS = ("feature_extractor", "feature_extractor_weights_path", "feature_device", "feature_batch_size")
BUILD_KEYS = ("model", *HOOK_KEYS, *MACHINE_KEYS)


class ScoreError(ValueError):
    """Bad input to ``emascope score`` (printed, exit code 2), raised before anything is written."""


def load_entry(spec: str) -> Callable[[], Any]:
    """The function named by ``module:function`` or ``path/to/file.py:function``."""
    mod_name, sep, attr = str(spec).rpartition(":")
    if not sep or not mod_name or not attr:
        raise ScoreError(f"--entry {spec!r} must look like my_module:build or path/to/file.py:build")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise ScoreError(f"--entry: no file {str(path)!r}")
            spec_ = importlib.util.spec_from_file_location(f"emascope_entry_{path.stem}", path)
            assert spec_ is not None and spec_.loader is not None
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # like `python -m`: modules of the working directory
            module = importlib.import_module(mod_name)
    except ScoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's module failed to import
        raise ScoreError(f"--entry {spec!r}: cannot import {mod_name!r}: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ScoreError(f"--entry {spec!r}: {mod_name!r} has no function {attr!r}")
    return fn


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """run.json of a run attached with ``scoring="external"``; :class:`ScoreError` otherwise."""
    try:
        rf.check_readable_run_dir(run_dir)
    except ValueError as exc:
        raise ScoreError(str(exc)) from None
    try:
        info = json.loads((run_dir / rf.RUN_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScoreError(f"{str(run_dir)!r} holds no run ({rf.RUN_JSON} missing)") from None
    except (OSError, ValueError) as exc:
        raise ScoreError(f"cannot read {rf.RUN_JSON} of {str(run_dir)!r}: {exc}") from None
    if not isinstance(info, dict):
        raise ScoreError(f"{rf.RUN_JSON} of {str(run_dir)!r} is not a JSON object")
    try:
        rf.check_format_version(info)
    except ValueError as exc:
        raise ScoreError(str(exc)) from None
    settings = info.get("settings") if isinstance(info.get("settings"), dict) else {}
    mode = settings.get("scoring", "inline")
    if mode != "external":
        raise ScoreError(f"the run in {str(run_dir)!r} is scored in the training process (scoring={mode!r}); "
                         "emascope score scores runs attached with scoring='external'")
    return info


def scoring_config(settings: dict[str, Any], overrides: dict[str, Any]) -> ScoringConfig:
    """The run's :class:`ScoringConfig` from run.json ``settings``, with the machine-side
    ``overrides`` of ``build()``. A run that used a callable extractor needs one from ``build()``."""
    names = {f.name for f in dataclasses.fields(ScoringConfig)}
    kwargs = {k: v for k, v in settings.items() if k in names}
    kwargs.update(overrides)
    fe = kwargs.get("feature_extractor")
    if "feature_extractor" not in overrides and isinstance(fe, str) and fe not in ("auto", "identity"):
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
        if fe not in FEATURE_EXTRACTORS_REGISTRY:
            raise ScoreError(f"the run used the feature extractor {fe!r}, which is not a torch-fidelity name: "
                             "return it from build() as 'feature_extractor'")
    if "feature_device" not in overrides:
        kwargs["feature_device"] = None  # the training machine's device: use the model's here
    try:
        return ScoringConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ScoreError(f"cannot rebuild the run's scoring settings: {exc}") from None


def check_build(out: Any) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """``(model, hooks kwargs, machine overrides)`` from what ``build()`` returned."""
    if not isinstance(out, dict):
        raise ScoreError(f"build() must return a dict with 'model' and attach's scoring arguments, got "
                         f"{type(out).__name__}")
    unknown = sorted(set(out) - set(BUILD_KEYS))
    if unknown:
        raise ScoreError(f"build() returned unknown keys {unknown} (allowed: {', '.join(BUILD_KEYS)})")
    model = out.get("model")
    if not isinstance(model, nn.Module):
        raise ScoreError(f"build() must return 'model': an nn.Module, got {type(model).__name__}")
    hooks = {k: out[k] for k in HOOK_KEYS if out.get(k) is not None}
    machine = {k: out[k] for k in MACHINE_KEYS if k in out}
    return model, hooks, machine


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def merge_run_info(run_dir: Path, directions: dict[str, str | None], sample_kind: str | None) -> None:
    """Add metric directions and the sample kind to run.json (read-modify-write under a lock shared
    by all scorers of the run; the training process writes run.json only when it starts)."""
    with _locked(run_dir / rf.SCORING_LOCK):
        path = run_dir / rf.RUN_JSON
        info = json.loads(path.read_text(encoding="utf-8"))
        known = info.get("metric_directions") if isinstance(info.get("metric_directions"), dict) else {}
        merged = {**known, **{k: v for k, v in directions.items() if v in rf.DIRECTIONS}}
        kind = info.get("sample_kind") or sample_kind
        if merged == known and kind == info.get("sample_kind"):
            return
        info["metric_directions"], info["sample_kind"] = merged, kind
        atomic_write_json(path, info)


class ExternalScorer:
    """Scores the stage snapshots of one run, each exactly once among all scorers of the run.

    ``build`` is the user's ``build()`` result; ``name`` is shown as ``external:<name>`` (default
    host and pid); ``stale_after``: seconds without a claim heartbeat before another scorer takes
    a stage over (a dead holder on this host is detected at once).
    """

    def __init__(self, run_dir: str | os.PathLike, build: Any, *, name: str | None = None,
                 stale_after: float = DEFAULT_STALE_AFTER,
                 log: Callable[[str], None] = lambda s: print(s, flush=True)) -> None:
        self.run_dir = Path(run_dir)
        self.info = read_run_info(self.run_dir)
        self.model, hooks, machine = check_build(build)
        settings = self.info.get("settings") or {}
        self.cfg = scoring_config(settings, machine)
        try:
            self.hooks = Hooks(**hooks)
        except ValueError as exc:
            raise ScoreError(f"build(): {exc}") from None
        if self.hooks.sampler is None and self.hooks.evaluate is None:
            raise ScoreError("build() returned neither a sampler nor evaluate: there is nothing to score")
        if settings.get("sample_seeding") != rf.SAMPLE_SEEDING:
            raise ScoreError(f"the run's sample_seeding {settings.get('sample_seeding')!r} is not "
                             f"{rf.SAMPLE_SEEDING!r} (a run written by an older emascope)")
        self.name = rf.scorer_name(rf.SCORER_EXTERNAL, socket.gethostname(), os.getpid(), name)
        self.stale_after = float(stale_after)
        self.log = log
        self.writer = RunWriter(self.run_dir)  # no heartbeat: that file is the training process's
        known = self.info.get("metric_directions")
        known = {str(k): v for k, v in known.items() if v in rf.DIRECTIONS} if isinstance(known, dict) else {}
        self.scorer = Scorer(self.cfg, self.hooks, self.writer, self.run_dir, known_directions=known)
        self.model.eval()
        self.failed: set[int] = set()
        self.scored: list[int] = []

    def stage_steps(self) -> list[int]:
        """Steps of the stage snapshots not scored yet (no done marker), ascending."""
        try:
            names = os.listdir(self.run_dir / rf.BANKS)
        except OSError:
            return []
        steps = {s for s in map(rf.parse_stage_snapshot_name, names) if s is not None}
        return sorted(steps - done_steps(self.run_dir) - self.failed)

    def score_stage(self, step: int) -> SweepResult | None:
        """Claim and score one stage; ``None`` if another scorer holds or finished it."""
        claim = try_claim(self.run_dir, step, scorer=self.name, stale_after=self.stale_after)
        if claim is None:
            return None
        try:
            with ClaimHeartbeat(claim, min(5.0, self.stale_after / 4)):
                writer = StageWriter(self.writer)
                if claim.generation > 0:
                    writer.event("notice", step, where="scoring", scorer=self.name,
                                 message=f"took over the stage from a stale claim (generation {claim.generation})")
                try:
                    bank = load_snapshot(self.run_dir / rf.stage_snapshot_file(step))
                    result = self.scorer.sweep(self.model, bank, list(bank.variants), step, writer=writer,
                                               scorer=self.name, isolate_rng=True)
                except Exception as exc:  # noqa: BLE001 - a torn snapshot, a model that does not fit
                    self.failed.add(step)
                    writer.error("scoring", step, exc)
                    writer.event("score_failed", step, scorer=self.name, reason=f"{type(exc).__name__}: {exc}")
                    return None
                n = writer.commit(before=claim.still_mine, then=lambda n: mark_done(self.run_dir, step, rf.done_record(
                    step=step, scorer=self.name, seconds=result.seconds, records=n, time=time.time())))
            if n is None:
                self.log(f"emascope score: lost the claim on step {step} (frozen longer than {self.stale_after:g} s?)")
                return None
            merge_run_info(self.run_dir, self.scorer.metric_directions, self.scorer.sample_kind)
            self.scored.append(step)
            if self.cfg.search_evals > 0:
                self._search(result)
            self.log(f"emascope score: step {step} scored by {self.name} ({result.seconds:.1f} s, "
                     f"{n} records, {result.errors} errors)")
            return result
        finally:
            claim.release()

    def _search(self, result: SweepResult) -> None:
        """The search between grid decays at the stage just scored (``search_evals`` of the run's
        settings or of ``build()``); a failure is recorded, the scorer goes on."""
        from emascope.posthoc import search_after_sweep

        try:
            search_after_sweep(self.run_dir, self.scorer, self.model, result, scorer_name=self.name,
                               isolate_rng=True, writer=self.writer)
        except Exception as exc:  # noqa: BLE001
            self.writer.error("search", result.step, exc)

    def run_closed(self) -> bool:
        """Whether the training process closed the run (heartbeat ``closed``)."""
        try:
            hb = json.loads((self.run_dir / rf.HEARTBEAT).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(hb, dict) and rf.run_state(hb, time.time()) == "finished"

    def run(self, *, watch: bool = False, poll: float = 2.0, max_stages: int | None = None) -> int:
        """Score stages until none is left (``watch=False``), or until the run is closed and every
        stage snapshot is scored (``watch=True``; another scorer's live claim is waited for and taken
        over if it goes stale). Returns the number of stages this scorer scored."""
        while True:
            closed = self.run_closed()  # read first: a stage written before close is listed below
            steps = self.stage_steps()
            for step in steps:
                if max_stages is not None and len(self.scored) >= max_stages:
                    return len(self.scored)
                self.score_stage(step)
            if not watch or (closed and not self.stage_steps()):
                return len(self.scored)
            time.sleep(poll)


def _raise_exit(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
    raise SystemExit(128 + signum)


def score_run(run_dir: str | os.PathLike, entry: str, *, watch: bool = False, name: str | None = None,
              stale_after: float = DEFAULT_STALE_AFTER, poll: float = 2.0, max_stages: int | None = None) -> int:
    """``emascope score``: import ``entry``, call it, score the run. Returns the stages scored.

    SIGTERM exits cleanly (the held claim is released, so another scorer can take the stage at once).
    """
    read_run_info(Path(run_dir))  # a bad run directory is refused before the user's code is imported
    fn = load_entry(entry)
    try:
        built = fn()
    except Exception as exc:  # noqa: BLE001
        raise ScoreError(f"build() ({entry}) raised {type(exc).__name__}: {exc}") from exc
    scorer = ExternalScorer(run_dir, built, name=name, stale_after=stale_after)
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _raise_exit) if main else None
    try:
        return scorer.run(watch=watch, poll=poll, max_stages=max_stages)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
