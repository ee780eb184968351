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
* **DeepStack inside the LLM** (stage "llm"): after a stage has shortened the sequence,
  :class:`tokenzip.adapters.deepstack.DeepstackFollower` (shared with Qwen3-Omni; installed while an LLM-stage method
  is, :meth:`llm_runner_hooks`) adds each level only at the visual tokens still present, each the row of the position
  it sits at (a token merged inside the LLM: its representative's). This is exactly the stock model with the removed
  tokens hidden as keys from the stage layer on (the LLM stage's reference semantics, tests/test_llm_stage.py),
  where every surviving position receives its own rows.
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
  prompt: its timestamp, ``<vision_start>``, placeholders and ``<vision_end>`` (the adapter's span finder,
  :func:`~tokenzip.adapters.temporal_grids.leading_timestamp_spans`, delimits them, also where the 5.25 processor
  collapsed the template's outer pair). The call is then exactly what the processor gives a clip of the kept frames
  (each kept grid after its own timestamp), and the model computes its positions (the caller's ``position_ids`` are
  those of the old sequence and are dropped; ``get_rope_index`` needs ``mm_token_type_ids``, shortened with the
  prompt). The removed text is recorded per item (``InputItem.text_removed`` -> ``ItemStats.text_removed``). Images
  pass through; the call still carries pixels, so a pre-LLM or LLM-stage method can follow in ``tz.compose``.

Stage "encoder" (``tz.InEncoder(method, layer=L)`` or a schedule of cuts): :mod:`tokenzip.adapters.merge_unit_vit`,
shared with Qwen3.5 and GLM-4.1V (the unit is one merge unit, its four patch states after block ``L - 1``
concatenated; the model's own pass stopped after block ``L - 1``; the model's later blocks on the kept units, one
attention segment per temporal grid, then the merger; signals ``keys`` / ``cls_attention`` of block ``L - 1``,
``text`` / ``text_mask``, no ``projected``). What is particular here: **DeepStack taps** (the ViT's intermediate
taps, ``_vision_taps``): a level tapped after block ``b <= L - 1`` is computed by the model on all units (its own
``deepstack_merger_list`` module, at the stopped pass or on the cut's states) and cut with the tokens' groups as
before the LLM (:func:`~tokenzip.adapters.merge_unit_vit.cut_rows`); a level tapped after block ``b >= L`` is that
merger on the kept units after block ``b``. So every level has one row per kept token, what the text model adds at
the kept placeholders. In a schedule every level tapped so far is cut like the units at each cut (size-weighted
group means: a level tapped before several merges is the mean over all the input units a token stands for).
Positions, ``rope_deltas`` and the prompt as before the LLM (a token sits at its representative unit's slot).

Stages: ``input``, ``pre_llm``, ``encoder`` and ``llm``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from .. import layout as L
from ..callstate import per_call
from ..compat import cache_from
from ..llm.adapter import LLMAccess, placeholder_items
from ..output import CompressOutput
from . import positions as P
from . import resample
from . import temporal_grids as TG
from .attention import ATTENTION_SIGNALS
from .base import Adapter, Item, ModelParts
from .deepstack import DeepstackFollower
from .merge_unit_vit import ENCODER_SIGNALS, MergeUnitEncoderStage, VitPass, cut_rows
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


class Qwen3VLAdapter(MergeUnitEncoderStage, LLMAccess, Adapter):
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    family = "Qwen3-VL"  # for messages
    modalities = ("image", "video")
    # per-call state, per thread (tokenzip/callstate.py)
    _call_grids = per_call(factory=dict)
    stages = ("pre_llm", "encoder", "llm")
    signals = frozenset({"cls_attention", "keys", "projected", "text", "text_mask"})
    encoder_signals = ENCODER_SIGNALS  # inside the ViT the merger has not run yet: no ``projected``

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
        self._tower: dict[str, VitPass] = {}

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
                deepstack_features=[tuple(cut_rows(it.extra["deepstack"][j], out) for it, out in pairs)
                                    for j in range(levels)])
        for key in ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw"):
            new.pop(key, None)
        new["mm_encoder_outputs"] = encoded
        return new

    # ---- stage "encoder": compress merge units between vision blocks (adapters/merge_unit_vit.py), DeepStack taps
    # carried (module doc)
    def _vision_taps(self) -> list[tuple[int, torch.nn.Module]]:
        return [(int(b), m) for b, m in zip(self.visual.deepstack_visual_indexes, self.visual.deepstack_merger_list)]

    # ---- stage "input": images resized to a smaller grid ("resolution", adapters/resample.py, as on Qwen2-VL) and
    # fewer temporal grids of each clip ("frames", adapters/temporal_grids.py; the dropped grids' timestamped blocks
    # leave the prompt whole: module doc)
    input_reductions = ("resolution", "frames")
    # Qwen3VLVideoProcessor's normalisation (ImageNet-standard 0.5 mean/std, rescale 1/255)
    video_pixel_mean: tuple[float, float, float] = tuple(IMAGENET_STANDARD_MEAN)
    video_pixel_std: tuple[float, float, float] = tuple(IMAGENET_STANDARD_STD)
    frame_block_spans = TG.leading_timestamp_spans  # each grid's timestamp before its block (Qwen3VLProcessor)

    def input_plan(self, kwargs: dict[str, Any], reduction: str) -> list:
        require_input_ids(kwargs)
        if reduction not in self.input_reductions:
            raise TypeError(self._no_input_stage(reduction))
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError("pass either pixel_values/pixel_values_videos or mm_encoder_outputs, not both (the model "
                             "refuses both)")
        if reduction == "resolution":  # images only (clips pass through)
            return [] if kwargs.get("pixel_values") is None else resample.qwen_input_plan(self, kwargs, reduction)
        return TG.timestamped_frames_plan(self, kwargs)

    @torch.no_grad()
    def rescale_inputs(self, kwargs: dict[str, Any], reduction: str, items: list, targets: list[int]
                       ) -> tuple[dict[str, Any], list]:
        if reduction == "resolution":
            return resample.qwen_rescale_inputs(self, kwargs, items, targets)
        if reduction != "frames":
            raise TypeError(self._no_input_stage(reduction))
        return TG.timestamped_frames_call(self, kwargs, items, targets)

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
        return [DeepstackFollower(self.core.language_model, runner)]

