"""A contact sheet of what a method did to a video: every sampled frame, with its tokens drawn as in
:mod:`tokenzip.viz` — tokens that reach the LLM as themselves bright with a thin outline, dropped tokens dimmed, and
every merged group (an output token made of several input tokens, possibly from several frames) tinted in ONE colour
on every frame it covers, with a dot on its representative token.

    stats = tokenzip.preview.kept_items(method, model, inputs)[0]      # a video item's ItemStats
    tokenzip.contact_sheet.contact_sheet(video.frames, stats, timestamps=video.timestamps).save("sheet.png")

:func:`video_contact_sheet` is the whole ``tokenzip show`` path for a clip on LLaVA-OneVision: decode, build the
inputs, run the method's selection, draw. :func:`frames_contact_sheet` is the same on an image model (each frame
encoded as an image, the frames' tokens compressed as one clip), as the demo's video step does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .output import ItemStats

_PALETTE_NAME = "tab10"  # as tokenzip.viz


def _frame_grids(stats: ItemStats, num_frames: int) -> list[tuple[int, int, int]]:
    """``(start, h, w)`` of each frame of the item's ``frames`` segment; a ValueError when the item is no clip of
    ``num_frames`` frames."""
    layout = stats.grid
    if layout is None or not hasattr(layout, "segments") or layout.num_frames == 0:
        raise ValueError("stats must be a video item's ItemStats (its grid a Layout with a 'frames' segment)")
    out, start = [], 0
    for seg in layout.segments:
        if seg.kind == "frames":
            out += [(start + t * seg.h * seg.w, seg.h, seg.w) for t in range(seg.t)]
        start += seg.size
    if len(out) != num_frames:
        raise ValueError(f"the item has {len(out)} frames, frames holds {num_frames}")
    return out


def frame_overlays(frames: np.ndarray, stats: ItemStats, *, dim: float = 0.75, tint: float = 0.5
                   ) -> tuple[np.ndarray, dict[int, int]]:
    """The tinted frames ``float32 [T, H, W, 3]`` in ``[0, 1]``: each frame stretched over its token grid, dropped
    tokens darkened by ``dim``, merged groups mixed (``tint``) with their colour index into matplotlib's tab10; and
    ``group -> colour index`` (one colour per group on every frame, touching groups of one frame kept apart where the
    palette allows)."""
    if not 0.0 <= dim <= 1.0 or not 0.0 <= tint <= 1.0:
        raise ValueError(f"dim and tint must be in [0, 1], got {dim}, {tint}")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    import matplotlib

    palette = np.asarray(matplotlib.colormaps[_PALETTE_NAME].colors, dtype=np.float32)
    grids = _frame_grids(stats, frames.shape[0])
    src = stats.source.detach().cpu().numpy().astype(np.int64)
    slots, counts = np.unique(src[src >= 0], return_counts=True)
    merged = {int(s) for s, c in zip(slots, counts) if c > 1}
    colour = _colours(src, grids, merged, len(palette))
    out = frames.astype(np.float32) / 255.0
    _, height, width, _ = frames.shape
    for t, (start, gh, gw) in enumerate(grids):
        cells = src[start: start + gh * gw].reshape(gh, gw)
        rows = np.minimum((np.arange(height) * gh) // height, gh - 1)
        cols = np.minimum((np.arange(width) * gw) // width, gw - 1)
        slot_of_px = cells[rows[:, None], cols[None, :]]
        out[t][slot_of_px < 0] *= 1.0 - dim
        for g in np.unique(cells).tolist():
            if g in colour:
                m = slot_of_px == g
                out[t][m] = (1.0 - tint) * out[t][m] + tint * palette[colour[g]]
    return out, colour


def _colours(src: np.ndarray, grids: list[tuple[int, int, int]], merged: set[int], n: int) -> dict[int, int]:
    """Greedy: each merged group (in slot order) takes the least used colour that no group touching it on any frame
    (4-neighbours) has."""
    neighbours: dict[int, set[int]] = {g: set() for g in merged}
    for start, gh, gw in grids:
        cells = src[start: start + gh * gw].reshape(gh, gw)
        for dy, dx in ((0, 1), (1, 0)):
            a, b = cells[: gh - dy, : gw - dx].ravel().tolist(), cells[dy:, dx:].ravel().tolist()
            for x, y in zip(a, b):
                if x != y and x in neighbours and y in neighbours:
                    neighbours[x].add(y)
                    neighbours[y].add(x)
    colour: dict[int, int] = {}
    used = [0] * n
    for g in sorted(neighbours):
        taken = {colour[o] for o in neighbours[g] if o in colour}
        free = [c for c in range(n) if c not in taken] or list(range(n))
        colour[g] = min(free, key=lambda c: (used[c], c))
        used[colour[g]] += 1
    return colour


def contact_sheet(frames: np.ndarray, stats: ItemStats, *, timestamps: Sequence[float] | None = None,
                  ncols: int | None = None, panel: float = 2.4, title: str | None = None, dim: float = 0.75,
                  tint: float = 0.5):
    """A PIL image: one panel per frame (:func:`frame_overlays`), titled with its time and its token counts (kept as
    themselves / in merged groups / dropped); the sheet's title says the item's ``tokens_in -> tokens_out`` and what
    became of the clip's non-frame tokens (LLaVA-OneVision's closing newline)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle
    from PIL import Image

    tinted, _ = frame_overlays(frames, stats, dim=dim, tint=tint)
    t_count = tinted.shape[0]
    if timestamps is not None and len(timestamps) != t_count:
        raise ValueError(f"timestamps has {len(timestamps)} entries for {t_count} frames")
    grids = _frame_grids(stats, t_count)
    src = stats.source.detach().cpu().numpy().astype(np.int64)
    slots, counts = np.unique(src[src >= 0], return_counts=True)
    size = dict(zip(slots.tolist(), counts.tolist()))
    index = stats.index.detach().cpu().tolist()
    ncols = ncols or min(t_count, 4)
    nrows = -(-t_count // ncols)
    aspect = tinted.shape[1] / tinted.shape[2]
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel * ncols, panel * aspect * nrows + 0.6 + 0.35 * nrows),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for t, (start, gh, gw) in enumerate(grids):
        ax = axes[t // ncols][t % ncols]
        cells = src[start: start + gh * gw].reshape(gh, gw)
        ax.imshow(np.clip(tinted[t], 0, 1), extent=(0, gw, gh, 0), interpolation="nearest")
        lw = max(0.4, min(1.5, 24.0 / max(gh, gw)))
        boxes = [Rectangle((x + 0.04, y + 0.04), 0.92, 0.92) for y in range(gh) for x in range(gw)
                 if cells[y, x] >= 0 and size.get(int(cells[y, x]), 0) == 1]
        if boxes:
            ax.add_collection(PatchCollection(boxes, facecolor="none", edgecolor="#ffd400", linewidth=lw))
        reps = [(pos - start) for g, pos in enumerate(index) if size.get(g, 0) > 1 and start <= pos < start + gh * gw]
        if reps:
            ax.scatter([p % gw + 0.5 for p in reps], [p // gw + 0.5 for p in reps], s=max(2.0, 180.0 / max(gh, gw)),
                       c="white", edgecolors="black", linewidths=0.4)
        alone = int(sum(1 for v in cells.ravel() if v >= 0 and size[int(v)] == 1))
        grouped = int(sum(1 for v in cells.ravel() if v >= 0 and size[int(v)] > 1))
        when = f"t={timestamps[t]:.2f}s  " if timestamps is not None else f"frame {t}  "
        ax.set_title(f"{when}kept {alone}, merged {grouped}, dropped {int((cells < 0).sum())}", fontsize=7)
        ax.set_xlim(0, gw)
        ax.set_ylim(gh, 0)
        ax.set_aspect(aspect * gw / gh)  # the frame's own shape, not the token grid's
    in_frames = np.zeros(src.shape[0], dtype=bool)
    for start, gh, gw in grids:
        in_frames[start: start + gh * gw] = True
    rest = src[~in_frames]
    extra = f"; other tokens (newline): {int((rest >= 0).sum())}/{rest.size} kept" if rest.size else ""
    head = title or ""
    fig.suptitle(f"{head}{'  ' if head else ''}{stats.tokens_in} -> {stats.tokens_out} tokens{extra}", fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()
    pic = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    plt.close(fig)
    return pic


def video_contact_sheet(compressor: Any, model: torch.nn.Module, tokenizer: Any, path: str | Path, *,
                        num_frames: int = 8, prompt: str = "<video>\nDescribe the video.", video_processor: Any = None,
                        title: str | None = None) -> tuple[Any, ItemStats]:
    """``tokenzip show`` for a clip: decode ``num_frames`` frames of ``path`` (:func:`tokenzip.video.read_video`),
    build LLaVA-OneVision inputs (:func:`tokenzip.video.onevision_video_inputs`, ``prompt`` holding one
    ``<video>``), run ``compressor``'s selection (:func:`tokenzip.preview.kept_items`) and draw the contact sheet.
    Returns the picture and the clip's ItemStats. TypeError for a model other than LLaVA-OneVision. ``tokenizer``
    ``None`` (a bench preset has none): the prompt is the clip's placeholder run alone (no text for the method)."""
    from .preview import kept_items
    from .video import (
        onevision_video_inputs,
        onevision_video_pixels,
        onevision_video_processor,
        onevision_video_tokens,
        read_video,
    )

    if type(model).__name__ != "LlavaOnevisionForConditionalGeneration":
        raise TypeError(f"video contact sheets support LlavaOnevisionForConditionalGeneration, got "
                        f"{type(model).__name__}")
    if "video" not in compressor.info.modalities:
        raise TypeError(f"{compressor.info.name} compresses {list(compressor.info.modalities)}, not video")
    video = read_video(path, num_frames=num_frames)
    if video_processor is None:  # LLaVA-OneVision's settings at the model's own frame size
        video_processor = onevision_video_processor(int(model.config.vision_config.image_size))
    if tokenizer is None:
        pixels = onevision_video_pixels([video.frames], video_processor)
        ids = torch.full((1, onevision_video_tokens(model.config, video.num_frames)), int(model.config.video_token_id))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}
    else:
        inputs = onevision_video_inputs(model, tokenizer, [prompt], [video.frames], video_processor)
    param = next(model.parameters())
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(param.device, param.dtype)
    inputs = {k: v.to(param.device) for k, v in inputs.items()}
    stats = [s for s in kept_items(compressor, model, inputs) if s.modality == "video"][0]
    name = title or f"{compressor.info.name} {compressor.budget}"
    return contact_sheet(video.frames, stats, timestamps=video.timestamps, title=name), stats


@dataclass
class FrameTokens:
    """A clip's frames encoded one by one as images of an image model, as one video item (:func:`encode_frames`)."""

    tokens: torch.Tensor  # [1, T*h*w, D]: the frames' patch tokens, frame after frame
    signals: dict[str, torch.Tensor]  # per-token signals concatenated frame after frame; others the first frame's
    layout: Any  # layout.frames(T, h, w)
    seen: np.ndarray  # uint8 [T, H, W, 3]: the frames as the encoder sees them (after the processor)


def encode_frames(model: torch.nn.Module, processor: Any, frames: np.ndarray, needs: Any = frozenset(),
                  prompt: str | None = None) -> FrameTokens:
    """Encode every frame exactly as the model's adapter encodes an image (the processor's preprocessing, the feature
    layer's tokens, the signals in ``needs``) and stack the frames' tokens into one clip (``layout.frames(T, h,
    w)``)."""
    from PIL import Image

    from . import layout as L
    from .adapters import adapter_for
    from .bench.inputs import DEFAULT_PROMPT, encoder_view, processor_inputs
    from .signals import SIGNALS

    adapter = adapter_for(model)
    # every frame as one image (all share the prompt, so the rows stack into one batch)
    per_frame = [processor_inputs(processor, Image.fromarray(f), prompt or DEFAULT_PROMPT) for f in frames]
    keys = [k for k in ("input_ids", "attention_mask", "pixel_values") if k in per_frame[0]]
    inputs = {k: torch.cat([fi[k] for fi in per_frame]) for k in keys}
    try:
        with torch.no_grad():
            items = adapter.encode(inputs, needs)
    finally:
        adapter.release()
    grid = items[0].grid
    if len(grid.segments) != 1 or grid.segments[0].kind != "image":
        raise ValueError(f"{type(model).__name__}'s images are laid out as {grid!r}; a clip of its frames needs one "
                         f"patch grid per image")
    h, w = grid.segments[0].h, grid.segments[0].w
    tokens = torch.cat([it.tokens for it in items]).unsqueeze(0)
    signals = {name: (torch.cat([it.signals[name] for it in items]) if SIGNALS[name].per_token
                      else items[0].signals[name]).unsqueeze(0) for name in needs if name in items[0].signals}
    seen = np.stack([np.asarray(encoder_view(processor, px).convert("RGB")) for px in inputs["pixel_values"]])
    return FrameTokens(tokens, signals, L.frames(len(items), h, w), seen)


def _check_video_method(compressor: Any) -> None:
    if "video" not in compressor.info.modalities or compressor.info.stage != "pre_llm":
        raise TypeError(f"{compressor.info.name} ({compressor.info.stage}, {list(compressor.info.modalities)}) is not "
                        f"a pre-LLM video method")


def compress_frames(compressor: Any, clip: FrameTokens) -> ItemStats:
    """``compressor`` (a pre-LLM video method) on an encoded clip through its public ``compress``: the ItemStats of
    what it keeps."""
    _check_video_method(compressor)
    signals = {name: clip.signals[name] for name in compressor.signals_needed() if name in clip.signals}
    with torch.no_grad():
        out = compressor.compress(clip.tokens, grid=clip.layout, **signals)
    return ItemStats("video", clip.tokens.shape[1], out.tokens.shape[1], source=out.source[0], index=out.index[0],
                     grid=clip.layout)


def frames_contact_sheet(compressor: Any, model: torch.nn.Module, processor: Any, path: str | Path, *,
                         num_frames: int = 8, prompt: str | None = None, title: str | None = None
                         ) -> tuple[Any, ItemStats]:
    """``tokenzip show`` for a clip on an IMAGE model (e.g. the ``dinov2-llava`` zoo model, real weights): decode
    ``num_frames`` frames, encode every frame exactly as the model's adapter encodes an image (:func:`encode_frames`:
    the processor's preprocessing, the feature layer's tokens, the signals the method asks for), stack the frames'
    tokens into one clip (``layout.frames(T, h, w)``) and compress it with ``compressor`` through its public
    ``compress`` (:func:`compress_frames`): what the method would keep of a clip whose frames are that encoder's
    tokens (the demo's video step). Per-token signals are concatenated frame after frame; the others (the prompt's
    text) are the first frame's. Returns the picture and the ItemStats."""
    from .video import read_video

    _check_video_method(compressor)
    video = read_video(path, num_frames=num_frames)
    clip = encode_frames(model, processor, video.frames, compressor.signals_needed(), prompt)
    stats = compress_frames(compressor, clip)
    name = title or f"{compressor.info.name} {compressor.budget}"
    return contact_sheet(clip.seen, stats, timestamps=video.timestamps, title=name), stats


__all__ = ["FrameTokens", "compress_frames", "contact_sheet", "encode_frames", "frame_overlays",
           "frames_contact_sheet", "video_contact_sheet"]
