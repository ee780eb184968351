"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

Both models share one layout: a ViT over 14-px patches (a Conv3d patch embed over ``temporal_patch_size`` frames),
axial 2-D rotary embeddings, blocks with one fused ``qkv`` projection, and a ``PatchMerger`` that concatenates each
2x2 group of neighbouring patches (the patches are laid out group-major: four consecutive patches form one group)
and maps the group with an MLP into the LLM's embedding space. Qwen2.5-VL adds window attention: the patches are
re-ordered group-wise into windows (``window_index``) before the blocks, every block except
``vision_config.fullatt_block_indexes`` attends only within its window, and the merger's output is put back in
raster order at the end. One image of ``grid_thw = (t, h, w)`` patches gives ``t * h * w / 4`` LLM tokens and
``t * h * w / 4`` image placeholders in ``input_ids``.

Design:

* **Items** are images (``pixel_values`` + ``image_grid_thw``) and video clips (``pixel_values_videos`` +
  ``video_grid_thw``: adapters/qwen_video.py, a mixin), in sequence order. **Tokens** are the merger's output (the
  LLM-space tokens the model would scatter into the placeholders), so a method compresses exactly what reaches the
  LLM; ``projected`` is these tokens too. **Layout**: one row-major grid ``(h/2, w/2)`` per image (per frame when
  ``t > 1``); a clip is ``frames(t, h/2, w/2)``. A method compresses the modalities it names; the other items reach
  the LLM whole (the model refuses raw pixels together with precomputed features, so they are encoded here too).
* **cls_attention** (there is no CLS token): the attention each token *receives* in the LAST vision block, averaged
  over heads and over all patch queries of its image. It is recomputed from that block's own fused ``qkv``
  projection and the rotary embedding the block is given (the model's own ``apply_rotary_pos_emb_vision``), on the
  block's own attention segments (``cu_seqlens``): for Qwen2.5-VL these are the windows when the last block is
  windowed (``depth - 1`` not in ``fullatt_block_indexes``) and the whole image otherwise — the released
  checkpoints use full attention in the last block. A query outside a token's window gives it zero attention, and
  the mean is taken over all queries of the image, so tokens in small edge windows are not inflated. No eager
  attention runs: the model keeps its attention kernel; the rows are recomputed in float32, chunked over queries.
  The four patches of each 2x2 merge group are averaged to give the merged token's score (and the window order of
  Qwen2.5-VL is undone exactly as the model undoes it for the merger's output).
* **keys**: the last block's keys before the rotary embedding (the content part; rotated keys would make the
  similarity depend on the relative position of the two patches), averaged over heads, then over each 2x2 group.
