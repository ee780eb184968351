"""Qwen3-VL (``Qwen3VLForConditionalGeneration``, and ``Qwen3VLMoeForConditionalGeneration``, whose vision side
and multimodal forward are the same): images and videos, with DeepStack.

The model. A ViT over 16-px patches (a Conv3d patch embed over ``temporal_patch_size = 2`` frames, learned position
embeddings resampled to the grid, axial 2-D rotary embeddings, blocks with one fused ``qkv``, attention segments of
one temporal grid each), and a ``PatchMerger`` that maps each 2x2 group of neighbouring patches (four consecutive
patches, the model's ``get_vision_position_ids`` order) to one LLM token. **DeepStack**: after each vision block in
``deepstack_visual_indexes`` a separate merger maps the block's hidden states to one more row per LLM token; the
text model adds level ``i``'s rows to the hidden states of the visual positions (``visual_pos_masks``) after decoder
layer ``i``. An image of ``grid_thw = (1, h, w)`` patches is ``<vision_start> <image>*(h*w/4) <vision_end>``. A
video clip of ``grid_thw = (t, h, w)`` (``t`` temporal grids of two frames) is, per temporal grid, a TEXT timestamp
``<x.x seconds>``, ``<vision_start>``, ``h*w/4`` ``<video>`` placeholders and ``<vision_end>`` (inside the chat
template's own ``<vision_start> ... <vision_end>`` pair in transformers 5.x;
:func:`tokenzip.video.qwen3_vl_video_prompt` builds it); ``get_rope_index`` gives each temporal grid its own 3-D
position block (time is carried by the timestamp text, not by the temporal position).

Design:

* **Items**: every image and every video clip, in sequence order (sample, then position). One clip is one item that
  spans its ``t`` placeholder runs; the timestamps and vision start/end tokens are text and always stay. **Tokens**
  are the model's own ``get_image_features`` / ``get_video_features`` ``pooler_output`` (what the model scatters
  into the placeholders), so a method compresses exactly what reaches the LLM. **Layout**: ``image(1, h/2, w/2)``
  per image, ``frames(t, h/2, w/2)`` per clip (one frame = one temporal grid).
* **Signals** offered: ``projected`` (the tokens themselves), ``text`` / ``text_mask`` (the prompt's text-token
  embeddings: placeholders and padding excluded, timestamps included), and from the LAST vision block, recomputed
  from its own fused ``qkv`` and the rotary embedding it is given (:func:`tokenzip.adapters.attention.block_signals`;
  the model keeps its attention kernel): ``keys`` (before rotary, mean over heads, then over the 2x2 merge group)
  and ``cls_attention`` (no CLS token: the attention each patch receives from the queries of its own attention
  segment — one temporal grid —, mean over heads and over those queries, then over the merge group).
* **DeepStack before the LLM**: every level is cut with the same selection as the main tokens. An output token's row
  at each level is the mean of the rows of the input tokens its ``CompressOutput.source`` group holds (a kept token:
  its own row, bit for bit; ``ops.merge``'s plain mean: the same groups with the same weights as the main tokens).
  ``CompressOutput`` records groups, not weights, so where a method's output token is not the plain mean of its
  group (PruMerge+'s attention-weighted merge, ``bilinear``'s interpolated cells) the DeepStack rows are the plain
  mean of the same group: the same members, uniform weights.
* **DeepStack inside the LLM** (stage "llm"): after a stage has shortened the sequence, the adapter's wrapper of the
  text model's ``_deepstack_process`` (installed while an LLM-stage method is, :meth:`llm_runner_hooks`) adds each
  level only at the visual tokens still present, each the row of the position it sits at (a token merged inside the
  LLM: its representative's). This is exactly the stock model with the removed tokens hidden as keys from the stage
  layer on (the LLM stage's reference semantics, tests/test_llm_stage.py), where every surviving position receives
  its own rows.
* **Positions**: the model's own ``get_rope_index`` on the full sequence (or the caller's ``position_ids``); each
  kept token keeps the placeholder slot of its representative (``CompressOutput.index``) — so a kept video token
  stays after its own timestamp — and therefore its column: kept columns are gathered, never re-derived. Passed as
  ``[4, B, L']`` position ids (row 0: contiguous text positions for the causal mask), ``model.model.rope_deltas``
  = ``max position + 1 - kept length`` per sample, as the model defines it, so decoding continues where the
  uncompressed model would. ``mm_token_type_ids`` is shortened with ``input_ids``; grids and pixels are dropped
  (the features go in as ``mm_encoder_outputs``, DeepStack rows included).

Stage "input" (``input_reductions``):

* ``"resolution"`` (images): each image's patches resampled to a smaller grid, as on Qwen2-VL
  (:mod:`tokenzip.adapters.resample`; the ViT interpolates its learned position embeddings to any grid); the model
  computes the new sequence's positions. Clips pass through.
* ``"frames"`` (clips, :class:`tokenzip.base.FrameSelector`): whole temporal grids are kept
  (:mod:`tokenzip.adapters.temporal_grids`, shared with Qwen2-VL: one RGB frame per grid, un-normalised with the
  video processor's ImageNet-standard mean/std; the kept grids' patch rows and ``video_grid_thw``). Qwen3-VL carries
  time in the TEXT (the temporal M-RoPE index is 0 in every grid block), so a dropped grid's whole block leaves the
  prompt: its timestamp, ``<vision_start>``, placeholders and ``<vision_end>``
  (:func:`~tokenzip.adapters.temporal_grids.timestamped_block_spans` delimits them, also where the 5.25 processor
  collapsed the template's outer pair). The call is then exactly what the processor gives a clip of the kept frames
  (each kept grid after its own timestamp), and the model computes its positions (the caller's ``position_ids`` are
  those of the old sequence and are dropped; ``get_rope_index`` needs ``mm_token_type_ids``, shortened with the
  prompt). The removed text is recorded per item (``InputItem.text_removed`` -> ``ItemStats.text_removed``). Images
  pass through; the call still carries pixels, so a pre-LLM or LLM-stage method can follow in ``tz.compose``.

Stage "encoder" (``tz.InEncoder(method, layer=L)`` or a schedule of cuts; DeepStack reads intermediate blocks, so
every cut carries the taps):

* **The unit is one merge unit** (2x2 patches = one LLM token, as on Qwen2-VL): the method compresses, per image /
  clip, its units' four patch states after block ``L - 1`` concatenated (``[N, 4 * D]``, layout as before the LLM);
  a kept unit keeps its patches, merged units are averaged patch by patch (size-weighted,
  :class:`tokenzip.encoder.MergedTokens`). The vision attention takes no mask, so there is no proportional
  attention: a merged unit is a plain average in the later blocks (as on Qwen2-VL).
* **The model's own pass up to the cut**: ``visual(...)`` runs as ``get_image_features`` calls it and is stopped
  after block ``L - 1`` (a forward hook); block 0's inputs give the per-patch rotary embedding. The blocks after the
  cut are the model's block modules, called as the model calls them, on the kept units in the model's unit order
  (a merged unit at its representative's place: its rotary embedding and frame), with one attention segment per
  temporal grid recomputed from the units left, then the model's merger; the rows are put back in the method's
  slot order.
* **DeepStack taps**: a level tapped after block ``b <= L - 1`` is computed by the model on all units (its own
  ``deepstack_merger_list`` module, at the stopped pass or on the cut's states) and cut with the tokens' groups as
  before the LLM (:meth:`_deepstack_rows`); a level tapped after block ``b >= L`` is that merger on the kept units
  after block ``b``. So every level has one row per kept token, what the text model adds at the kept placeholders.
* **Schedules** (``layer=(l1, l2, ...)``): the model's pass stops after block ``l1 - 1``; at each earlier cut the
  InEncoder's step compresses the units of the modalities it takes (``step.counts``: each item reaches its budget
  at the last cut), every level tapped so far is cut like the units (size-weighted group means: a level tapped
  before several merges is the mean over all the input units a token stands for), and the blocks to the next cut
  run on the units left (taps in the span: the mergers on them). After the first cut a method sees a 1-D layout;
  each token keeps the placeholder of the original unit it stands at (``_kept_slots``).
* **Signals** from block ``L - 1`` (the one that made the units): ``keys`` and ``cls_attention`` as at the ViT's
  output; ``text``/``text_mask``. Not ``projected`` (the merger needs the last block's output).
* Positions, ``rope_deltas`` and the prompt as before the LLM (a token sits at its representative unit's slot).

Stages: ``input``, ``pre_llm``, ``encoder`` and ``llm``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures
from transformers.utils.generic import get_max_seqlen

from .. import layout as L
from ..callstate import per_call
from ..compat import cache_from
from ..encoder import MergedTokens, check_cuts
from ..llm.adapter import LLMAccess, placeholder_items
from ..output import CompressOutput
from . import positions as P
from . import resample
from . import temporal_grids as TG
from .attention import ATTENTION_SIGNALS
from .base import Adapter, Item, ModelParts
from .placeholders import (
    check_grid,
    items_per_sample,
    pad_id_for,
    padding_side,
    require_input_ids,
    shrink_sequences,
    text_signals,
)
from .probe import VisionBlockProbe


class _DeepstackWrapper:
    """Stage "llm": while an LLM-stage runner is installed, the text model's ``_deepstack_process`` adds each level
    only at the visual tokens still present in the shortened sequence (module doc). ``remove()`` restores it."""

    def __init__(self, text_model: torch.nn.Module, runner: Any):
        self.text_model, self.runner = text_model, runner
        self.original = text_model._deepstack_process
        text_model._deepstack_process = self  # an instance attribute: the class method is untouched

    def __call__(self, hidden: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor):
        pos = self.runner.current_positions()
        if pos is None:  # full length: the model's own step
            return self.original(hidden, visual_pos_masks, visual_embeds)
        mask = visual_pos_masks.to(pos.device)
        row_of = (mask.flatten().long().cumsum(0) - 1).view(mask.shape)  # each visual position's row in the level
        safe = pos.clamp(min=0)
        present = (pos >= 0) & torch.gather(mask, 1, safe)
        rows = torch.gather(row_of, 1, safe)[present]
        return self.original(hidden, present, visual_embeds[rows.to(visual_embeds.device)])

    def remove(self) -> None:
        self.text_model.__dict__.pop("_deepstack_process", None)


class _AtCut(Exception):
    """Stops the model's own ViT pass after the block before the cut (stage "encoder")."""


