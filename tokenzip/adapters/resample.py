"""Stage "input" on the adapter side: smaller inputs for the same call, so fewer tokens reach the LLM BEFORE the
encoder runs (``tokenzip.base.InputCompressor`` decides the counts; this module makes them).

Qwen2-VL / Qwen2.5-VL ("resolution"). The processor resizes an image to ``H x W`` pixels, multiples of
``patch_size * merge_size`` (28 px for the released models) between ``min_pixels`` and ``max_pixels`` with the aspect
ratio kept as closely as those multiples allow (``smart_resize``), and the LLM gets ``(H/28) * (W/28)`` tokens. The
input stage does the same with a smaller pixel budget, from the call's own ``pixel_values``:

* **Achievable grids.** An image whose call grid is ``h0 x w0`` merged tokens (``image_grid_thw / merge_size``) can be
  given any ``a x b`` grid (``1 <= a <= h0``, ``1 <= b <= w0``) whose sides are its exactly scaled sides rounded down
  or up to whole merge units: there is one scale ``s`` with ``|a - s*h0| < 1`` and ``|b - s*w0| < 1``. That is the
  aspect error ``smart_resize`` itself makes (it rounds each side to a multiple of 28, or floors both when capping
  at ``max_pixels``). The achievable counts are the products ``a*b`` (times ``t`` for a multi-frame item); for a
  count with several admissible grids the one closest in aspect ratio (``|log(a/b) - log(h0/w0)|``, then the taller)
  is used. The method takes the largest count at or under its budget (:func:`tokenzip.budget.nearest_achievable`),
  so the budget is met EXACTLY whenever a factorisation within that rounding exists (a square ``16x16`` image gets
  exactly 100 tokens as ``10x10`` and 110 as ``10x11``; a budget of 101 gives 100, as no admissible grid has 101
  tokens), and otherwise the nearest count below it. One token (``1x1``) is always achievable.
* **Resampling.** The image's flattened patches are put back into frames (the inverse of the processor's patchify:
  rows ``(t, h/m, w/m, m, m)``, each patch ``(C, temporal, p, p)``), each frame is resized with
  ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)`` — the processor resizes with PIL's bicubic
  filter, and torch's anti-aliased bicubic uses the same kernel (``a = -0.5``, support scaled with the reduction),
  so this is the processor's resize (tests/test_input_stage.py compares it with PIL) — and re-patchified. The values
  are the processor's normalised ones: normalisation is a per-channel affine map and the filter's weights sum to
  one, so resizing the normalised image equals normalising the resized one (up to the 8-bit rounding and clamping
  the processor's uint8 path applies). It is a second resampling of the already resized image, not a resize of the
  original file (which the call no longer has). An item whose target is its own count is left untouched.
* **The call.** ``image_grid_thw`` gets the new grids, each image's placeholder run keeps its first ``k`` tokens
  (``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``labels`` shortened together and re-padded on the
  batch's side), and the caller's ``position_ids`` are dropped: a resampled image is a different image, whose
  M-RoPE positions the model computes itself for the NEW sequence (``get_rope_index``); there are no "original
  positions" to keep. ``generate()`` works unchanged (the model computes positions and ``rope_deltas`` at prefill).
* **Stats.** A resampled image has no token-to-token source map. ``source`` maps each original token to the new
  token whose cell contains its centre (every new cell holds at least one, since no side grows), and ``index`` is
  each new token's first such original token (raster order): the geometric correspondence, for previews. These
  are not positions (see above).

LLaVA-OneVision and LLaVA-NeXT ("crops"; adapters/anyres.py). AnyRes feeds the base view (the whole image at the
tower's size) and a grid of crops of a high-resolution version; the input stage drops the crops: an image whose
budget is under its tiled count gets its base view only, as LLaVA-OneVision does for images in multi-image samples
(and both models' ``pack_image_features`` for a one-crop image): the base view's tokens and ONE trailing
``image_newline`` marker (``side*side + 1`` tokens; the smallest count it can get — a budget under it still gets
it). Untiled images (OneVision's multi-image samples) have that count already and are left as they are. The new
features are computed from the base crops alone (the other crops are never encoded) and fed through the
precomputed-features path (``mm_encoder_outputs``) with the prompt shortened to the new counts, so no model internal
is patched; the base-view tokens are the original base-view tokens exactly (the tower encodes each crop on its own).
``get_image_features`` tiles a lone image (it leaves images untiled only inside multi-image samples), so the base
views run through the model's own tower, projector and ``pack_image_features`` directly (``_base_view_features``).
``source``/``index``: the base-view tokens are kept (their own slots), the marker stands for the first row marker of
the crop grid, the crop tokens are dropped. The call then carries features, not pixels, so no encoder-stage or
pre-LLM method can follow in a ``tz.compose`` pipeline on this model (an LLM-stage one can).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .base import InputItem
from .placeholders import items_per_sample, pad_id_for, placeholder_keep_mask, require_input_ids, shrink_sequences

if TYPE_CHECKING:
    from .base import Adapter

Maps = list[tuple[torch.Tensor, torch.Tensor]]


# ---- grids ---------------------------------------------------------------------------------------------------------
def admissible_grids(h: int, w: int) -> dict[int, tuple[int, int]]:
    """``count -> (a, b)``: the grids an ``h x w`` grid can be resized to (see the module doc), one per count."""
    if h < 1 or w < 1:
        raise ValueError(f"grid sides must be >= 1, got {(h, w)}")
    target = math.log(h / w)
    best: dict[int, tuple[float, int, tuple[int, int]]] = {}
    for a in range(1, h + 1):
        for b in range(1, w + 1):
            # one scale s with |a - s*h| < 1 and |b - s*w| < 1: the two open intervals of s intersect
            if max((a - 1) / h, (b - 1) / w) < min((a + 1) / h, (b + 1) / w):
                key = (abs(math.log(a / b) - target), -a, (a, b))
                if a * b not in best or key < best[a * b]:
                    best[a * b] = key
    return {count: key[2] for count, key in sorted(best.items())}


def grid_for(h: int, w: int, count: int) -> tuple[int, int]:
    """The ``(a, b)`` grid of ``count`` tokens for an ``h x w`` grid; a ValueError if ``count`` is not achievable."""
    grids = admissible_grids(h, w)
    if count not in grids:
        raise ValueError(f"{count} tokens are not achievable for a {h}x{w} grid; achievable: {list(grids)}")
    return grids[count]


def cell_map(h: int, w: int, a: int, b: int, frames: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(source [frames*h*w], index [frames*a*b])``: each ``h x w`` token goes to the ``a x b`` cell that contains
    its centre, and each cell is represented by its first member (raster order), frame by frame."""
    rows = torch.div((2 * torch.arange(h) + 1) * a, 2 * h, rounding_mode="floor")  # cell row of each input row
    cols = torch.div((2 * torch.arange(w) + 1) * b, 2 * w, rounding_mode="floor")
    source = (rows[:, None] * b + cols[None, :]).flatten()
    first_row = torch.full((a,), h, dtype=torch.long).scatter_reduce(0, rows, torch.arange(h), "amin")
    first_col = torch.full((b,), w, dtype=torch.long).scatter_reduce(0, cols, torch.arange(w), "amin")
    index = (first_row[:, None] * w + first_col[None, :]).flatten()
    offsets_in = torch.arange(frames)[:, None] * (h * w)
    offsets_out = torch.arange(frames)[:, None] * (a * b)
    return (source[None] + offsets_out).flatten(), (index[None] + offsets_in).flatten()


