"""Frame selection on Qwen-VL-style clips (stage "input", reduction ``"frames"``): the building blocks Qwen2-VL /
Qwen2.5-VL (``adapters/qwen_video.py``), Qwen3-VL (``adapters/qwen3_vl.py``), Qwen3.5 (``adapters/qwen3_5.py``) and
GLM-4.1V (``adapters/glm4v.py``) share.

A clip of ``video_grid_thw = (t, h, w)`` is ``t`` temporal grids of ``temporal_patch_size`` frames (the patch embed
is a Conv3d over those frames: no smaller unit exists, so a "frame" for a :class:`tokenzip.base.FrameSelector` is one
temporal grid). Its rows of ``pixel_values_videos`` are grid-major (each grid's ``h * w`` patch rows are
contiguous), and its ``t * h * w / merge**2`` LLM tokens too (``h * w / merge**2`` per grid).

* :func:`frames_plan`: one :class:`~tokenzip.adapters.base.InputItem` per clip, ``achievable = (j * per_grid for j
  in 1..t)``, ``extra["frames"]``: the first frame of each temporal grid as RGB in ``[0, 1]`` (the call's patches put
  back into frames, :func:`tokenzip.adapters.resample.unpatchify`, and un-normalised with the video processor's
  mean/std, which the adapter states).
* :func:`keep_grids`: each clip's kept grids (``InputItem.keep``): their patch rows, the new ``video_grid_thw``, the
  ``(source, index)`` token map and which of the clip's tokens are gone.
* Where the prompt is edited is the model's. Where time is a position index (Qwen2-VL / Qwen2.5-VL: the temporal
  M-RoPE index; Qwen2.5-Omni / Qwen3-Omni: TMRoPE), the dropped grids' placeholders go and nothing else, and every
  kept column keeps the position the FULL call gives it (:func:`gathered_frames_call`, shared by those adapters; an
  Omni clip's soundtrack interleaved with it stays whole). The others write each temporal grid as its own block with
  its timestamp text, and a dropped grid's block goes whole (:func:`timestamped_frames_plan` /
  :func:`timestamped_frames_call` are that whole stage). Where the timestamp sits is the processor's, so the span
  finder is the adapter's declaration (``frame_block_spans``, a :data:`SpanFinder`):

  - :func:`leading_timestamp_spans` (Qwen3-VL, Qwen3.5: ``Qwen3VLProcessor``): per grid ``<x.x seconds>
    <vision_start> <video>*n <vision_end>`` (:func:`timestamped_block_spans`);
  - :func:`trailing_timestamp_spans` (GLM-4.1V / 4.5V / 4.6V: ``Glm4vProcessor``): ``<begin_of_video>``, per grid
    ``<begin_of_image> <image>*n <end_of_image>`` and then its timestamp, ``<end_of_video>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .. import layout as L
from . import positions as P
from .base import InputItem
from .placeholders import items_per_sample, pad_id_for, padding_side, shrink_sequences
from .resample import PatchSpec, qwen_patch_spec, unpatchify


def clip_rows(pixels: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
    """Each clip's patch rows of ``pixel_values_videos``; a ValueError when they do not add up to the grids."""
    need = int(grid.prod(-1).sum())
    if pixels.dim() != 2 or pixels.shape[0] != need:
        raise ValueError(f"pixel_values_videos has {pixels.shape[0] if pixels.dim() else 0} patches but "
                         f"video_grid_thw {grid.tolist()} needs {need}")
    return list(pixels.split([int(n) for n in grid.prod(-1).tolist()]))