@dataclass
class _VitPass:
    """One modality's ViT pass from the first cut to rebuild() (stage "encoder"): the blocks' rotary embedding
    ``pe`` (per patch) and each global unit's ``frame`` (its attention segment); per item its units' ``states``, the
    global unit each current unit stands at (``ids``: a merged unit at its representative) and its first global
    unit (``offsets``); ``levels[j]``: the DeepStack level ``j`` rows tapped so far, per item over its current
    units."""

    pe: tuple[torch.Tensor, torch.Tensor]
    frame: torch.Tensor
    cu_dtype: torch.dtype
    states: list[MergedTokens]
    ids: list[torch.Tensor]
    offsets: list[int]
    levels: dict[int, list[torch.Tensor]] = field(default_factory=dict)


class Qwen3VLAdapter(LLMAccess, Adapter):
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    modalities = ("image", "video")
    # per-call state, per thread (tokenzip/callstate.py)
    _call_grids = per_call(factory=dict)
    _tower = per_call(factory=dict)  # stage "encoder": each modality's ViT pass between the cut and rebuild()
    stages = ("pre_llm", "encoder", "llm")
    signals = frozenset({"cls_attention", "keys", "projected", "text", "text_mask"})
    # inside the ViT the merger has not run yet: no ``projected``
    encoder_signals = frozenset({"cls_attention", "keys", "text", "text_mask"})

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.core = model.model
        self.visual = self.core.visual
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        self.video_token_id = int(cfg.video_token_id)
        self.token_of = {"image": self.image_token_id, "video": self.video_token_id}
        self.merge = int(cfg.vision_config.spatial_merge_size)
        self._call_grids: dict[str, torch.Tensor] = {}  # the outermost call's grids (begin_call)
        self.cuts: tuple[int, ...] | None = None  # stage "encoder": compress after these numbers of vision blocks
        self.step: Any = None  # a schedule's compression at the cuts before the last
        self._tower: dict[str, _VitPass] = {}

    # ---- queries ------------------------------------------------------------------------------------------------
    def parts(self) -> ModelParts:
        lm = self.core.language_model
        return ModelParts(encoder=self.visual, encoder_layers=self.visual.blocks, projector=self.visual.merger,
                          language_model=lm, decoder_layers=lm.layers, final_norm=lm.norm,
                          embed=self.core.get_input_embeddings(), media_token_ids=dict(self.token_of))

    def has_media(self, kwargs: dict[str, Any]) -> bool:
        return kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None

    def batch_size(self, kwargs: dict[str, Any]) -> int:
        return require_input_ids(kwargs).shape[0]

    def _grid(self, kwargs: dict[str, Any], modality: str = "image") -> torch.Tensor | None:
        pixels, key = ("pixel_values", "image_grid_thw") if modality == "image" else \
            ("pixel_values_videos", "video_grid_thw")
        if kwargs.get(pixels) is None:
            return None
        grid = check_grid(kwargs.get(key), key, pixels, modality, self.merge, "Qwen3-VL",
                          "or tokenzip.video.qwen3_vl_video_inputs for videos")
        if int(grid.prod(-1).sum()) != kwargs[pixels].shape[0]:
            raise ValueError(f"{pixels} has {kwargs[pixels].shape[0]} patches but {key} {grid.tolist()} needs "
                             f"{int(grid.prod(-1).sum())}")
        return grid

    def _layout(self, t: int, h: int, w: int, modality: str = "image") -> L.Layout:
        m = self.merge
        return L.Layout([L.Segment("image" if modality == "image" and t == 1 else "frames", t, h // m, w // m)])

    # ---- encode -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, kwargs: dict[str, Any], needs: frozenset[str]) -> list[Item]:
        input_ids = require_input_ids(kwargs)
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError("pass either pixel_values/pixel_values_videos or mm_encoder_outputs, not both (the model "
                             "refuses both)")
        cache = cache_from(kwargs)
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            raise ValueError("tokenzip compresses media at prefill only: pixels came with a non-empty cache (a "
                             "continued conversation); start from an empty cache")
        items: list[Item] = []
        for modality in ("image", "video"):
            grid = self._grid(kwargs, modality)
            if grid is not None:
                items += self._encode_modality(kwargs, needs, modality, grid)
        starts = self._starts(input_ids, [(it.modality, it.sample, it.tokens_in) for it in items])
        return [items[i] for i in sorted(range(len(items)), key=lambda i: starts[i])]

    def _starts(self, input_ids: torch.Tensor, items: list[tuple[str, int, int]]) -> list[tuple[int, int]]:
        """``(sample, first placeholder position)`` of each ``(modality, sample, n)`` item, items of one modality
        in order."""
        where = {(m, b): (input_ids[b] == self.token_of[m]).nonzero().flatten()
                 for m in self.token_of for b in range(input_ids.shape[0])}
        cursor: dict[tuple[str, int], int] = {}
        out = []
        for m, b, n in items:
            c = cursor.get((m, b), 0)
            out.append((b, int(where[(m, b)][c])))
            cursor[(m, b)] = c + n
        return out

    def _encode_modality(self, kwargs: dict[str, Any], needs: frozenset[str], modality: str,
                         grid: torch.Tensor) -> list[Item]:
        input_ids = kwargs["input_ids"]
        unit = self.merge * self.merge
        sizes = [int(s) for s in (grid.prod(-1) // unit).tolist()]
        owner = items_per_sample(input_ids, self.token_of[modality], sizes, modality)
        if self.cuts is not None:
            return self._encode_in_vit(kwargs, needs, modality, grid, sizes, owner)
        pixels = kwargs["pixel_values" if modality == "image" else "pixel_values_videos"]
        probe = VisionBlockProbe(self.visual.blocks[-1].attn, needs & ATTENTION_SIGNALS)
        features = self.core.get_image_features if modality == "image" else self.core.get_video_features
        out = probe.run(lambda: features(pixels, grid.to(pixels.device), return_dict=True))
        # per patch (merge-group order) -> per LLM token: mean over the four patches of each group
        grouped = {name: t.reshape(t.shape[0] // unit, unit, *t.shape[1:]).mean(dim=1)
                   for name, t in (("cls_attention", probe.received), ("keys", probe.keys)) if t is not None}
        if "cls_attention" in grouped:  # sum over a segment's queries -> mean over them (one segment per grid)
            per_frame = (grid[:, 1] * grid[:, 2]).repeat_interleave(torch.tensor(sizes, device=grid.device))
            grouped["cls_attention"] = grouped["cls_attention"] / per_frame.to(grouped["cls_attention"])
        deepstack = [list(level) for level in out.deepstack_features]
        items, start = [], 0
        for i, (t, h, w) in enumerate(grid.tolist()):
            n = sizes[i]
            tokens = out.pooler_output[i]
            sig = {name: s[start: start + n] for name, s in grouped.items()}
            if "projected" in needs:
                sig["projected"] = tokens
            if "text" in needs or "text_mask" in needs:
                sig.update(text_signals(self.core.get_input_embeddings(), input_ids, kwargs.get("attention_mask"),
                                        set(self.token_of.values()), owner[i]))
            items.append(Item(modality, owner[i], tokens, self._layout(t, h, w, modality), sig,
                              extra={"deepstack": [level[i] for level in deepstack]}))
            start += n
        return items

    # ---- rebuild ------------------------------------------------------------------------------------------------
    def _original_positions(self, kwargs: dict[str, Any]) -> torch.Tensor:
        """``[4, B, L]`` position ids of the uncompressed call: the caller's 3- or 4-row ids, else the installed
        model's own ``get_rope_index`` (rows 1-3) under a contiguous text row."""
        input_ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        real = torch.ones_like(input_ids) if mask is None else mask
        pos = kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor):
            if pos.dim() == 3 and pos.shape[0] in (3, 4) and pos.shape[1:] == input_ids.shape:
                return pos if pos.shape[0] == 4 else torch.cat([P.text_row(real, pos.dtype).unsqueeze(0), pos])
            raise ValueError(f"position_ids must be [3, B, L] or [4, B, L] (M-RoPE) for input_ids of shape "
                             f"{tuple(input_ids.shape)}, got {tuple(pos.shape)}")
        if kwargs.get("mm_token_type_ids") is None:
            raise ValueError("mm_token_type_ids is required with pixel_values/pixel_values_videos for Qwen3-VL (the "
                             "3-D M-RoPE positions need it); the model's processor returns it with input_ids")
        rope, _ = self.core.get_rope_index(input_ids, kwargs["mm_token_type_ids"],
                                           image_grid_thw=kwargs.get("image_grid_thw"),
                                           video_grid_thw=kwargs.get("video_grid_thw"), attention_mask=mask)
        return torch.cat([P.text_row(real, rope.dtype).unsqueeze(0), rope], dim=0)

    def _keep_mask(self, input_ids: torch.Tensor, items: list[Item], outputs: list[CompressOutput]) -> torch.Tensor:
        """Text is kept; each item keeps the placeholders at its output tokens' representatives (``index``)."""
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        for token in self.token_of.values():
            keep &= input_ids != token
        cursor: dict[tuple[str, int], int] = {}
        where = {(m, b): (input_ids[b] == t).nonzero().flatten() for m, t in self.token_of.items()
                 for b in range(input_ids.shape[0])}
        nth: dict[str, int] = {}
        for item, out in zip(items, outputs):
            key = (item.modality, item.sample)
            c = cursor.get(key, 0)
            slots = where[key][c: c + item.tokens_in]
            i = nth.get(item.modality, 0)
            keep[item.sample, slots[self._kept_slots(item, out, i).to(slots.device)]] = True
            cursor[key] = c + item.tokens_in
            nth[item.modality] = i + 1
        return keep

    @staticmethod
    def _deepstack_rows(rows: torch.Tensor, out: CompressOutput, size: torch.Tensor | None = None) -> torch.Tensor:
        """A level's rows ``[N, D]`` cut like the main tokens: per output token the mean of its source group's rows,
        weighted by ``size`` (the input tokens each row already stands for; None: 1 each) — a kept token's own row
        exactly; a slot with no member: its representative's row."""
        k = out.tokens.shape[1]
        src = out.source[0].to(rows.device)
        valid = src >= 0
        weight = torch.ones(int(valid.sum()), dtype=rows.dtype, device=rows.device) if size is None \
            else size.to(device=rows.device, dtype=rows.dtype)[valid]
        sums = torch.zeros(k, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(
            0, src[valid], rows[valid] * weight[:, None] if size is not None else rows[valid])
        count = torch.zeros(k, dtype=rows.dtype, device=rows.device).index_add_(0, src[valid], weight)
        own = rows[out.index[0].to(rows.device)]
        return torch.where(count[:, None] > 0, sums / count.clamp(min=1e-12)[:, None], own)

    def rebuild(self, kwargs: dict[str, Any], items: list[Item], outputs: list[CompressOutput]) -> dict[str, Any]:
        input_ids = kwargs["input_ids"]
        positions = self._original_positions(kwargs)
        keep = self._keep_mask(input_ids, items, outputs)
        call = {key: v for key, v in kwargs.items() if key != "position_ids"}
        new = shrink_sequences(call, keep, pad_id_for(self.model.config, set(self.token_of.values())))
        mask = kwargs.get("attention_mask")
        valid = keep & (torch.ones_like(keep) if mask is None else mask.bool())
        new_pos = P.pack(positions, valid, padding_side(mask), new["input_ids"].shape[1])
        new_mask = new["attention_mask"]
        new_pos[0] = P.text_row(new_mask, new_pos.dtype)  # row 0 only builds the causal mask
        self.core.rope_deltas = P.rope_deltas(new_pos[1:], new_mask)
        new["position_ids"] = new_pos
        encoded: dict[str, Any] = {}
        for modality in ("image", "video"):
            pairs = [(it, out) for it, out in zip(items, outputs) if it.modality == modality]
            if not pairs:
                continue
            if self.cuts is not None:  # the blocks after the cut, the merger and the DeepStack taps (stage "encoder")
                feats, levels = self._finish_vit(modality, [out for _, out in pairs])
                encoded[modality] = BaseModelOutputWithDeepstackFeatures(pooler_output=feats,
                                                                         deepstack_features=levels)
                continue
            levels = len(pairs[0][0].extra["deepstack"])
            encoded[modality] = BaseModelOutputWithDeepstackFeatures(
                pooler_output=tuple(out.tokens[0] for _, out in pairs),
                deepstack_features=[tuple(self._deepstack_rows(it.extra["deepstack"][j], out) for it, out in pairs)
                                    for j in range(levels)])
        for key in ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw"):
            new.pop(key, None)
        new["mm_encoder_outputs"] = encoded
        return new

    # ---- stage "encoder": compress merge units between vision blocks, DeepStack taps carried (module doc) --------
    def encoder_depth(self) -> int:
        """The vision blocks (``tz.InEncoder`` layer forms resolve against it)."""
        return len(self.visual.blocks)

    def set_encoder_layer(self, layer: int | tuple[int, ...], step: Any = None) -> None:
        cuts = check_cuts(layer, len(self.visual.blocks))  # ValueError naming the valid cuts
        if len(cuts) > 1 and step is None:
            raise ValueError("a schedule of encoder cuts needs a compression step for the intermediate cuts")
        self.cuts, self.step = cuts, step

    @torch.no_grad()
    def _encode_in_vit(self, kwargs: dict[str, Any], needs: frozenset[str], modality: str, grid: torch.Tensor,
                       sizes: list[int], owner: list[int]) -> list[Item]:
        """The model's own ViT pass of the modality, stopped after block ``cuts[0] - 1`` (its rotary embedding and
        segments, the DeepStack levels tapped so far), then, for a schedule, each earlier cut's compression and the
        blocks to the next cut; one item per image / clip whose tokens are its merge units at the last cut (the
        unit's four patch states concatenated)."""
        visual, cut = self.visual, self.cuts[0]
        pixels = kwargs["pixel_values" if modality == "image" else "pixel_values_videos"]
        box: dict[str, Any] = {}
        taps: dict[int, torch.Tensor] = {}
        index = [int(i) for i in visual.deepstack_visual_indexes]

        def first(module: torch.nn.Module, args: tuple, kw: dict) -> None:
            box["pe"] = kw.get("position_embeddings", args[2] if len(args) > 2 else None)
            box["cu"] = kw.get("cu_seqlens", args[1] if len(args) > 1 else None)

        def stop(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            box["hidden"] = out
            raise _AtCut

        def tap(level: int) -> Any:
            return lambda module, args, out: taps.__setitem__(level, out)

        probe = VisionBlockProbe(visual.blocks[cut - 1].attn, needs & ATTENTION_SIGNALS)
        handles = [visual.blocks[0].register_forward_pre_hook(first, with_kwargs=True),
                   visual.blocks[cut - 1].register_forward_hook(stop)]
        handles += [visual.deepstack_merger_list[j].register_forward_hook(tap(j))
                    for j, b in enumerate(index) if b < cut - 1]
        if probe.needs:
            handles.append(probe.attn.register_forward_pre_hook(probe.hook, with_kwargs=True))
        try:
            visual(pixels.type(visual.dtype), grid_thw=grid.to(pixels.device))
        except _AtCut:
            pass
        finally:
            for h in handles:
                h.remove()
        hidden = box["hidden"]
        for j, b in enumerate(index):
            if b == cut - 1:  # the tap of the block that made the units: the model's own merger on them
                taps[j] = visual.deepstack_merger_list[j](hidden)
        unit = self.merge * self.merge
        units = hidden.view(-1, unit * hidden.shape[-1]).split(sizes)
        grouped = {name: t.reshape(t.shape[0] // unit, unit, *t.shape[1:]).mean(dim=1)
                   for name, t in (("cls_attention", probe.received), ("keys", probe.keys)) if t is not None}
        if "cls_attention" in grouped:  # sum over a segment's queries -> mean over them (one segment per grid)
            per_frame = (grid[:, 1] * grid[:, 2]).repeat_interleave(torch.tensor(sizes, device=grid.device))
            grouped["cls_attention"] = grouped["cls_attention"] / per_frame.to(grouped["cls_attention"])
        per_frame_units = (grid[:, 1] * grid[:, 2] // unit).repeat_interleave(grid[:, 0]).to(hidden.device)
        frame = torch.arange(per_frame_units.shape[0], device=hidden.device).repeat_interleave(per_frame_units)
        offsets = torch.tensor([0, *sizes], device=hidden.device).cumsum(0)[:-1].tolist()
        run = _VitPass(pe=box["pe"], frame=frame, cu_dtype=box["cu"].dtype,
                       states=[MergedTokens.start(u.unsqueeze(0)) for u in units],
                       ids=[torch.arange(o, o + n, device=hidden.device) for o, n in zip(offsets, sizes)],
                       offsets=offsets, levels={j: list(rows.split(sizes)) for j, rows in taps.items()})
        self._tower[modality] = run
        text = [text_signals(self.core.get_input_embeddings(), kwargs["input_ids"], kwargs.get("attention_mask"),
                             set(self.token_of.values()), owner[i]) if {"text", "text_mask"} & needs else {}
                for i in range(len(sizes))]
        signals = [{name: t[o: o + n] for name, t in grouped.items()} for o, n in zip(offsets, sizes)]
        layouts = [self._layout(t, h, w, modality) for t, h, w in grid.tolist()]
        takes = self.step is not None and modality in (getattr(self.step, "modalities", None) or (modality,))
        counts = [self.step.counts(n, len(self.cuts)) for n in sizes] if len(self.cuts) > 1 and takes else None
        for j in range(1, len(self.cuts)):  # a schedule's earlier cuts: each item a little, then the next span
            if counts is not None:
                for i in range(len(sizes)):
                    sig = {name: v.unsqueeze(0) for name, v in {**signals[i], **text[i]}.items()}
                    out = self.step(run.states[i].hidden, counts[i][j - 1], layouts[i], sig)
                    self._carry(run, i, out)
                    layouts[i] = L.grid(1, out.tokens.shape[1])  # the kept units no longer tile the grid
            signals = self._vit_span(run, self.cuts[j - 1], self.cuts[j], needs)
        items = []
        for i in range(len(sizes)):
            extra: dict[str, Any] = {"tokens_in": sizes[i]}
            if counts is not None:  # a schedule: the last cut reaches each item's budget
                extra["k"] = counts[i][-1]
            items.append(Item(modality, owner[i], run.states[i].hidden[0], layouts[i], {**signals[i], **text[i]},
                              extra=extra))
        return items

    def _carry(self, run: "_VitPass", i: int, out: CompressOutput) -> None:
        """Item ``i`` of ``run`` after one compression of its units: its DeepStack rows cut like its units
        (size-weighted), its units' states (:meth:`MergedTokens.after`) and their representatives' global ids."""
        size = run.states[i].size[0]
        for rows in run.levels.values():
            rows[i] = self._deepstack_rows(rows[i], out, size)
        run.states[i] = run.states[i].after([out])
        run.ids[i] = run.ids[i][out.index[0].to(run.ids[i].device)]

    def _vit_span(self, run: "_VitPass", start: int, stop: int, needs: frozenset[str] | None
                  ) -> list[dict[str, torch.Tensor]]:
        """Blocks ``start .. stop - 1`` on every item's current units (one pass, as the model runs a modality): the
        units in the model's order (by global unit id), each at its representative's rotary embedding and frame, one
        attention segment per temporal grid of the units left; the DeepStack levels tapped in the span (the model's
        mergers on the units); states updated in place, in each item's slot order. With ``needs``: each item's
        signals of block ``stop - 1``."""
        visual = self.visual
        unit = self.merge * self.merge
        ids = torch.cat(run.ids)
        patches = torch.cat([st.hidden[0] for st in run.states])
        order = torch.argsort(ids, stable=True)
        restore = torch.argsort(order)
        kept = ids[order]
        d = patches.shape[-1] // unit
        x = patches[order].reshape(-1, d)
        cos, sin = run.pe
        pe = tuple(t.view(-1, unit, t.shape[-1])[kept].flatten(0, 1) for t in (cos, sin))
        _, per_frame = torch.unique_consecutive(run.frame[kept], return_counts=True)
        cu = torch.nn.functional.pad((per_frame * unit).cumsum(0), (1, 0)).to(run.cu_dtype)
        index = [int(i) for i in visual.deepstack_visual_indexes]
        split = [int(i.numel()) for i in run.ids]
        probe = VisionBlockProbe(visual.blocks[stop - 1].attn, (needs or frozenset()) & ATTENTION_SIGNALS)
        handle = probe.attn.register_forward_pre_hook(probe.hook, with_kwargs=True) if probe.needs else None
        try:
            for b in range(start, stop):
                x = visual.blocks[b](x, cu_seqlens=cu, max_seqlen=get_max_seqlen(cu, visual.config),
                                     position_embeddings=pe)
                if b in index:
                    run.levels[index.index(b)] = list(visual.deepstack_merger_list[index.index(b)](x)[restore]
                                                      .split(split))
        finally:
            if handle is not None:
                handle.remove()
        for st, rows in zip(run.states, x.view(-1, unit * d)[restore].split(split)):
            st.hidden = rows.unsqueeze(0).to(st.hidden.dtype)
        if needs is None:
            return []
        grouped = {name: t.reshape(t.shape[0] // unit, unit, *t.shape[1:]).mean(dim=1)[restore]
                   for name, t in (("cls_attention", probe.received), ("keys", probe.keys)) if t is not None}
        if "cls_attention" in grouped:  # mean over the patch queries of the unit's segment (its frame's units left)
            _, where, count = torch.unique(run.frame[ids], return_inverse=True, return_counts=True)
            grouped["cls_attention"] = grouped["cls_attention"] / (unit * count[where]).to(grouped["cls_attention"])
        parts = {name: t.split(split) for name, t in grouped.items()}
        return [{name: parts[name][i] for name in parts} for i in range(len(split))]

    def _kept_slots(self, item: Item, out: CompressOutput, i: int) -> torch.Tensor:
        """The placeholders (within the item's run) of ``out``'s tokens: its representatives' (``index``); after a
        schedule of cuts, the original units they stand at."""
        run = self._tower.get(item.modality) if self.cuts is not None else None
        if run is None:
            return out.index[0]
        return run.ids[i][out.index[0].to(run.ids[i].device)] - run.offsets[i]

    @torch.no_grad()
    def _finish_vit(self, modality: str, outputs: list[CompressOutput]
                    ) -> tuple[tuple[torch.Tensor, ...], list[tuple[torch.Tensor, ...]]]:
        """The blocks after the last cut on every item's kept/merged units (:meth:`_vit_span`), the merger, and every
        DeepStack level (tapped before the cut: cut like the tokens; after it: on the kept units). Per item its
        tokens and rows in the method's slot order."""
        run = self._tower[modality]
        for i, out in enumerate(outputs):
            self._carry(run, i, out)
        self._vit_span(run, self.cuts[-1], len(self.visual.blocks), None)
        d = run.states[0].hidden.shape[-1] // (self.merge * self.merge)
        feats = tuple(self.visual.merger(st.hidden[0].reshape(-1, d)) for st in run.states)
        levels = [tuple(run.levels[j]) for j in range(len(self.visual.deepstack_visual_indexes))]
        return feats, levels

    # ---- stage "input": images resized to a smaller grid ("resolution", adapters/resample.py, as on Qwen2-VL) and
    # fewer temporal grids of each clip ("frames", adapters/temporal_grids.py; the dropped grids' timestamped blocks
    # leave the prompt whole: module doc)
    input_reductions = ("resolution", "frames")
    # Qwen3VLVideoProcessor's normalisation (ImageNet-standard 0.5 mean/std, rescale 1/255)
    video_pixel_mean: tuple[float, float, float] = tuple(IMAGENET_STANDARD_MEAN)
    video_pixel_std: tuple[float, float, float] = tuple(IMAGENET_STANDARD_STD)

    def input_plan(self, kwargs: dict[str, Any], reduction: str) -> list:
        input_ids = require_input_ids(kwargs)
        if reduction not in self.input_reductions:
            raise TypeError(self._no_input_stage(reduction))
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError("pass either pixel_values/pixel_values_videos or mm_encoder_outputs, not both (the model "
                             "refuses both)")
        if reduction == "resolution":  # images only (clips pass through)
            return [] if kwargs.get("pixel_values") is None else resample.qwen_input_plan(self, kwargs, reduction)
        grid = self._grid(kwargs, "video")
        if grid is None:
            return []
        return TG.frames_plan(input_ids, TG.clip_rows(kwargs["pixel_values_videos"], grid), grid, self.video_token_id,
                              resample.qwen_patch_spec(self), self.video_pixel_mean, self.video_pixel_std,
                              lambda t, h, w: self._layout(t, h, w, "video"))

    @torch.no_grad()
    def rescale_inputs(self, kwargs: dict[str, Any], reduction: str, items: list, targets: list[int]
                       ) -> tuple[dict[str, Any], list]:
        if reduction == "resolution":
            return resample.qwen_rescale_inputs(self, kwargs, items, targets)
        if reduction != "frames":
            raise TypeError(self._no_input_stage(reduction))
        grid = self._grid(kwargs, "video")
        kept = TG.keep_grids(items, targets, TG.clip_rows(kwargs["pixel_values_videos"], grid), self.merge)
        input_ids = kwargs["input_ids"]
        cfg = self.model.config
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        for it, slots, grids in zip(items, TG.slots_of(input_ids, self.video_token_id, items), kept.kept):
            it.text_removed = 0
            if bool(grids.all()):
                continue
            spans = TG.timestamped_block_spans(input_ids[it.sample], slots, grids.numel(),
                                               int(cfg.vision_start_token_id), int(cfg.vision_end_token_id))
            per_grid = it.tokens // grids.numel()
            for g in (~grids).nonzero().flatten().tolist():
                keep[it.sample, spans[g][0]: spans[g][1]] = False
                it.text_removed += spans[g][1] - spans[g][0] - per_grid
        # a prompt of the kept grids, each after its own timestamp: the model computes its positions (the caller's
        # are those of the old sequence)
        call = {key: v for key, v in kwargs.items() if key != "position_ids"}
        new = shrink_sequences(call, keep, pad_id_for(cfg, set(self.token_of.values())))
        new["pixel_values_videos"] = kept.pixels
        new["video_grid_thw"] = torch.tensor(kept.grid, dtype=grid.dtype, device=grid.device)
        return new, kept.maps

    # ---- stage "llm" (tokenzip.llm) -----------------------------------------------------------------------------
    def llm_items(self, kwargs: dict[str, Any]) -> list:
        """Each image's placeholder run and each clip's placeholders (all its temporal grids), in sequence order:
        after a pre-LLM method the precomputed features' lengths (no layout), else the grids."""
        input_ids = require_input_ids(kwargs)
        pre = kwargs.get("mm_encoder_outputs") or {}
        found = []
        for modality in ("image", "video"):
            if pre.get(modality) is not None:
                sizes, grids = [int(t.shape[0]) for t in pre[modality].pooler_output], None
                grid = self._grid(kwargs, modality)
                if grid is None:
                    grid = self._call_grids.get(modality)
                # generate() encodes the media once and passes the features precomputed (without the grids): while
                # they are whole (no pre-LLM method ran), the items keep the outer call's layout, so a method reads
                # the same grids in forward() and in generate()
                if grid is not None and sizes == [int(t * h * w) // (self.merge ** 2) for t, h, w in grid.tolist()]:
                    grids = [self._layout(t, h, w, modality) for t, h, w in grid.tolist()]
            else:
                grid = self._grid(kwargs, modality)
                if grid is None:
                    continue
                sizes = [int(t * h * w) // (self.merge ** 2) for t, h, w in grid.tolist()]
                grids = [self._layout(t, h, w, modality) for t, h, w in grid.tolist()]
            owners = items_per_sample(input_ids, self.token_of[modality], sizes, modality)
            found += placeholder_items(input_ids, self.token_of[modality], sizes, owners, modality, grids)
        return sorted(found, key=lambda it: (it.sample, int(it.positions[0]) if it.positions.numel() else -1))

    def begin_call(self, kwargs: dict[str, Any]) -> None:
        self._call_grids = {m: g for m in ("image", "video") if (g := self._grid(kwargs, m)) is not None}

    def release(self) -> None:
        self._call_grids = {}
        self._tower = {}

    def llm_runner_hooks(self, runner: Any) -> list[Any]:
        """Called by the LLM-stage runner when it installs: DeepStack follows the runner's shortened sequence
        (module doc). Returns handles the runner removes with its own."""
        return [_DeepstackWrapper(self.core.language_model, runner)]