* **text**: the prompt's text-token embeddings (image/video placeholders and padding excluded).
* **Positions**: the kept tokens keep their original 3-D M-RoPE positions. The full position ids are computed on
  the original sequence with the model's own ``get_rope_index`` (or taken from the caller's ``position_ids``), and
  the columns of the kept tokens are kept: a kept or merged token takes the position of its representative input
  token (``CompressOutput.index``), and the text after an image keeps its original positions (no renumbering, so
  the prompt's positions are those the uncompressed model would use). The result is passed as explicit
  ``position_ids`` of shape ``[4, B, L']`` (row 0: contiguous text positions, used only to build the causal mask;
  rows 1-3: temporal/height/width), which is the format ``generate()`` itself builds for Qwen-VL: on later decoding
  steps ``generate()`` extends every row by ``last + 1``, so decoding continues exactly where the uncompressed model
  would. ``model.model.rope_deltas`` is set to ``max position + 1 - kept length`` per sample (the model's own
  definition), so a manual decoding loop that passes the cache without ``position_ids`` also continues at
  the right positions. ``image_grid_thw``/``video_grid_thw`` are dropped from the rebuilt call (positions are
  explicit and the features precomputed), ``mm_token_type_ids`` is shortened with ``input_ids``.

Stage "encoder" (``tz.InEncoder(method, layer=L)``; clips: one cut, per temporal grid, see adapters/qwen_video.py):

* **The unit is one merge group.** The merger turns four consecutive patches (a 2x2 group, in the order of the
  model's ``get_vision_position_ids``) into one LLM token, so inside the ViT the method compresses merge units: its
  tokens are the means of each unit's four patch states after block ``L - 1``, one per LLM placeholder, with the
  same ``(h/2, w/2)`` layout per frame as at the pre-LLM stage (so a budget means the same at both stages). A kept
  unit keeps its four patches; the four patches of a merged group are the size-weighted means of its members'
  patches sub-position by sub-position (ToMe's ``merge_wavg``; top-left with top-left ...), shifted so that their
  mean is the group's token as the method made it (for averaging methods the shift is zero up to rounding; it
  carries e.g. PruMerge+'s attention weights or VisionZip's "sum" contextual tokens into the patches).
* **The later blocks run on the kept units only**, called as the model calls them (its own block modules; no copy
  of its forward). A unit keeps its rotary embedding (a merged group: its representative, first, member's), its
  frame and, on Qwen2.5-VL, its window; the attention segments are recomputed from the units that are left
  (``cu_seqlens``: one per frame; ``cu_window_seqlens``: one per window that still has units), the units are fed
  in the model's window order and put back in raster order after the merger, as the model does. Qwen-VL's vision
  attention takes no attention mask (it passes ``attention_mask=None`` to its kernel), so there is no ToMe
  proportional attention here: a merged unit is a plain (size-weighted) average in the later blocks.
* **Signals** at the cut come from block ``L - 1`` (the one that made the units), recomputed from its own q/k as
  at the ViT's output: ``keys`` (pre-rotary, mean over heads, mean over the unit's patches) and ``cls_attention``
  (attention received, on that block's own segments, mean over heads and over all the image's patch queries, then
  over the unit's patches); ``text``/``text_mask`` as at the pre-LLM stage. ``projected`` is not available (the
  merger needs the last block's output).
* **LLM positions**: each output token takes the M-RoPE position the full sequence gives its representative
  unit's placeholder, exactly as at the pre-LLM stage.
* **Cut 0** (``layer=0``, or a schedule that starts with 0): before the first block, right after the patch
  embedding. The method's tokens are the means of each unit's four patch embeddings, and ``unit_pixels`` gives it
  each unit's input pixels (``pixel_values`` as the model receives them, its four patches put back into one
  ``(in_channels * temporal_patch_size, 2 * patch_size, 2 * patch_size)`` block, so the blocks of a frame's
  ``(h/2, w/2)`` grid tile the frame). Every block then runs on the kept units only, each with its own rotary
  embedding, window and frame (the machinery of the later cuts, from block 0). There is no attention yet:
  ``cls_attention``/``keys`` are not available at cut 0 (:meth:`Qwen2VLAdapter.encoder_signals_at`; a method that
  requires them is refused when the patch is created; optional ones are absent there). ``unit_pixels`` is available
  at every cut (a merged unit: its representative unit's pixels).
* **Schedules** (``layer=(l1, l2, ...)``): the units are compressed after each listed block count by the
  InEncoder's schedule (constant keep ratio, or ToMe's constant r), each image reaching its budget at the last cut;
  sizes carry from cut to cut. After the first cut the kept units no longer tile a grid: a method at a later cut sees
  them as one row ``(1, n)`` in raster order. ``last_stats``' ``source``/``index`` refer to the last cut's input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils.generic import get_max_seqlen
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from .. import layout as L
from ..compat import cache_from
from ..encoder import MergedTokens, check_cuts
from ..llm.adapter import LLMAccess
from ..output import CompressOutput
from . import positions as P
from . import resample
from .base import Adapter, Item, ModelParts
from .placeholders import (
    image_llm_items,
    items_per_sample,
    multi_keep_mask,
    pad_id_for,
    padding_side,
    require_input_ids,
    shrink_sequences,
    text_signals,
)
from .probe import VisionBlockProbe
from .qwen_video import IMAGE, VIDEO, Media, QwenVideo, qwen_layout

# the probe lives in adapters/probe.py (Qwen3-VL, Qwen-Omni, Qwen3.5 and GLM-4.1V use it too); the old name stays
_LastBlockProbe = VisionBlockProbe


@dataclass(frozen=True)
class _UnitPlan:
    """Where every merge unit (one 2x2 group of patches: one LLM token) of a call's images sits in the vision
    blocks, so that any subset of the units can be packed for them. Units are numbered globally in the merger's
    output order (images concatenated, each frame-major and row-major over its ``(h/2, w/2)`` groups); the four
    patches of a unit are consecutive in ``pixel_values`` (the model's own ``get_vision_position_ids`` order).

    cos/sin: ``[U, 4, d]`` the rotary embedding of each unit's four patches (the model's ``rotary_pos_emb``)
    rank:    ``[U]`` the unit's place in the order the blocks see (Qwen2.5-VL: ``window_index`` order)
    frame:   ``[U]`` its full-attention segment (one per frame, as the model's ``cu_seqlens``)
    window:  ``[U]`` its attention window in the windowed blocks (Qwen2.5-VL), None for Qwen2-VL
    """

    cos: torch.Tensor
    sin: torch.Tensor
    rank: torch.Tensor
    frame: torch.Tensor
    window: torch.Tensor | None


@dataclass(frozen=True)
class _Packed:
    """A subset of units laid out for the vision blocks: ``order`` (block slot -> row of the given unit list, the
    model's window order for Qwen2.5-VL), the per-patch rotary embedding and the segment bounds (in patches) of
    the full-attention and the windowed blocks."""

    order: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    cu_full: torch.Tensor
    cu_window: torch.Tensor | None

    def to_blocks(self, units: torch.Tensor) -> torch.Tensor:
        """``[n, 4, D]`` units in the given order -> ``[4n, D]`` patches in block order."""
        return units[self.order].flatten(0, 1)

    def restore(self, rows: torch.Tensor) -> torch.Tensor:
        """``[n, ...]`` per-unit rows in block order -> the given order (as the model undoes ``window_index``)."""
        return rows[torch.argsort(self.order)]


def _segment_bounds(ids: torch.Tensor, unit: int) -> torch.Tensor:
    """``cu_seqlens`` (int32, in patches, as the model builds them) of the runs of equal ``ids`` of units in block
    order; segments that lost all their units are absent."""
    _, counts = torch.unique_consecutive(ids, return_counts=True)
    return torch.nn.functional.pad((counts * unit).cumsum(0), (1, 0)).to(torch.int32)


@dataclass
class _ImageUnits:
    """One image's units between two vision blocks (stage "encoder").

    patches: ``[n, 4, D]`` the four patch states of each current unit, in raster order of ``units``
    units:   ``[n]`` the global unit each current unit stands at: it keeps that unit's rotary positions, window and
             (in the LLM) placeholder position; for a merged group, its representative (first) member
    state:   :class:`MergedTokens` ``[1, n, D]`` of the units' means, with their sizes (original units per unit)
             and sources (each original unit's current unit, -1 dropped)
    offset:  the global index of the image's first unit
    """

    patches: torch.Tensor
    units: torch.Tensor
    state: MergedTokens
    offset: int

    def after(self, out: CompressOutput) -> "_ImageUnits":
        """The units after one compression of their means: a kept unit keeps its four patches; the patches of a
        merged group are its members' size-weighted means sub-position by sub-position (ToMe's ``merge_wavg``),
        shifted so that their mean is the group's token (the method's, re-averaged by size as
        :meth:`MergedTokens.after` does) - for an averaging method the shift is zero up to rounding."""
        step = out.source[0].to(self.patches.device)
        k = out.tokens.shape[1]
        state = self.state.after([out])
        valid = step >= 0
        weight = self.state.size[0].to(self.patches.device)[valid].float()
        flat = self.patches.flatten(1)[valid].float() * weight[:, None]
        sums = torch.zeros(k, flat.shape[1], device=flat.device).index_add_(0, step[valid], flat)
        mass = torch.zeros(k, device=flat.device).index_add_(0, step[valid], weight)
        mean = (sums / mass[:, None]).to(self.patches.dtype).view(k, *self.patches.shape[1:])
        patches = mean + (state.hidden[0].to(mean.dtype) - mean.mean(dim=1)).unsqueeze(1)
        return _ImageUnits(patches, self.units[out.index[0].to(self.units.device)], state, self.offset)


class Qwen2VLAdapter(QwenVideo, LLMAccess, Adapter):
    """See the module docstring; videos: adapters/qwen_video.py (a mixin)."""

    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    modalities = ("image", "video")
    stages = ("pre_llm", "encoder", "llm")
    signals = frozenset({"cls_attention", "keys", "projected", "text", "text_mask"})
    # inside the ViT the merger has not run yet: no ``projected``
    encoder_signals = frozenset({"cls_attention", "keys", "text", "text_mask", "unit_pixels"})
    # what a cut before the first block (cut 0) lacks: no block has attended yet
    BLOCK_SIGNALS = frozenset({"cls_attention", "keys"})

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.core = model.model
        self.visual = self.core.visual
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        self.video_token_id = int(cfg.video_token_id)
        self.merge = int(cfg.vision_config.spatial_merge_size)
        self.cuts: tuple[int, ...] | None = None  # stage "encoder": compress after these numbers of vision blocks
        self.step: Any = None  # stage "encoder" with a schedule: compresses at the cuts before the last one

    # ---- queries ------------------------------------------------------------------------------------------------
    def parts(self) -> ModelParts:
        lm = self.core.language_model
        return ModelParts(encoder=self.visual, encoder_layers=self.visual.blocks, projector=self.visual.merger,
                          language_model=lm, decoder_layers=lm.layers, final_norm=lm.norm,
                          embed=self.core.get_input_embeddings(),
                          media_token_ids={"image": self.image_token_id, "video": self.video_token_id})

    def batch_size(self, kwargs: dict[str, Any]) -> int:
        return require_input_ids(kwargs).shape[0]

    def _grid(self, kwargs: dict[str, Any]) -> torch.Tensor:
        return self.media_grid(kwargs, IMAGE)

    def _layout(self, t: int, h: int, w: int) -> L.Layout:
        """The merger output of a ``t x h x w`` patch grid: ``t`` temporal grids of ``(h/2) x (w/2)`` tokens."""
        return qwen_layout("image", t, h, w, self.merge)

    def _window_index(self, grid: torch.Tensor) -> torch.Tensor | None:
        """Qwen2.5-VL's group order inside the blocks (None for Qwen2-VL, which keeps raster group order)."""
        if not hasattr(self.visual, "fullatt_block_indexes"):
            return None
        index, _ = get_vision_window_index(grid, spatial_merge_size=self.merge, window_size=self.visual.window_size,
                                           patch_size=self.visual.patch_size)
        return index.to(grid.device)

    # ---- stage "encoder": compress between vision blocks (see the module docstring) ----------------------------
    def encoder_depth(self) -> int:
        """The number of vision blocks (``tz.InEncoder`` layer forms such as "every" resolve against it)."""
        return len(self.visual.blocks)

    def set_encoder_layer(self, layer: int | tuple[int, ...], step: Any = None) -> None:
        """Compress the images' merge units after ``layer`` vision blocks, or after each block count of an
        increasing tuple (a schedule; ``step`` compresses at the cuts before the last)."""
        cuts = check_cuts(layer, len(self.visual.blocks), first=0)  # ValueError naming the valid cuts
        if len(cuts) > 1 and step is None:
            raise ValueError("a schedule of encoder cuts needs a compression step for the intermediate cuts")
        self.cuts, self.step = cuts, step

    def encoder_signals_at(self, cuts: tuple[int, ...]) -> frozenset[str]:
        """Cut 0 (before the first block) has no attention signals."""
        produced = self.produces("encoder")
        return produced - self.BLOCK_SIGNALS if 0 in cuts else produced

    def _unit_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[U, c, y, x]`` each unit's input pixels: its four patches (``[C, T, p, p]`` each, consecutive in
        ``pixel_values``, row-major in the 2x2 group) as one ``(C * T, 2p, 2p)`` block, float32."""
        embed, m = self.visual.patch_embed, self.merge
        c, t, p = int(embed.in_channels), int(embed.temporal_patch_size), int(embed.patch_size)
        blocks = pixel_values.reshape(-1, m, m, c, t, p, p).permute(0, 3, 4, 1, 5, 2, 6)
        return blocks.reshape(-1, c * t, m * p, m * p).float()

    def _unit_plan(self, grid: torch.Tensor, hidden: torch.Tensor) -> _UnitPlan:
        """The blocks' view of every unit of the images of ``grid`` (``hidden``: the patch embeddings, for the
        device), from the model's own position, rotary and window functions."""
        unit = self.merge * self.merge
        cos, sin = self.visual.rotary_pos_emb(hidden, get_vision_position_ids(grid, self.merge))
        total = hidden.shape[0] // unit
        per_frame = (grid[:, 1] * grid[:, 2] // unit).repeat_interleave(grid[:, 0]).to(hidden.device)
        frame = torch.arange(per_frame.shape[0], device=hidden.device).repeat_interleave(per_frame)
        order = self._window_index(grid)
        if order is None:
            rank, window = torch.arange(total, device=hidden.device), None
        else:
            _, cu = get_vision_window_index(grid, spatial_merge_size=self.merge, window_size=self.visual.window_size,
                                            patch_size=self.visual.patch_size)
            per_window = ((cu[1:] - cu[:-1]) // unit).to(hidden.device)
            window_of_slot = torch.arange(per_window.shape[0], device=hidden.device).repeat_interleave(per_window)
            rank = torch.argsort(order.to(hidden.device))
            window = window_of_slot[rank]
        return _UnitPlan(cos.view(total, unit, -1), sin.view(total, unit, -1), rank, frame, window)

    def _pack(self, plan: _UnitPlan, units: torch.Tensor) -> _Packed:
        """The blocks' arguments for the global ``units`` (any subset, images in order): a unit keeps its rotary
        positions, its frame and its window; segments are recomputed from the units that are left."""
        unit = self.merge * self.merge
        order = torch.argsort(plan.rank[units], stable=True)
        u = units[order]
        pe = (plan.cos[u].flatten(0, 1), plan.sin[u].flatten(0, 1))
        window = None if plan.window is None else _segment_bounds(plan.window[u], unit)
        return _Packed(order, pe, _segment_bounds(plan.frame[u], unit), window)

    def _run_blocks(self, hidden: torch.Tensor, packed: _Packed, start: int, stop: int) -> torch.Tensor:
        """Vision blocks ``start`` ... ``stop - 1`` on packed patches ``[4n, D]``, called as the model calls them
        (full attention in ``fullatt_block_indexes`` and on Qwen2-VL, windows otherwise)."""
        full = set(getattr(self.visual, "fullatt_block_indexes", ()))
        for i in range(start, stop):
            cu = packed.cu_full if packed.cu_window is None or i in full else packed.cu_window
            hidden = self.visual.blocks[i](hidden, cu_seqlens=cu, max_seqlen=get_max_seqlen(cu, self.visual.config),
                                           position_embeddings=packed.position_embeddings)
        return hidden

    @torch.no_grad()
    def _encode_in_vit(self, kwargs: dict[str, Any], needs: frozenset[str], pixel_values: torch.Tensor,
                       grid: torch.Tensor, owner: list[int], media: Media = IMAGE) -> list[Item]:
        """Stage "encoder": the vision blocks up to the (last) cut, compressing at the earlier cuts of a schedule;
        one item per image (or clip: ``media``) whose tokens are the means of its units' four patches at the cut."""
        if media is VIDEO and len(self.cuts) > 1:
            raise ValueError(f"stage 'encoder' takes clips (pixel_values_videos) with one cut (layer=L) on Qwen-VL; a "
                             f"schedule of cuts (layer={self.cuts}) supports images only")
        unit = self.merge * self.merge
        hidden = self.visual.patch_embed(pixel_values)
        plan = self._unit_plan(grid, hidden)
        pixels = self._unit_pixels(pixel_values) if "unit_pixels" in needs else None
        sizes = [int(s) for s in (grid.prod(-1) // unit).tolist()]
        patches = hidden.view(-1, unit, hidden.shape[-1]).split(sizes)
        images, offset = [], 0
        for n, p in zip(sizes, patches):
            units = torch.arange(offset, offset + n, device=hidden.device)
            images.append(_ImageUnits(p, units, MergedTokens.start(p.mean(dim=1).unsqueeze(0)),
                                      offset))
            offset += n
        text = [text_signals(self.core.get_input_embeddings(), kwargs["input_ids"], kwargs.get("attention_mask"),
                             {self.image_token_id, self.video_token_id}, owner[i]) if "text" in needs else {}
                for i in range(len(sizes))]
        counts: list[list[int]] | None = None
        start = 0
        for j, cut in enumerate(self.cuts):  # the signals at a cut come from block `cut - 1`, which made the units
            packed = self._pack(plan, torch.cat([im.units for im in images]))
            probe = _LastBlockProbe(self.visual.blocks[max(cut - 1, 0)].attn, needs)
            handle = probe.attn.register_forward_pre_hook(probe.hook, with_kwargs=True) \
                if cut > 0 and self.BLOCK_SIGNALS & needs else None
            try:
                out = self._run_blocks(packed.to_blocks(torch.cat([im.patches for im in images])), packed, start, cut)
            finally:
                if handle is not None:
                    handle.remove()
            kept = [im.units.shape[0] for im in images]
            split = packed.restore(out.view(-1, unit, out.shape[-1])).split(kept)
            signals = {name: packed.restore(t.view(-1, unit, *t.shape[1:]).mean(dim=1)).split(kept)
                       for name, t in (("cls_attention", probe.received), ("keys", probe.keys)) if t is not None}
            items = []
            for i, (im, p) in enumerate(zip(images, split)):
                im.patches = p
                im.state = MergedTokens(p.mean(dim=1).unsqueeze(0), im.state.size, im.state.source)
                sig = {name: s[i] for name, s in signals.items()}
                if pixels is not None:
                    sig["unit_pixels"] = pixels[im.units]
                if "cls_attention" in sig and media is VIDEO:  # mean over the patch queries of the unit's frame
                    _, frame, per_frame = torch.unique(plan.frame[im.units], return_inverse=True, return_counts=True)
                    sig["cls_attention"] = sig["cls_attention"] / (unit * per_frame[frame]).to(sig["cls_attention"])
                elif "cls_attention" in sig:  # mean over all the image's patch queries (as at the ViT's output)
                    sig["cls_attention"] = sig["cls_attention"] / (unit * kept[i])
                t, h, w = grid[i].tolist()
                layout = self.media_layout(media.modality, t, h, w) if kept[i] == sizes[i] else L.grid(1, kept[i])
                items.append(Item(media.modality, owner[i], im.state.hidden[0], layout, {**sig, **text[i]},
                                  extra={"tokens_in": sizes[i], "units": im, "plan": plan}))
            if j == len(self.cuts) - 1:
                break
            counts = counts or [self.step.counts(n, len(self.cuts)) for n in sizes]
            images = [im.after(self.step(it.tokens.unsqueeze(0), c[j], it.grid,
                                         {name: s.unsqueeze(0) for name, s in it.signals.items()}))
                      for im, it, c in zip(images, items, counts)]
            start = cut
        if counts is not None:  # a schedule: the last cut reaches each image's budget
            for it, c in zip(items, counts):
                it.extra["k"] = c[-1]
        return items

    @torch.no_grad()
    def _finish_vit(self, items: list[Item], outputs: list[CompressOutput]) -> tuple[torch.Tensor, ...]:
        """The vision blocks after the last cut on every image's (or every clip's: one ViT pass per modality, as in
        the model) kept/merged units, then the model's merger: the LLM-space tokens of each item, in the order of the
        method's output."""
        images = [it.extra["units"].after(out) for it, out in zip(items, outputs)]
        packed = self._pack(items[0].extra["plan"], torch.cat([im.units for im in images]))
        hidden = self._run_blocks(packed.to_blocks(torch.cat([im.patches for im in images])), packed,
                                  self.cuts[-1], len(self.visual.blocks))
        merged = packed.restore(self.visual.merger(hidden))  # one row per unit, in block order
        return tuple(merged.split([im.units.shape[0] for im in images]))

    @staticmethod
    def _kept_units(item: Item, out: CompressOutput) -> torch.Tensor:
        """The original unit (placeholder of the image) each output token of ``item`` stands at."""
        im = item.extra.get("units")
        if im is None:
            return out.index[0]
        return im.units[out.index[0].to(im.units.device)] - im.offset

    # ---- encode -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, kwargs: dict[str, Any], needs: frozenset[str]) -> list[Item]:
        """The call's images and clips (adapters/qwen_video.py), in sequence order."""
        input_ids = require_input_ids(kwargs)
        cache = cache_from(kwargs)
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            raise ValueError("tokenzip compresses images and videos at prefill only: pixel_values came with a "
                             "non-empty cache (a continued conversation); start from an empty cache")
        self.check_second_per_grid(kwargs)
        items = [it for media in self.media_in(kwargs) for it in self._encode_media(kwargs, needs, media)]
        return self.in_sequence_order(input_ids, items)

    def _encode_media(self, kwargs: dict[str, Any], needs: frozenset[str], media: Media) -> list[Item]:
        """One item per image (or per clip) of the call: the model's own features of that modality (one ViT pass)
        with the last block's signals."""
        input_ids = kwargs["input_ids"]
        pixel_values = kwargs[media.pixels]
        grid = self.media_grid(kwargs, media)
        unit = self.merge * self.merge
        sizes = [int(s) for s in (grid.prod(-1) // unit).tolist()]
        owner = items_per_sample(input_ids, self.token_of(media.modality), sizes, media.modality)
        if int(grid.prod(-1).sum()) != pixel_values.shape[0]:
            raise ValueError(f"{media.pixels} has {pixel_values.shape[0]} patches but {media.grid} {grid.tolist()} "
                             f"needs {int(grid.prod(-1).sum())}")
        if self.cuts is not None:
            return self._encode_in_vit(kwargs, needs, pixel_values, grid.to(pixel_values.device), owner, media)
        p = _LastBlockProbe(self.visual.blocks[-1].attn, needs)
        out = p.run(lambda: self.media_features(media, pixel_values, grid))
        feats = out.pooler_output

        # per-patch signals (block order) -> per merged token (raster order), as the model does for the merger
        order = self._window_index(grid)
        restore = None if order is None else torch.argsort(order)
        grouped: dict[str, torch.Tensor] = {}
        for name, t in (("cls_attention", p.received), ("keys", p.keys)):
            if t is None:
                continue
            g = t.reshape(t.shape[0] // unit, unit, *t.shape[1:]).mean(dim=1)
            grouped[name] = g if restore is None else g[restore.to(g.device)]
        if "cls_attention" in grouped:  # mean over the patch queries of each image / of each clip token's frame
            queries = self.queries_per_token(media, grid, sizes).to(grouped["cls_attention"])
            grouped["cls_attention"] = grouped["cls_attention"] / queries

        items = []
        start = 0
        for i, (t, h, w) in enumerate(grid.tolist()):
            n = sizes[i]
            sig = {name: s[start: start + n] for name, s in grouped.items()}
            if "projected" in needs:
                sig["projected"] = feats[i]
            if "text" in needs:
                sig.update(text_signals(self.core.get_input_embeddings(), input_ids, kwargs.get("attention_mask"),
                                        {self.image_token_id, self.video_token_id}, owner[i]))
            items.append(Item(media.modality, owner[i], feats[i], self.media_layout(media.modality, t, h, w), sig))
            start += n
        return items

    # ---- rebuild ------------------------------------------------------------------------------------------------
    def _original_positions(self, kwargs: dict[str, Any]) -> torch.Tensor:
        """``[P, B, L]`` position ids of the uncompressed call (P = 1 for 2-D ids, 3 or 4 for M-RoPE ids)."""
        input_ids = kwargs["input_ids"]
        if (given := P.caller_positions(kwargs, input_ids)) is not None:
            return given
        if kwargs.get("mm_token_type_ids") is None:
            raise ValueError("mm_token_type_ids is required with pixel_values/image_grid_thw or pixel_values_videos/"
                             "video_grid_thw for Qwen-VL models (the 3-D M-RoPE positions need it); the model's "
                             "processor returns it with input_ids")
        extra = {}
        if kwargs.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = kwargs["second_per_grid_ts"]
        mask = kwargs.get("attention_mask")
        rope, _ = self.core.get_rope_index(input_ids, kwargs["mm_token_type_ids"],
                                           image_grid_thw=kwargs.get("image_grid_thw"),
                                           video_grid_thw=kwargs.get("video_grid_thw"),
                                           attention_mask=mask, **extra)
        real = torch.ones_like(input_ids) if mask is None else mask
        return torch.cat([P.text_row(real, rope.dtype).unsqueeze(0), rope], dim=0)

    def rebuild(self, kwargs: dict[str, Any], items: list[Item], outputs: list[CompressOutput]) -> dict[str, Any]:
        input_ids = kwargs["input_ids"]
        b, length = input_ids.shape
        positions = self._original_positions(kwargs)
        token = {"image": self.image_token_id, "video": self.video_token_id}
        counts: dict[int, list[list[tuple[int, int]]]] = {t: [[] for _ in range(b)] for t in token.values()}
        indices: dict[int, list[list[torch.Tensor]]] = {t: [[] for _ in range(b)] for t in token.values()}
        for item, out in zip(items, outputs):
            counts[token[item.modality]][item.sample].append((item.tokens_in, out.tokens.shape[1]))
            indices[token[item.modality]][item.sample].append(self._kept_units(item, out))
        keep = multi_keep_mask(input_ids, counts)
        # the full-sequence column each slot takes its position from: text its own, a kept placeholder its token's
        src = torch.arange(length, device=input_ids.device).expand(b, -1)
        for t in token.values():
            src = torch.where(input_ids == t, P.kept_columns(input_ids, t, counts[t], indices[t]), src)
        kept_pos = P.gather_columns(positions, src)

        call = {key: v for key, v in kwargs.items() if key != "position_ids"}
        new = shrink_sequences(call, keep, pad_id_for(self.model.config, {self.image_token_id, self.video_token_id}))
        mask = kwargs.get("attention_mask")
        valid = keep & (torch.ones_like(keep) if mask is None else mask.bool())
        new_pos = P.pack(kept_pos, valid, padding_side(mask), new["input_ids"].shape[1])
        new_mask = new["attention_mask"]
        if positions.shape[0] == 4:  # row 0 only builds the causal mask: contiguous over the new sequence
            new_pos[0] = P.text_row(new_mask, new_pos.dtype)
        self.core.rope_deltas = P.rope_deltas(new_pos[-3:] if new_pos.shape[0] >= 3 else new_pos, new_mask)
        new["position_ids"] = new_pos[0] if positions.shape[0] == 1 else new_pos

        encoded = {}
        for modality in token:  # one tensor per image / clip; the model concatenates them in placeholder order
            mine = [(it, out) for it, out in zip(items, outputs) if it.modality == modality]
            if not mine:
                continue
            feats = tuple(out.tokens[0] for _, out in mine) if self.cuts is None \
                else self._finish_vit([it for it, _ in mine], [out for _, out in mine])
            encoded[modality] = BaseModelOutputWithPooling(pooler_output=feats)
        for key in ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "second_per_grid_ts"):
            new.pop(key, None)
        new["mm_encoder_outputs"] = encoded
        return new

    # ---- stage "llm" (tokenzip.llm): each image's / clip's placeholder run; kept tokens keep their M-RoPE positions
    def llm_items(self, kwargs: dict[str, Any]) -> list:
        def plan() -> tuple[list[int], list]:
            grid, m = self._grid(kwargs), self.merge
            return ([int(t * h * w) // (m * m) for t, h, w in grid.tolist()],
                    [self._layout(t, h, w) for t, h, w in grid.tolist()])

        items = image_llm_items(kwargs, self.image_token_id, plan) + self.video_llm_items(kwargs)  # clips: the mixin
        return sorted(items, key=lambda it: (it.sample, int(it.positions[0])))  # sequence order, images and clips

    # ---- stage "input" (tokenzip.base.InputCompressor): each image resized to a smaller grid (adapters/resample.py)
    # and fewer temporal grids of each clip ("frames": adapters/qwen_video.py)
    input_reductions = ("resolution", "frames")

    def input_plan(self, kwargs: dict[str, Any], reduction: str) -> list:
        if reduction == "frames":
            return self.video_input_plan(kwargs)
        if kwargs.get("pixel_values") is None:  # clips only: "resolution" resizes images (videos pass through)
            return []
        return resample.qwen_input_plan(self, kwargs, reduction)

    def rescale_inputs(self, kwargs: dict[str, Any], reduction: str, items: list, targets: list[int]
                       ) -> tuple[dict[str, Any], list]:
        if reduction == "frames":
            return self.video_rescale_inputs(kwargs, items, targets)
        return resample.qwen_rescale_inputs(self, kwargs, items, targets)