def frames_plan(input_ids: torch.Tensor, rows: list[torch.Tensor], grid: torch.Tensor, video_token_id: int,
                spec: PatchSpec, mean: tuple[float, ...], std: tuple[float, ...],
                layout: Callable[[int, int, int], L.Layout]) -> list[InputItem]:
    """One item per clip with the counts of ``1 .. t`` kept temporal grids and one RGB frame per grid (module doc);
    ``layout(t, h, w)`` is the clip's layout."""
    m = spec.merge
    sizes = [int(t * h * w) // (m * m) for t, h, w in grid.tolist()]
    owner = items_per_sample(input_ids, video_token_id, sizes, "video")
    items = []
    for i, ((t, h, w), clip) in enumerate(zip(grid.tolist(), rows)):
        if clip.shape[-1] != spec.dim:
            raise ValueError(f"pixel_values_videos rows hold {clip.shape[-1]} values, the vision config's patches "
                             f"{spec.dim} (channels x temporal_patch_size x patch_size^2)")
        per_grid = h * w // (m * m)
        frames = unpatchify(clip.float(), (t, h, w), spec)[:: spec.temporal]  # the first frame of each grid
        mu = torch.tensor(mean, dtype=torch.float32, device=frames.device)[:, None, None]
        sigma = torch.tensor(std, dtype=torch.float32, device=frames.device)[:, None, None]
        items.append(InputItem("video", owner[i], sizes[i], tuple(j * per_grid for j in range(1, t + 1)),
                               layout(t, h, w), extra={"frames": (frames * sigma + mu).clamp_(0.0, 1.0), "clip": i,
                                                       "thw": (t, h, w)}))
    return items


@dataclass
class KeptGrids:
    """What :func:`keep_grids` gives: ``pixels`` (the new ``pixel_values_videos``), ``grid`` (the new
    ``video_grid_thw`` rows), per clip ``maps`` (``source [N]``: each original token's new token, -1 dropped;
    ``index [k]``: each new token's original one), ``kept`` (``[t]`` bool: the clip's kept grids)."""

    pixels: torch.Tensor
    grid: list[list[int]]
    maps: list[tuple[torch.Tensor, torch.Tensor]]
    kept: list[torch.Tensor]


def keep_grids(items: list[InputItem], targets: list[int], rows: list[torch.Tensor], merge: int) -> KeptGrids:
    """Each clip's kept temporal grids (``InputItem.keep``, all when unset) for its target count (module doc)."""
    new_rows, new_grid, maps, kept = [], [], [], []
    for it, count in zip(items, targets):
        t, h, w = it.extra["thw"]
        per_grid = h * w // (merge * merge)
        keep = torch.arange(t) if it.keep is None else torch.as_tensor(it.keep, dtype=torch.long).cpu()
        if count != keep.numel() * per_grid:
            raise ValueError(f"clip {it.extra['clip']}: {count} tokens need {count / per_grid:g} temporal grids of "
                             f"{per_grid} tokens, but InputItem.keep holds {keep.numel()} (reduction 'frames' "
                             f"needs the choice of a tokenzip.base.FrameSelector)")
        if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= t or bool((keep.diff() <= 0).any())):
            raise ValueError(f"clip {it.extra['clip']}: InputItem.keep must hold ascending distinct temporal grids "
                             f"in [0, {t}), got {keep.tolist()}")
        clip = rows[it.extra["clip"]]
        new_rows.append(clip.view(t, -1, clip.shape[-1])[keep.to(clip.device)].flatten(0, 1))
        new_grid.append([int(keep.numel()), h, w])
        index = (keep[:, None] * per_grid + torch.arange(per_grid)[None]).flatten()
        source = torch.full((it.tokens,), -1, dtype=torch.long)
        source[index] = torch.arange(count)
        maps.append((source, index))
        mask = torch.zeros(t, dtype=torch.bool)
        mask[keep] = True
        kept.append(mask)
    return KeptGrids(torch.cat(new_rows), new_grid, maps, kept)


