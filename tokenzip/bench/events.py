"""Event recall: does a short event of a clip still own a token after compression?

Video methods drop or merge tokens that look like their neighbours in time; an event that lasts two frames is what
they are most likely to lose (EVS, arXiv:2510.14624, notes it can lose late events on short clips). This measures
it on clips whose ground truth is known exactly, through the model's own adapter (the code ``generate()`` runs), so
it needs no real weights for its mechanics (tests use tiny random models) and works for every model with a video
adapter and for every video method, pre-LLM and LLM-stage alike.

Definition. Trial ``s`` (``s = 0 .. trials - 1``) is :func:`tokenzip.video.synthetic_clip` with ``frames`` frames of
``height x width`` pixels and seed ``s`` (the seed moves the background and the event's frames), mirrored so that
the event sits in a different corner from trial to trial (``s % 4``: as drawn — top right —, left-right, up-down,
both). Its ``flash`` object, a white square a quarter of the frame high, is visible in exactly two consecutive
frames (never the first) and nowhere else. The clip is given to the model as the bench gives a real clip
(:func:`tokenzip.bench.presets.video_inputs`: all ``frames`` frames, the model's own preprocessing), the method
compresses it at ``retain`` (:func:`tokenzip.preview.kept_items`), and ``source[n]`` is the output slot of the clip's
input token ``n`` (``-1``: dropped; :class:`tokenzip.ItemStats`). The event's tokens ``E`` are the tokens of the
clip's ``frames`` segment whose cell shows a pixel of the flash in a frame that token covers
(:func:`tokenzip.video.event_tokens` on each frame's token grid; a temporal grid that spans several frames, e.g.
Qwen2-VL's two, covers the event when any of its frames shows it). Then, per trial:

- ``recalled``: some output token has a source token in ``E`` (``any(source[E] >= 0)``): the event still owns a
  kept token or is part of a merged one;
- ``dominant``: some output token draws at least half of its source tokens from ``E``: the event is not averaged
  away into a token that mostly stands for something else (pooling every frame into a few tokens is ``recalled``
  but not ``dominant``);
- ``kept_fraction``: the share of ``E`` that has an output token.

``event_recall``, ``event_recall_dominant`` and ``event_kept_fraction`` are their means over the trials (the first two
are fractions of trials). On a preset with random weights the methods' attention signals mean nothing, so the values
of attention-based methods are mechanics, not quality; use a real checkpoint (``--model PATH``) for those.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..output import ItemStats

EVENT_SIZE = (96, 96)  # (height, width) of the synthetic clips: the objects are a quarter of the height on a side
MIRRORS = ((False, False), (False, True), (True, False), (True, True))  # (up-down, left-right) per trial % 4


def event_clip(seed: int, frames: int = 64, height: int = EVENT_SIZE[0], width: int = EVENT_SIZE[1]
               ) -> tuple[np.ndarray, np.ndarray]:
    """Trial ``seed``'s frames ``uint8 [T, H, W, 3]`` and its event mask ``bool [T, H, W]`` (module doc)."""
    from ..video import synthetic_clip

    clip = synthetic_clip(frames, height, width, seed=seed)
    flip_v, flip_h = MIRRORS[seed % len(MIRRORS)]
    axes = tuple(a for a, on in ((1, flip_v), (2, flip_h)) if on)
    pixels, mask = clip.frames, clip.masks["flash"]
    if axes:
        pixels, mask = np.flip(pixels, axes), np.flip(mask, axes)
    return np.ascontiguousarray(pixels), np.ascontiguousarray(mask)


