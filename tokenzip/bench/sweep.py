"""The sweep: methods x budgets on one model, each point timed against the uncompressed model and its oracle.

Work items are the uncompressed model (``none``) and every (method, retain) point. A point is measured as
``warmup`` discarded pairs, then ``repeats`` pairs of

1. the method: ``generate()`` with the compressor installed (encoder, compression and the LLM all run);
2. its oracle: the stock model fed exactly the arguments the method handed to the model (the shortened prompt and
   the kept/merged tokens as precomputed ``mm_encoder_outputs``), so the LLM sees the very same tokens while no
   compression runs. The encoder still has to run in reality; the oracle's TTFT is that LLM call plus the
   uncompressed model's measured encoder time.

Every repeat of a point also re-runs the uncompressed model (``none``) right before the method, so speed-up and the
oracle's encoder time are ratios/values of measurements taken side by side: on a shared machine whose speed drifts
during a sweep, a single baseline measured at the start would make later points look faster or slower than they
are. The ``none`` row itself is the separate measurement at the start of the sweep.

Reported values are medians over the repeats (peak memory: the maximum). Derived columns (speed-up, overhead,
FLOP-ideal, Amdahl bound) are computed once all rows are in, so torchrun ranks can measure items independently.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from ..base import Compressor
from .config import BenchConfig, quality_parts
from .derive import finalize
from .env import environment
from .instrument import Clock, clock_for
from .measure import Item, NothingCompressed, Shapes, measure_none, measure_point, warm_up
from .presets import Built, build
from .specs import MethodSpec
from .specs import resolve as resolve_spec


def resolve_methods(model: torch.nn.Module, wanted: Sequence[str | type[Compressor] | MethodSpec] | None
                    ) -> tuple[list[tuple[str, type[Compressor] | MethodSpec]], dict[str, str]]:
    """(name, class or :class:`~tokenzip.bench.specs.MethodSpec`) of the methods to run and, for the others, why
    they are skipped. ``wanted`` names registered methods (any stage the model's adapter lists, stage ``"encoder"``
    included) or encoder-stage specs ``NAME@encoderL`` / ``NAME@encoderL1+L2+...`` (:mod:`tokenzip.bench.specs`)."""
    from ..adapters import adapter_for
    from ..methods import METHODS

    try:
        adapter = adapter_for(model)
    except TypeError as e:
        adapter = None
        why = str(e)
    if wanted is None:
        classes = list(METHODS)
    else:
        classes = [resolve_spec(w) for w in wanted]
    run, skipped = [], {}
    for c in classes:
        name = c.info.name
        if adapter is None:
            skipped[name] = why
        elif (getattr(c, "reduces", None) not in adapter.input_reductions if c.info.stage == "input"
              else c.info.stage not in adapter.stages):
            skipped[name] = f"stage {c.info.stage} not supported by {type(adapter).__name__}"
        elif not set(c.info.modalities) & set(adapter.modalities):
            skipped[name] = f"modalities {list(c.info.modalities)} not in {list(adapter.modalities)}"
        elif isinstance(c, type) and not set(c(retain=1.0).requires) <= adapter.produces(c.info.stage):
            missing = sorted(set(c(retain=1.0).requires) - adapter.produces(c.info.stage))
            skipped[name] = f"needs signals {missing}, which {type(adapter).__name__} does not produce"
        else:
            run.append((name, c))
    return run, skipped


# ---- the sweep -----------------------------------------------------------------------------------------------------
def run_bench(cfg: BenchConfig, built: Built | None = None) -> dict[str, Any]:
    """Run the sweep, write ``results.jsonl``, ``report.md`` and the plots into ``cfg.out`` (rank 0), and return
    ``{"rows": [...], "env": {...}, "skipped": {...}, "quality": [...]}`` (rank 0; other ranks get their shard)."""
    from . import dist

    cfg.validate()
    ctx = dist.setup(cfg.device)
    if cfg.device.startswith("cuda") and ctx.world > 1:
        cfg.device = f"cuda:{ctx.local_rank}"
    torch.set_num_threads(cfg.threads or dist.default_threads(ctx))
    if built is None:
        built = build(cfg.model, attn=cfg.attn, dtype=cfg.dtype, device=cfg.device, layers=cfg.layers, seed=cfg.seed,
                      video=cfg.video, clip=cfg.clip)
    clock = Clock(cfg.clock) if cfg.clock is not None else clock_for(cfg.device)
    shapes = Shapes(built)
    methods, skipped = resolve_methods(built.model, cfg.methods)
    items = [Item("none", 1.0)] + [Item(n, float(r), c) for n, c in methods for r in cfg.retain]
    mine = items[ctx.rank::ctx.world]
    rows: list[dict[str, Any]] = []
    bar = _progress(len(mine), cfg.progress and ctx.rank == 0, f"bench {built.preset}")
    t0 = time.perf_counter()
    warm_up(built, cfg, clock)
    failed: dict[str, str] = {}
    for it in mine:
        if bar is not None:
            bar.set_postfix_str(f"{it.method} r={it.retain:g}")
        if it.method == "none":
            new = measure_none(built, cfg, clock, shapes)
        else:
            try:
                new = measure_point(built, it, cfg, clock, shapes)
            except NothingCompressed as e:  # a point with nothing compressed is no method row
                failed[it.method] = f"skipped at retain {it.retain:g}: {e}"
                new = []
            except (ValueError, TypeError, RuntimeError) as e:  # e.g. an LLM-stage schedule needing more layers
                failed[it.method] = f"failed at retain {it.retain:g}: {e}"
                new = []
        for r in new:
            r["measured_on_rank"] = ctx.rank
        rows += new
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0

    quality: list[dict[str, Any]] = []
    kept_quality: list[dict[str, Any]] = []
    q_note = ""
    t1 = time.perf_counter()
    parts = quality_parts(cfg.quality)
    video = built.media.get("kind") == "video"
    if "dinov2" in parts or ("auto" in parts and not built.preset.startswith("tiny")):
        from . import fidelity

        names = [n for n, _ in methods] if cfg.methods is not None else None
        try:
            if video:  # the same methods on real clips, per frame (fidelity.run_video_fidelity)
                quality = fidelity.run_video_fidelity(names, cfg.retain, frames=int(built.media["frames"]),
                                                      rank=ctx.rank, world=ctx.world,
                                                      progress=cfg.progress and ctx.rank == 0)
            else:
                quality = fidelity.run_fidelity(names, cfg.retain, n_images=cfg.quality_images, rank=ctx.rank,
                                                world=ctx.world, progress=cfg.progress and ctx.rank == 0)
                if built.preset in fidelity.DINOV2_TOWER_MODELS:  # every method, through the model (any stage)
                    kept_quality = fidelity.run_model_fidelity(
                        built.model, built.processor, [n for n, _ in methods], cfg.retain,
                        n_images=cfg.quality_images, rank=ctx.rank, world=ctx.world,
                        progress=cfg.progress and ctx.rank == 0)
        except fidelity.Unavailable as e:
            if "dinov2" in parts:
                raise
            q_note = str(e)
    events: list[dict[str, Any]] = []
    if "event-recall" in parts:
        from .events import run_event_recall

        events = run_event_recall(built.model, methods, cfg.retain, frames=cfg.event_frames, trials=cfg.event_trials,
                                  rank=ctx.rank, world=ctx.world, progress=cfg.progress and ctx.rank == 0)
        if "dinov2" in parts:  # the same trials on real weights (pre-LLM video methods on DINOv2-S/14)
            from .events import run_event_recall_dinov2

            names = [n for n, _ in methods] if cfg.methods is not None else None
            events += run_event_recall_dinov2(names, cfg.retain, frames=cfg.event_frames, trials=cfg.event_trials,
                                              rank=ctx.rank, world=ctx.world)
    accuracy: list[dict[str, Any]] = []
    if cfg.task:
        from .tasks import run_task_sweep

        accuracy = run_task_sweep(built, cfg.task, methods, cfg.retain, limit=cfg.task_limit, rank=ctx.rank,
                                  world=ctx.world, new_tokens=16)

    gathered = dist.gather(ctx, {"rows": rows, "quality": quality, "kept_quality": kept_quality,
                                 "accuracy": accuracy, "events": events,
                                 "elapsed": elapsed,
                                 "quality_elapsed": time.perf_counter() - t1, "failed": failed})
    env = environment(built, cfg, ctx.world)
    if ctx.rank != 0:
        dist.barrier(ctx)
        dist.teardown(ctx)
        return {"rows": rows, "env": env, "skipped": skipped, "quality": quality}
    all_rows = [r for g in gathered for r in g["rows"]]
    all_quality = [r for g in gathered for r in g["quality"]]
    all_kept_quality = [r for g in gathered for r in g["kept_quality"]]
    all_acc = [r for g in gathered for r in g["accuracy"]]
    for g in gathered:
        skipped.update(g["failed"])
    all_rows = finalize(all_rows, built.scale)
    decode = built.media.get("decode_s")
    for r in all_rows:
        r["env"] = env
        if decode is not None:  # the clip's decode + preprocessing: before generate(), the same for every row
            r["decode_s"] = decode
            r["ttft_with_decode_s"] = decode + r["ttft_s"]
    all_events = []
    if "event-recall" in parts:
        from .events import merge_event_rows

        all_events = merge_event_rows([r for g in gathered for r in g["events"]], cfg.event_frames)
    result = {"rows": all_rows, "env": env, "skipped": skipped, "quality": all_quality,
              "kept_quality": all_kept_quality, "accuracy": all_acc,
              "events": all_events, "media": built.media,
              "quality_note": q_note, "elapsed_s": max(g["elapsed"] for g in gathered),
              "quality_elapsed_s": max(g["quality_elapsed"] for g in gathered),
              "preset_notes": built.notes, "preset_source": built.source, "scale": built.scale,
              "command": cfg.command, "config": {k: v for k, v in asdict(cfg).items() if k != "clock"}}
    from .report import write_outputs

    write_outputs(result, cfg.out)
    dist.barrier(ctx)
    dist.teardown(ctx)
    return result


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="point")