def timestamped_block_spans(ids: torch.Tensor, slots: torch.Tensor, t: int, vision_start: int, vision_end: int,
                            what: str = "Qwen3-VL") -> list[tuple[int, int]]:
    """``[start, end)`` of each temporal grid's block in one row ``ids`` of a prompt laid out as ``Qwen3VLProcessor``
    writes a clip: per grid ``<x.x seconds> <vision_start> <video>*n <vision_end>``; ``slots`` are the clip's ``t * n``
    placeholder positions. A block spans its timestamp text, markers and placeholders: for grid ``g >= 1`` it starts
    right after grid ``g - 1``'s ``<vision_end>``. Grid 0's timestamp starts right after the chat template's own
    ``<vision_start>`` where the prompt keeps that outer pair (transformers up to 5.2x and tokenzip.video's builder);
    where the processor collapsed it (5.25), at the last token before grid 0's ``<vision_start>`` that is the first
    token of grid 1's timestamp (the format's ``<``), no farther back than grid 1's timestamp is long (an earlier
    time has no more digits). A ValueError when the prompt does not have this layout."""
    per_grid = slots.numel() // t
    runs = slots.view(t, per_grid)
    for g in range(t):
        first, last = int(runs[g, 0]), int(runs[g, -1])
        if last - first + 1 != per_grid or first == 0 or last + 1 >= ids.numel() \
                or int(ids[first - 1]) != vision_start or int(ids[last + 1]) != vision_end:
            raise ValueError(f"{what}: each temporal grid of a clip must be <x.x seconds> <vision_start> "
                             f"{per_grid} placeholder(s) <vision_end>, as Qwen3VLProcessor writes it (for tokenzip's "
                             f"frame selection); temporal grid {g} is not")
    opens = [int(runs[g, 0]) - 1 for g in range(t)]  # each grid's <vision_start>
    closes = [int(runs[g, -1]) + 1 for g in range(t)]  # its <vision_end>
    spans = [(closes[g - 1] + 1, closes[g] + 1) for g in range(1, t)]
    first = _first_timestamp_start(ids, opens[0], None if t == 1 else ids[closes[0] + 1: opens[1]], vision_start)
    if first is None:
        raise ValueError(f"{what}: cannot tell where the first temporal grid's timestamp text begins (no "
                         f"<vision_start> before it, and it does not start like the second grid's); build the prompt "
                         f"with the model's processor or tokenzip.video.qwen3_vl_video_inputs")
    return [(first, closes[0] + 1), *spans]


def _first_timestamp_start(ids: torch.Tensor, open0: int, second: torch.Tensor | None, vision_start: int
                           ) -> int | None:
    """Where grid 0's timestamp text begins (see :func:`timestamped_block_spans`), or None."""
    if second is None or second.numel() == 0:
        return None
    reach = second.numel()
    for j in range(open0 - 1, max(open0 - reach - 2, -1), -1):  # the template's outer <vision_start>
        if int(ids[j]) == vision_start:
            return j + 1 if j + 1 < open0 else None
    for j in range(open0 - 1, max(open0 - reach - 1, -1), -1):  # the format's first token
        if int(ids[j]) == int(second[0]):
            return j
    return None


# ---- span finders: an adapter declares one as ``frame_block_spans`` (a function of the adapter, one prompt row, the
# clip's placeholder positions and its number of temporal grids, returning each grid's [start, end) block)
SpanFinder = Callable[[Any, torch.Tensor, torch.Tensor, int], list[tuple[int, int]]]


def leading_timestamp_spans(adapter: Any, ids: torch.Tensor, slots: torch.Tensor, t: int) -> list[tuple[int, int]]:
    """:func:`timestamped_block_spans` with the model's ``vision_start`` / ``vision_end`` ids (``Qwen3VLProcessor``'s
    layout: each grid's timestamp BEFORE its block)."""
    cfg = adapter.model.config
    return timestamped_block_spans(ids, slots, t, int(cfg.vision_start_token_id), int(cfg.vision_end_token_id),
                                   adapter.family)


