"""A scoring sweep on every rank of a sharded run: each rank draws its share of the sample batches.

Batches are seeded per batch (:func:`emascope.scoring.batch_seed`), so any subset of them is drawn
exactly as in a one-process sweep. Rank ``r`` of ``W`` draws batches ``r, r + W, r + 2W, ...``
(:func:`rank_batches`) with the variant swapped into its model (a DDP replica holding the whole
variant after one all-gather, or its FSDP2 shards: the sampler then runs the sharded model
collectively, and every rank makes the same number of sampler calls, a rank whose share is one
batch short drawing a throwaway batch). It turns them into features at once; features (and the
preview head, and all samples when a ``sample_metrics`` hook wants them) are gathered to rank 0
(:func:`gather_drawn`), which puts them back in batch order: exactly the one-process tensors, so
the metrics are the one-process metrics (common random numbers hold: every variant uses the same
seeds). ``evaluate(model)`` runs on every rank (a sharded model's forward is collective); rank 0's
values are recorded. Rank 0 computes the metrics and writes; the other ranks write nothing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from emascope import estimates as E
from emascope import metrics as M
from emascope import runformat as rf
from emascope.collectives import all_gather_json, gather_rows, rank_world
from emascope.config import ScoringConfig
from emascope.features import Features
from emascope.rundir import RunWriter
from emascope.scoring import (
    Drawn,
    Evaluate,
    Reference,
    SampleMetrics,
    Sampler,
    StageError,
    SweepResult,
    _user_hook,
    batch_sizes,
    draw_and_extract,
    finish_variant,
    preserved_training_flags,
    restored_state,
)

_TENSORS = ("head", "features", "logits", "samples")


def rank_batches(num_batches: int, rank: int, world: int) -> list[int]:
    """The batches rank ``rank`` of ``world`` draws: ``rank, rank + world, rank + 2 * world, ...``."""
    return list(range(rank, num_batches, world))


def batches_needed(cfg: ScoringConfig, extract: bool, keep_all: bool) -> int:
    """How many leading batches a sweep draws: all of them when features or all samples are wanted,
    else only those that reach into the preview (the larger of ``preview`` and ``preview_points``)."""
    sizes = batch_sizes(cfg.num_samples, cfg.batch_size)
    if extract or keep_all:
        return len(sizes)
    keep = max(cfg.preview, cfg.preview_points)
    return max(1, sum(1 for b in range(len(sizes)) if b * cfg.batch_size < keep))


class RankError(Exception):
    """A failure reported by another rank (its message names the rank)."""


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def gather_drawn(drawn: Drawn | None, cfg: ScoringConfig, shares: Sequence[Sequence[int]],
                 group: Any = None) -> Drawn | None:
    """Every rank's :class:`~emascope.scoring.Drawn` for one variant -> the one-process ``Drawn`` on
    group rank 0 (``None`` elsewhere). ``shares[r]``: the batches rank ``r`` drew. A collective.

    A sampler error on any rank leaves head, features and samples ``None`` (as in one process); an
    extractor error on any rank drops the features and keeps the rest. The error names its rank.
    """
    me, _ = rank_world(group)
    mine = {"head": drawn.head if drawn else None,
            "features": drawn.features.features if drawn and drawn.features is not None else None,
            "logits": drawn.features.logits if drawn and drawn.features is not None else None,
            "samples": drawn.samples if drawn else None}
    err = drawn.error if drawn else None
    meta = {"error": None if err is None else [err.where, f"{type(err.exc).__name__}: {err.exc}"],
            "drawn": drawn.num_drawn if drawn else 0,
            "tensors": {k: None if t is None else [list(t.shape[1:]), str(t.dtype).removeprefix("torch."),
                                                   int(t.shape[0])] for k, t in mine.items()}}
    metas = all_gather_json(meta, group)
    sizes = batch_sizes(cfg.num_samples, cfg.batch_size)
    rows_of = [[sizes[b] for b in share] for share in shares]
    got: dict[str, torch.Tensor | None] = {}
    for key in _TENSORS:  # the same decisions on every rank (all hold all metas): the same collectives
        specs = [m["tensors"][key] for m in metas]
        spec = next((s for s in specs if s is not None), None)
        rows = [0 if s is None else s[2] for s in specs]
        whole = key == "head" or rows == [sum(r) for r in rows_of]  # else a rank failed part-way
        if spec is None or not whole or any(s is not None and s[:2] != spec[:2] for s in specs):
            got[key] = None
            continue
        local = mine[key]
        if local is None:
            local = torch.empty(0, *spec[0], dtype=_dtype(spec[1]))
        got[key] = gather_rows(local.detach().cpu().contiguous(), group)
    if me != 0:
        return None
    errors = [(r, m["error"]) for r, m in enumerate(metas) if m["error"]]
    total = sum(int(m["drawn"]) for m in metas)
    error = None
    if errors:
        r, (where, msg) = errors[0]
        error = StageError(where, RankError(f"rank {r}: {msg}"))
    if any(e[1][0] == "sampler" for e in errors):
        return Drawn(None, None, error, total, None)

    def in_batch_order(flat: torch.Tensor | None, rows: list[list[int]]) -> torch.Tensor | None:
        if flat is None:
            return None
        pieces: dict[int, torch.Tensor] = {}
        pos = 0
        for share, counts in zip(shares, rows, strict=True):
            for b, n in zip(share, counts, strict=True):
                pieces[b] = flat[pos:pos + n]
                pos += n
        return torch.cat([pieces[b] for b in sorted(pieces)]) if pieces else None

    feats = None
    if got["features"] is not None and not any(e[1][0] == "features" for e in errors):
        f = in_batch_order(got["features"], rows_of)
        lg = in_batch_order(got["logits"], rows_of) if got["logits"] is not None else None
        feats = Features(f, lg) if f is not None else None
    # the head: each rank sent, per batch of its share below the preview size, that batch's first rows
    head = None
    if got["head"] is not None:
        keep_rows = []
        for r, share in enumerate(shares):
            spec = metas[r]["tensors"]["head"]
            left, counts = (0 if spec is None else spec[2]), []
            for b in share:
                n = min(sizes[b], max(0, left))
                counts.append(n)
                left -= n
            keep_rows.append(counts)
        head = in_batch_order(got["head"], keep_rows)
    samples = in_batch_order(got["samples"], rows_of)
    return Drawn(head, feats, error, total, samples)


def run_sweep_ranks(*, model: nn.Module, bank: Any, variants: list[str], step: int, writer: RunWriter | None,
                    cfg: ScoringConfig, sampler: Sampler | None, extractor: Any, reference: Reference | None,
                    evaluate: Evaluate | None, sample_metrics: SampleMetrics | None, fd_name: str,
                    group: Any = None, collective_sampler: bool = False,
                    extractor_error: BaseException | None = None, prior_errors: int = 0,
                    directions: Mapping[str, str | None] | None = None) -> SweepResult | None:
    """Score ``variants`` with every rank of ``group`` drawing its share (see the module docstring).
    Called on every rank, in the same order; ``writer``, ``reference`` (and the metrics) are rank
    0's. Returns the :class:`SweepResult` on rank 0, ``None`` elsewhere. Never raises on rank 0 for
    a sampler/extractor/metric failure (recorded as events, naming the rank). ``extractor_error``:
    this rank could not build the extractor rank 0 uses (its features then count as failed).
    ``prior_errors``: rank 0's failures of this sweep before it (building the reference).
    ``directions``: the metrics' directions for the ``comparison`` event (as in the one-process sweep)."""
    me, world = rank_world(group)
    res = SweepResult(step=step, errors=int(prior_errors))
    res.timings["gather"] = 0.0
    halves = E.Halves(cfg) if cfg.uncertainty and writer is not None else None  # intervals, on rank 0
    t_start = time.perf_counter()
    if writer is not None:
        writer.event("score_start", step, variants=list(variants), world_size=world, scorer=rf.SCORER_INLINE)
    keep_all = sample_metrics is not None
    extract = extractor is not None or extractor_error is not None
    need = batches_needed(cfg, extract, keep_all)
    shares = [rank_batches(need, r, world) for r in range(world)]
    calls = -(-need // world) if collective_sampler else None
    for variant in variants:
        res.scores[variant] = {}
        drawn: Drawn | None = None
        user: dict[str, Any] = {}
        swap = bank.swap(model, variant) if bank is not None else restored_state(model)
        try:
            with preserved_training_flags(model), swap, torch.no_grad():
                model.eval()
                if sampler is not None:
                    drawn = draw_and_extract(model, sampler, cfg, extractor, res.timings, keep_all=keep_all,
                                             notes=res.notes, share=shares[me], calls=calls)
                    if extractor_error is not None and drawn.error is None:
                        drawn = drawn._replace(features=None, error=StageError("features", extractor_error))
                if evaluate is not None:
                    if writer is not None:
                        user = _user_hook("evaluate", evaluate, model, res, writer, variant, "user_metrics")
                    else:
                        try:  # other ranks run it too (a sharded forward is collective); rank 0 records
                            evaluate(model)
                        except Exception:  # noqa: BLE001
                            pass
        except Exception as exc:  # noqa: BLE001 - e.g. the swap itself failed
            res.errors += 1
            if writer is not None:
                writer.error("swap", step, exc, variant=variant)
        if sampler is None:
            if writer is not None:
                finish_variant(res, writer, variant, cfg, reference, fd_name, None, None, None, user, None,
                               halves=halves, evaluated=evaluate is not None)
            continue
        t = time.perf_counter()
        whole = gather_drawn(drawn, cfg, shares, group)
        res.timings["gather"] += time.perf_counter() - t
        if writer is None or whole is None:
            continue
        res.num_samples = max(res.num_samples, whole.num_drawn)
        if whole.error is not None:
            res.errors += 1
            writer.error(whole.error.where, step, whole.error.exc, variant=variant)
        res.samples_drawn += whole.num_drawn
        finish_variant(res, writer, variant, cfg, reference, fd_name, whole.head, whole.features, whole.samples,
                       user, sample_metrics, halves=halves, evaluated=evaluate is not None)
        writer.event("score_progress", step, scorer=rf.SCORER_INLINE, variant=variant,
                     done=variants.index(variant) + 1, total=len(variants))
    if writer is None:
        return None
    if halves is not None:  # the paired comparisons, as the one-process sweep writes them
        t = time.perf_counter()
        try:
            compared = E.comparison_metrics(res.estimates, {**M.METRIC_DIRECTIONS, **(directions or {})},
                                            cfg.confidence_level)
            if compared:
                writer.event(rf.EVENT_COMPARISON, step, level=cfg.confidence_level, method="half_sample",
                             replicates=cfg.bootstrap_replicates, metrics=compared, scorer=rf.SCORER_INLINE)
        except Exception as exc:  # noqa: BLE001
            res.errors += 1
            writer.error("uncertainty", step, exc)
        res.timings["uncertainty"] = res.timings.get("uncertainty", 0.0) + time.perf_counter() - t
    res.seconds = time.perf_counter() - t_start
    writer.event("score_done", step, seconds=res.seconds, timings=dict(res.timings),
                 num_samples=res.num_samples, errors=res.errors, world_size=world, scorer=rf.SCORER_INLINE)
    return res