# ---- Qwen-VL patches -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatchSpec:
    """How a Qwen-VL processor flattens an image: ``channels`` x ``temporal`` frames x ``patch`` x ``patch`` pixels
    per row, rows grouped ``merge x merge``."""

    channels: int
    temporal: int
    patch: int
    merge: int

    @property
    def dim(self) -> int:
        return self.channels * self.temporal * self.patch * self.patch


def unpatchify(rows: torch.Tensor, thw: tuple[int, int, int], spec: PatchSpec) -> torch.Tensor:
    """``[t*h*w, C*T*p*p]`` flattened patches -> ``[t*T, C, h*p, w*p]`` frames (the processor's patchify, undone)."""
    t, h, w = thw
    m, p, c, tp = spec.merge, spec.patch, spec.channels, spec.temporal
    x = rows.reshape(t, h // m, w // m, m, m, c, tp, p, p)
    # -> (t, tp, c, h/m, m, p, w/m, m, p)
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
    return x.reshape(t * tp, c, h * p, w * p)


def patchify(frames: torch.Tensor, t: int, spec: PatchSpec) -> torch.Tensor:
    """``[t*T, C, H, W]`` frames -> ``[t*(H/p)*(W/p), C*T*p*p]`` rows, in the processor's order."""
    m, p, c, tp = spec.merge, spec.patch, spec.channels, spec.temporal
    h, w = frames.shape[-2] // p, frames.shape[-1] // p
    x = frames.reshape(t, tp, c, h // m, m, p, w // m, m, p)
    # -> (t, h/m, w/m, m, m, c, tp, p, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, spec.dim)


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic with anti-aliasing (PIL's bicubic filter, which the Qwen-VL processor uses), in float32."""
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    out = torch.nn.functional.interpolate(frames.float(), size=(height, width), mode="bicubic", align_corners=False,
                                          antialias=True)
    return out.to(frames.dtype)


def resample_patches(rows: torch.Tensor, thw: tuple[int, int, int], hw: tuple[int, int], spec: PatchSpec
                     ) -> torch.Tensor:
    """One image's flattened patches at grid ``thw`` resampled to a ``t x hw`` patch grid."""
    t, h, w = thw
    if (h, w) == tuple(hw):
        return rows
    frames = unpatchify(rows, thw, spec)
    return patchify(resize_frames(frames, hw[0] * spec.patch, hw[1] * spec.patch), t, spec)


def _check_reduction(adapter: "Adapter", reduction: str) -> None:
    if reduction not in adapter.input_reductions:
        raise TypeError(adapter._no_input_stage(reduction))


def qwen_patch_spec(adapter: Any, vision_config: Any = None) -> PatchSpec:
    """The adapter's patch layout, from ``vision_config`` (default: ``adapter.model.config.vision_config``; an Omni
    model's lives in its thinker's config)."""
    v = adapter.model.config.vision_config if vision_config is None else vision_config
    return PatchSpec(channels=int(v.in_channels), temporal=int(v.temporal_patch_size), patch=int(v.patch_size),
                     merge=adapter.merge)


def qwen_input_plan(adapter: Any, kwargs: dict[str, Any], reduction: str) -> list[InputItem]:
    """Each image of a Qwen-VL call with the counts a resize can give it."""
    _check_reduction(adapter, reduction)
    input_ids = require_input_ids(kwargs)
    grid = adapter._grid(kwargs)
    pixel_values = kwargs["pixel_values"]
    spec = qwen_patch_spec(adapter)
    if int(grid.prod(-1).sum()) != pixel_values.shape[0] or pixel_values.shape[-1] != spec.dim:
        raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)} do not fit image_grid_thw "
                         f"{grid.tolist()} ({int(grid.prod(-1).sum())} patches of {spec.dim} values)")
    m = spec.merge
    sizes = [t * h * w // (m * m) for t, h, w in grid.tolist()]
    owner = items_per_sample(input_ids, adapter.image_token_id, sizes)
    items = []
    for (t, h, w), n, sample in zip(grid.tolist(), sizes, owner):
        counts = tuple(t * c for c in admissible_grids(h // m, w // m))
        items.append(InputItem("image", sample, n, counts, adapter._layout(t, h, w), extra={"thw": (t, h, w)}))
    return items


@torch.no_grad()
def qwen_rescale_inputs(adapter: Any, kwargs: dict[str, Any], items: list[InputItem], targets: list[int]
                        ) -> tuple[dict[str, Any], Maps]:
    """The call with each image resized to its target count (see the module doc)."""
    spec = qwen_patch_spec(adapter)
    m = spec.merge
    grid = adapter._grid(kwargs)
    chunks = torch.split(kwargs["pixel_values"], [int(n) for n in grid.prod(-1).tolist()])
    input_ids = kwargs["input_ids"]
    counts: list[list[tuple[int, int]]] = [[] for _ in range(input_ids.shape[0])]
    rows, grids, maps = [], [], []
    for item, k, patches in zip(items, targets, chunks):
        t, h, w = item.extra["thw"]
        if k % t:
            raise ValueError(f"{k} tokens are not achievable for an image of {t} frames (a multiple of {t} is)")
        a, b = grid_for(h // m, w // m, k // t)
        rows.append(resample_patches(patches, (t, h, w), (a * m, b * m), spec))
        grids.append([t, a * m, b * m])
        maps.append(cell_map(h // m, w // m, a, b, t))
        counts[item.sample].append((item.tokens, k))
    keep = placeholder_keep_mask(input_ids, adapter.image_token_id, counts)
    call = {key: v for key, v in kwargs.items() if key != "position_ids"}  # positions of the OLD sequence
    new = shrink_sequences(call, keep, pad_id_for(adapter.model.config, {adapter.image_token_id,
                                                                          adapter.video_token_id}))
    new["pixel_values"] = torch.cat(rows)
    new["image_grid_thw"] = torch.tensor(grids, dtype=grid.dtype, device=grid.device)
    return new, maps


# ---- AnyRes crops (LLaVA-OneVision, LLaVA-NeXT) ----------------------------------------------------------------------
def _base_count(adapter: Any, strategy: str) -> int:
    """Tokens of an untiled image: the base view's features and one newline marker."""
    vc = adapter.model.config.vision_config
    from .vision import has_cls_token

    per_crop = (vc.image_size // vc.patch_size) ** 2 + int(has_cls_token(adapter.core.vision_tower))
    return per_crop - (1 if strategy == "default" else 0) + 1


def anyres_input_plan(adapter: Any, kwargs: dict[str, Any], reduction: str) -> list[InputItem]:
    """Each image of an AnyRes call (``adapters.anyres.AnyResImages``): its packed count ``N`` and the
    base-view-only count."""
    _check_reduction(adapter, reduction)
    input_ids = require_input_ids(kwargs)
    if kwargs.get("mm_encoder_outputs"):
        raise ValueError("pass either pixel_values or mm_encoder_outputs, not both (the model refuses both)")
    _, strategy = adapter._feature_args(kwargs)
    crops, marks, grids = adapter.plan(kwargs["pixel_values"], kwargs.get("image_sizes"),
                                       adapter.batch_num_images(kwargs), strategy)
    sizes = [int(mk.shape[0]) for mk in marks]
    owner = items_per_sample(input_ids, adapter.image_token_id, sizes)
    base = _base_count(adapter, strategy)
    return [InputItem("image", sample, n, tuple(sorted({base, n})), grid,
                      extra={"crops": c, "newline": mk})
            for n, sample, grid, c, mk in zip(sizes, owner, grids, crops, marks)]


def _crop_rows(pixel_values: torch.Tensor, crops: list[int]) -> list[torch.Tensor]:
    """Each image's crops ``[c, C, H, W]`` (base view first), from 5-D or 4-D ``pixel_values``."""
    if pixel_values.dim() == 5:
        return [pixel_values[i, :c] for i, c in enumerate(crops)]
    return list(torch.split(pixel_values, crops))


def _base_view_features(adapter: Any, pixels: torch.Tensor, sizes: torch.Tensor, layer: Any, strategy: str
                        ) -> list[torch.Tensor]:
    """LLM-space features of base views ``[n, 3, H, W]`` exactly as ``get_image_features`` gives an untiled image
    (it tiles a lone image, so it cannot be asked for one base view without encoding a second crop): the tower's
    feature layer(s), [CLS] dropped for the "default" strategy, the projector, then the model's ``pack_image_features``
    on one-crop features, which appends ``image_newline``."""
    core = adapter.core
    tower = core.vision_tower
    hidden = tower(pixels.to(tower.dtype), output_hidden_states=True, return_dict=True).hidden_states
    feats = hidden[layer] if isinstance(layer, int) else torch.cat([hidden[i] for i in layer], dim=-1)
    if strategy == "default":
        feats = feats[:, 1:]
    projected = core.multi_modal_projector(feats)
    return adapter.pack_features(list(projected.unsqueeze(1)), sizes, core.image_newline)


@torch.no_grad()
def anyres_rescale_inputs(adapter: Any, kwargs: dict[str, Any], items: list[InputItem], targets: list[int]
                             ) -> tuple[dict[str, Any], Maps]:
    """The call with the images whose target is under their tiled count reduced to their base view, fed as
    precomputed features (see the module doc)."""
    layer, strategy = adapter._feature_args(kwargs)
    image_sizes = kwargs.get("image_sizes")
    per_image = _crop_rows(kwargs["pixel_values"], [it.extra["crops"] for it in items])
    tiled = [i for i, (it, k) in enumerate(zip(items, targets)) if k == it.tokens and it.extra["crops"] > 1]
    untiled = [i for i in range(len(items)) if i not in tiled]
    core = adapter.core
    feats: list[torch.Tensor | None] = [None] * len(items)

    def encode(pixels: torch.Tensor, sizes: Any, nums: torch.Tensor) -> list[torch.Tensor]:
        return adapter.image_features(pixels, sizes, layer, strategy, nums)

    sizes = torch.as_tensor(image_sizes)
    if tiled:  # unchanged: each in a one-image "sample", which the model tiles
        out = encode(torch.cat([per_image[i] for i in tiled]), sizes[tiled], torch.ones(len(tiled), dtype=torch.long))
        for i, f in zip(tiled, out):
            feats[i] = f
    if untiled:  # base views only: the tower, the feature selection and the projector on those rows, then the
        # model's own packing of one-crop features (the base view + one newline marker, as for untiled images)
        for i, f in zip(untiled, _base_view_features(adapter, torch.stack([per_image[i][0] for i in untiled]),
                                                     sizes[untiled], layer, strategy)):
            feats[i] = f
    if [int(f.shape[0]) for f in feats] != list(targets):  # adapter bug, not user input
        raise RuntimeError(f"planned {list(targets)} tokens per image, the model gave {[f.shape[0] for f in feats]}")

    input_ids = kwargs["input_ids"]
    counts: list[list[tuple[int, int]]] = [[] for _ in range(input_ids.shape[0])]
    maps: Maps = []
    for it, k in zip(items, targets):
        counts[it.sample].append((it.tokens, k))
        if k == it.tokens:
            maps.append((torch.arange(k), torch.arange(k)))
            continue
        first_newline = int(it.extra["newline"].nonzero()[0])
        source = torch.full((it.tokens,), -1, dtype=torch.long)
        source[: k - 1] = torch.arange(k - 1)
        source[first_newline] = k - 1
        maps.append((source, torch.cat([torch.arange(k - 1), torch.tensor([first_newline])])))
    keep = placeholder_keep_mask(input_ids, adapter.image_token_id, counts)
    new = shrink_sequences(kwargs, keep, pad_id_for(adapter.model.config, adapter.media_token_ids))
    for key in ("pixel_values", "image_sizes", "batch_num_images"):
        new.pop(key, None)
    encoded: dict[str, Any] = {"image": BaseModelOutputWithPooling(pooler_output=tuple(feats))}
    videos = new.pop("pixel_values_videos", None)
    if videos is not None:  # forward refuses raw video pixels next to mm_encoder_outputs: encode them as it would
        encoded["video"] = core.get_video_features(videos, vision_feature_layer=layer,
                                                   vision_feature_select_strategy=strategy, return_dict=True)
        new.pop("image_sizes_videos", None)
    new["mm_encoder_outputs"] = encoded
    return new, maps