def trailing_timestamp_spans(adapter: Any, ids: torch.Tensor, slots: torch.Tensor, t: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each temporal grid's block in one row ``ids`` of a prompt laid out as ``Glm4vProcessor``
    writes a clip: ``<|begin_of_video|>``, then per grid ``<|begin_of_image|> <|image|>*n <|end_of_image|>`` followed
    by its timestamp text (the whole second of the grid's first frame), then ``<|end_of_video|>``; ``slots`` are the
    clip's ``t * n`` placeholder positions. A block is its markers, placeholders and the timestamp AFTER them: grid
    ``g``'s ends where grid ``g + 1``'s ``<|begin_of_image|>`` is, the last one's at the clip's ``<|end_of_video|>``,
    so markers delimit every block (no timestamp needs guessing, unlike :func:`timestamped_block_spans`' grid 0).
    A ValueError when the prompt does not have this layout (a grid's run not between its begin/end-of-image markers,
    no ``<|begin_of_video|>`` right before grid 0 or no ``<|end_of_video|>`` after the last grid, or a marker
    inside a timestamp)."""
    cfg = adapter.model.config
    video_start, video_end = int(cfg.video_start_token_id), int(cfg.video_end_token_id)
    image_start, image_end = int(cfg.image_start_token_id), int(cfg.image_end_token_id)
    per_grid = slots.numel() // t
    runs = slots.view(t, per_grid)
    layout = (f"{adapter.family}: a clip must be <|begin_of_video|>, per temporal grid <|begin_of_image|> "
              f"{per_grid} placeholder(s) <|end_of_image|> and its timestamp, then <|end_of_video|>, as Glm4vProcessor "
              f"writes it (for tokenzip's frame selection)")
    for g in range(t):
        first, last = int(runs[g, 0]), int(runs[g, -1])
        if last - first + 1 != per_grid or first == 0 or last + 1 >= ids.numel() \
                or int(ids[first - 1]) != image_start or int(ids[last + 1]) != image_end:
            raise ValueError(f"{layout}; temporal grid {g} is not between its own markers")
    opens = [int(runs[g, 0]) - 1 for g in range(t)]  # each grid's <|begin_of_image|>
    closes = [int(runs[g, -1]) + 1 for g in range(t)]  # its <|end_of_image|>
    if opens[0] == 0 or int(ids[opens[0] - 1]) != video_start:
        raise ValueError(f"{layout}; no <|begin_of_video|> before the first temporal grid")
    after = (ids[closes[-1] + 1:] == video_end).nonzero().flatten()
    if after.numel() == 0:
        raise ValueError(f"{layout}; no <|end_of_video|> after the last temporal grid")
    ends = [*opens[1:], closes[-1] + 1 + int(after[0])]
    markers = torch.tensor([video_start, video_end, image_start, image_end], device=ids.device)
    for g in range(t):
        if bool(torch.isin(ids[closes[g] + 1: ends[g]], markers).any()):
            raise ValueError(f"{layout}; the text after temporal grid {g} holds a marker")
    return [(opens[g], ends[g]) for g in range(t)]


def slots_of(input_ids: torch.Tensor, token_id: int, items: list[Any]) -> list[torch.Tensor]:
    """The placeholder positions of each item (``.sample``, ``.tokens``), items of one token in sequence order."""
    where = [(input_ids[b] == token_id).nonzero().flatten() for b in range(input_ids.shape[0])]
    cursor = [0] * input_ids.shape[0]
    out = []
    for it in items:
        b = it.sample
        out.append(where[b][cursor[b]: cursor[b] + it.tokens])
        cursor[b] += it.tokens
    return out


# ---- the stage where time is a position index (Qwen2-VL, Qwen2.5-VL, Qwen2.5-Omni, Qwen3-Omni) --------------------
def gathered_frames_call(adapter: Any, kwargs: dict[str, Any], items: list[InputItem], targets: list[int],
                         grid: torch.Tensor, pad_token_id: int
                         ) -> tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The call with each clip's kept temporal grids (:func:`keep_grids`) on a model whose positions carry time: the
    dropped grids' placeholder columns leave the prompt (nothing else does: markers, text and an interleaved
    soundtrack stay), and every kept column keeps the position the FULL call gives it, gathered from
    ``adapter._original_positions(kwargs)`` (the caller's ``position_ids``, else the installed model's own
    ``get_rope_index`` on the uncompressed sequence) and passed explicitly (``[P, B, L']``; with 4 rows, row 0 is
    contiguous over the new sequence: it only builds the causal mask), never re-derived from the shortened prompt.
    ``adapter.core.rope_deltas`` is set to ``max position + 1 - kept length`` per sample, so decoding continues where
    the uncompressed model would. ``adapter``: ``video_token_id``, ``merge``, ``core``, ``_original_positions``.
    Returns the call and, per clip, its ``(source, index)`` token map."""
    kept = keep_grids(items, targets, clip_rows(kwargs["pixel_values_videos"], grid), adapter.merge)
    input_ids = kwargs["input_ids"]
    positions = adapter._original_positions(kwargs)
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    for it, cols, (source, _) in zip(items, slots_of(input_ids, adapter.video_token_id, items), kept.maps):
        keep[it.sample, cols[(source < 0).to(cols.device)]] = False
    call = {key: v for key, v in kwargs.items() if key != "position_ids"}
    new = shrink_sequences(call, keep, pad_token_id)
    mask = kwargs.get("attention_mask")
    valid = keep & (torch.ones_like(keep) if mask is None else mask.bool())
    new_pos = P.pack(positions, valid, padding_side(mask), new["input_ids"].shape[1])
    if positions.shape[0] == 4:
        new_pos[0] = P.text_row(new["attention_mask"], new_pos.dtype)
    adapter.core.rope_deltas = P.rope_deltas(new_pos[-3:], new["attention_mask"])
    new["position_ids"] = new_pos[0] if positions.shape[0] == 1 else new_pos
    new["pixel_values_videos"] = kept.pixels
    new["video_grid_thw"] = torch.tensor(kept.grid, dtype=grid.dtype, device=grid.device)
    return new, kept.maps


# ---- the stage on clips whose temporal grids are timestamped blocks (Qwen3-VL, Qwen3.5, GLM-4.1V) ------------------
def timestamped_frames_plan(adapter: Any, kwargs: dict[str, Any]) -> list[InputItem]:
    """:func:`frames_plan` for the call's clips (none: no items). ``adapter``: an M-RoPE adapter with ``_grid``,
    ``_layout``, ``video_token_id``, ``merge`` and the video processor's ``video_pixel_mean`` / ``video_pixel_std``."""
    grid = adapter._grid(kwargs, "video")
    if grid is None:
        return []
    return frames_plan(kwargs["input_ids"], clip_rows(kwargs["pixel_values_videos"], grid), grid,
                       adapter.video_token_id, qwen_patch_spec(adapter), adapter.video_pixel_mean,
                       adapter.video_pixel_std, lambda t, h, w: adapter._layout(t, h, w, "video"))


def timestamped_frames_call(adapter: Any, kwargs: dict[str, Any], items: list[InputItem], targets: list[int]
                            ) -> tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The call with each clip's kept temporal grids (:func:`keep_grids`): each dropped grid's whole block (the
    adapter's ``frame_block_spans``: its markers, placeholders and timestamp text) leaves the prompt, recorded per
    item as ``InputItem.text_removed``, so the call is the processor's for the kept frames and the model computes its
    positions (the caller's ``position_ids`` are those of the old sequence and are dropped; ``mm_token_type_ids``
    shrinks with the prompt). Returns it and the token maps."""
    grid = adapter._grid(kwargs, "video")
    kept = keep_grids(items, targets, clip_rows(kwargs["pixel_values_videos"], grid), adapter.merge)
    input_ids = kwargs["input_ids"]
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    for it, slots, grids in zip(items, slots_of(input_ids, adapter.video_token_id, items), kept.kept):
        it.text_removed = 0
        if bool(grids.all()):
            continue
        spans = adapter.frame_block_spans(input_ids[it.sample], slots, grids.numel())
        per_grid = it.tokens // grids.numel()
        for g in (~grids).nonzero().flatten().tolist():
            keep[it.sample, spans[g][0]: spans[g][1]] = False
            it.text_removed += spans[g][1] - spans[g][0] - per_grid
    call = {key: v for key, v in kwargs.items() if key != "position_ids"}
    new = shrink_sequences(call, keep, pad_id_for(adapter.model.config, set(adapter.token_of.values())))
    new["pixel_values_videos"] = kept.pixels
    new["video_grid_thw"] = torch.tensor(kept.grid, dtype=grid.dtype, device=grid.device)
    return new, kept.maps