def event_token_mask(grid: Any, mask: np.ndarray) -> np.ndarray:
    """``bool [N]`` over an item's tokens: the tokens of its ``frames`` segment that show the event ``mask``
    ``[T, H, W]`` (module doc). ``grid`` is the item's :class:`tokenzip.layout.Layout`; a ValueError when it has no
    frames or its frames cannot be matched to the ``T`` frames of ``mask``."""
    from ..video import event_tokens

    segments = getattr(grid, "segments", None)
    if not segments or not any(s.kind == "frames" for s in segments):
        raise ValueError("event recall needs a video item (a Layout with a 'frames' segment)")
    total = mask.shape[0]
    out, start = [], 0
    for seg in segments:
        if seg.kind != "frames":
            out.append(np.zeros(seg.size, dtype=bool))
            start += seg.size
            continue
        per = -(-total // seg.t)  # frames per temporal grid (the last one may repeat the last frame)
        if seg.t > total or (seg.t - 1) * per >= total:
            raise ValueError(f"the item has {seg.t} temporal grids for {total} frames")
        w = seg.w - 1 if seg.newline else seg.w
        cells = event_tokens(mask, seg.h, w)  # [T, h, w]
        for t in range(seg.t):
            hit = cells[t * per: min(total, (t + 1) * per)].any(axis=0)
            if seg.newline:
                hit = np.concatenate([hit, np.zeros((seg.h, 1), dtype=bool)], axis=1)
            out.append(hit.reshape(-1))
        start += seg.size
    return np.concatenate(out)


def score_trial(source: torch.Tensor | np.ndarray, event: np.ndarray) -> dict[str, float]:
    """``recalled``, ``dominant`` and ``kept_fraction`` of one trial (module doc) from an item's ``source`` ``[N]``
    and its event tokens ``event`` ``bool [N]``."""
    src = np.asarray(source.detach().cpu() if isinstance(source, torch.Tensor) else source).astype(np.int64)
    if src.shape != event.shape:
        raise ValueError(f"source has {src.shape[0]} tokens, the event mask {event.shape[0]}")
    if not event.any():
        raise ValueError("the event covers no token of the item")
    hit = src[event]
    kept = hit[hit >= 0]
    dominant = False
    if kept.size:
        sizes = np.bincount(src[src >= 0])
        from_event = np.bincount(kept, minlength=sizes.shape[0])
        dominant = bool((2 * from_event[np.unique(kept)] >= sizes[np.unique(kept)]).any())
    return {"recalled": float(kept.size > 0), "dominant": float(dominant),
            "kept_fraction": float(kept.size / hit.size)}


def video_methods(methods: Sequence[tuple[str, Any]]) -> tuple[list[tuple[str, Any]], dict[str, str]]:
    """The (name, class) pairs that compress video, and the others with the reason."""
    run, skipped = [], {}
    for name, cls in methods:
        if "video" in cls.info.modalities:
            run.append((name, cls))
        else:
            skipped[name] = f"compresses {list(cls.info.modalities)}, not video"
    return run, skipped


def run_event_recall(model: torch.nn.Module, methods: Sequence[tuple[str, Any]], retains: Sequence[float], *,
                     frames: int = 64, trials: int = 8, height: int = EVENT_SIZE[0], width: int = EVENT_SIZE[1],
                     rank: int = 0,
                     world: int = 1, progress: bool = False) -> list[dict[str, Any]]:
    """Rows ``{method, retain, event_recall, event_recall_dominant, event_kept_fraction, trials, ...}`` of every video
    method in ``methods`` (``(name, class)``, as the sweep resolves them) at every ``retain``; the trials are shared
    between ranks (each rank returns per-trial rows for its trials, :func:`merge_event_rows` averages them). Methods
    that do not compress video are ``{"method", "skipped"}`` rows (rank 0)."""
    from ..preview import kept_items
    from .presets import Clip, _to, video_inputs

    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 3:
        raise ValueError(f"frames must be an int >= 3 (the event lasts two frames), got {frames!r}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an int >= 1, got {trials!r}")
    run, skipped = video_methods(methods)
    points = [(name, cls, float(r)) for name, cls in run for r in retains]
    param = next(model.parameters())
    rows: list[dict[str, Any]] = []
    mine = list(range(trials))[rank::world]
    if progress:
        from tqdm.auto import tqdm

        mine = tqdm(mine, desc="event recall", unit="clip")
    failed: dict[str, str] = {}

    def stats_of(group: list[tuple[str, Any, float]], inputs: dict[str, Any]) -> list[tuple[Any, list]]:
        """kept_items of a group sharing one encoder pass; on an error, each point alone (a method that cannot run
        on this model, e.g. an LLM-stage schedule deeper than a cut LLM, is reported, not fatal)."""
        group = [pt for pt in group if pt[0] not in failed]
        if not group:
            return []
        try:
            return list(zip(group, kept_items([cls(retain=r) for _, cls, r in group], model, inputs)))
        except (ValueError, TypeError, RuntimeError) as e:
            if len(group) == 1:
                failed[group[0][0]] = f"failed at retain {group[0][2]:g}: {e}"
                return []
        return [res for pt in group for res in stats_of([pt], inputs)]

    for seed in mine:
        pixels, mask = event_clip(seed, frames, height, width)
        clip = Clip(f"synthetic:{seed}", "", pixels, np.arange(frames) / 2.0, 2.0, 0.0)
        inputs = _to(video_inputs(model, clip, seed), str(param.device), param.dtype)
        # pre-LLM points share one encoder pass (kept_items); LLM-stage points need a prefill each
        shared = [pt for pt in points if pt[1].info.stage == "pre_llm"]
        stats = stats_of(shared, inputs) + [res for pt in points if pt not in shared for res in stats_of([pt], inputs)]
        for (name, cls, r), items in stats:
            clip_items = [it for it in items if isinstance(it, ItemStats) and it.modality == "video"]
            if len(clip_items) != 1:
                raise RuntimeError(f"{name}: expected one video item, got {len(clip_items)}")
            item = clip_items[0]
            score = score_trial(item.source, event_token_mask(item.grid, mask))
            rows.append({"method": name, "retain": r, "trial": seed, **score, "tokens_in": item.tokens_in,
                         "tokens_out": item.tokens_out, "stage": cls.info.stage})
    rows = [r for r in rows if r["method"] not in failed]  # a method that failed on a later clip: no partial mean
    rows += [{"method": name, "skipped": why} for name, why in failed.items()]
    if rank == 0:
        rows += [{"method": name, "skipped": why} for name, why in skipped.items()]
    return rows


def run_event_recall_dinov2(names: Sequence[str] | None, retains: Sequence[float], *, frames: int = 64,
                            trials: int = 8, height: int = EVENT_SIZE[0], width: int = EVENT_SIZE[1], rank: int = 0,
                            world: int = 1, model: Any = None, processor: Any = None) -> list[dict[str, Any]]:
    """The same trials on real weights: every frame through DINOv2-S/14 (resized to 224 x 224 without the center
    crop, so each 14-px patch covers a known cell of the frame), the clip's patch tokens in frame order with the
    layout ``frames(T, 16, 16)`` and DINOv2's signals, compressed by each pre-LLM video method
    (:func:`tokenzip.bench.fidelity.video_fidelity_methods`: methods that need LLM-side signals or run inside the
    LLM cannot run on a bare encoder). Per-trial rows with ``encoder = "dinov2-s14"`` (:func:`merge_event_rows`)."""
    from .. import layout as L
    from .fidelity import _load_dinov2, dinov2_tokens, video_fidelity_methods

    if model is None:
        model, processor = _load_dinov2()
    run, skipped = video_fidelity_methods(names)
    rows: list[dict[str, Any]] = []
    for seed in list(range(trials))[rank::world]:
        pixels, mask = event_clip(seed, frames, height, width)
        crop = processor.crop_size  # the size the processor hands the model (224 px), reached by a plain resize
        size = {k: int(crop[k] if isinstance(crop, dict) else getattr(crop, k)) for k in ("height", "width")}
        pv = processor(images=list(pixels), size=size, do_center_crop=False, return_tensors="pt")["pixel_values"]
        tokens, signals, grid = dinov2_tokens(model, processor, [], pixels=pv)
        t, p, d = tokens.shape
        clip_tokens = tokens.reshape(1, t * p, d)
        flat = {k: v.reshape(1, t * p, *v.shape[2:]) for k, v in signals.items()}
        layout = L.frames(t, *grid)
        event = event_token_mask(layout, mask)
        for spec in run:
            for r in retains:
                comp = spec.make(r)
                needs = comp.signals_needed()
                out = comp.compress(clip_tokens, grid=layout, **{k: v for k, v in flat.items() if k in needs})
                rows.append({"method": spec.label, "retain": float(r), "trial": seed,
                             **score_trial(out.source[0], event), "tokens_in": t * p,
                             "tokens_out": int(out.tokens.shape[1]), "stage": spec.cls.info.stage,
                             "encoder": "dinov2-s14"})
    if rank == 0:
        rows += [{"method": name, "skipped": why, "encoder": "dinov2-s14"} for name, why in skipped.items()]
    return rows


def merge_event_rows(rows: Sequence[dict[str, Any]], frames: int, size: tuple[int, int] = EVENT_SIZE
                     ) -> list[dict[str, Any]]:
    """Per-trial rows (of every rank) -> one row per (encoder, method, retain) with the means over trials
    (``encoder``: ``"model"`` for the bench's own model, ``"dinov2-s14"`` for :func:`run_event_recall_dinov2`)."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    skipped = {(r.get("encoder", "model"), r["method"]): dict(r) for r in rows if "skipped" in r}  # one per method
    out = list(skipped.values())
    for r in rows:
        if "skipped" not in r and (r.get("encoder", "model"), r["method"]) not in skipped:  # no partial means
            groups.setdefault((r.get("encoder", "model"), r["method"], r["retain"]), []).append(r)
    for (enc, name, r), g in sorted(groups.items(), key=lambda kv: (kv[0][0] != "model", kv[0][0], kv[0][1],
                                                                     -kv[0][2])):
        g = sorted(g, key=lambda x: x["trial"])
        out.append({"encoder": enc, "method": name, "retain": r,
                    "event_recall": float(np.mean([x["recalled"] for x in g])),
                    "event_recall_dominant": float(np.mean([x["dominant"] for x in g])),
                    "event_kept_fraction": float(np.mean([x["kept_fraction"] for x in g])), "trials": len(g),
                    "frames": frames, "size": list(size), "tokens_in": g[0]["tokens_in"],
                    "tokens_out": g[0]["tokens_out"], "stage": g[0]["stage"],
                    "per_trial": [int(x["recalled"]) for x in g]})
    return out


__all__ = ["event_clip", "event_token_mask", "merge_event_rows", "run_event_recall", "run_event_recall_dinov2",
           "score_trial", "video_methods"]
