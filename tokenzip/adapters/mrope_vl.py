"""The shared machinery of the M-RoPE VLMs whose media reach the LLM as per-item feature tuples: Qwen3.5
(``adapters/qwen3_5.py``) and GLM-4.1V / 4.5V / 4.6V (``adapters/glm4v.py``).

What these models have in common (checked in the installed ``modeling_qwen3_5.py`` / ``modeling_glm4v.py``):

* a ViT over 3-D patches (``temporal_patch_size`` frames per patch) whose blocks take one fused ``qkv``, attention
  segments ``cu_seqlens`` of ONE temporal grid each and a 2-D rotary embedding; four consecutive patches (the
  model's ``get_vision_position_ids`` order) form one 2x2 merge group that becomes one LLM token;
* ``get_image_features`` / ``get_video_features`` return ``pooler_output`` as a tuple of per-image / per-clip
  tensors, and ``forward(mm_encoder_outputs={"image": ..., "video": ...})`` scatters them into the placeholders;
* a clip of ``t`` temporal grids is ``t`` placeholder blocks, one per temporal grid, each after its own timestamp
  text; ``get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask)`` splits the
  clip's grid per temporal grid and gives each block its own 3-D position block (``mm_token_type_ids``: 1 image,
  2 video).

Design (the adapters only say what differs: classes, placeholder ids, the LLM's layer kinds):

* **Items**: every image and every clip, in sequence order (sample, then first placeholder). One clip is one item
  over its ``t`` placeholder blocks; the timestamps and the begin/end markers are text and always stay. **Tokens**:
  the model's own ``pooler_output`` of the item (what the model scatters into the placeholders). **Layout**:
  ``image(1, h/2, w/2)`` per image, ``frames(t, h/2, w/2)`` per clip (one frame = one temporal grid).
* **Signals**: ``projected`` (the tokens), ``text`` / ``text_mask`` (the prompt's text-token embeddings:
  placeholders and padding excluded), and from the LAST vision block, recomputed from its own fused ``qkv`` and the
  rotary embedding it is given (:class:`tokenzip.adapters.probe.VisionBlockProbe`; the model keeps its attention
  kernel): ``keys`` (before rotary, mean over heads, then over the 2x2 merge group) and ``cls_attention`` (there is
  no CLS token: the attention each patch receives from the queries of its own segment, one temporal grid, mean over
  heads and over those queries, then over the merge group).
* **Positions**: never re-derived. The model's own ``get_rope_index`` runs on the FULL sequence (or the caller's
  ``position_ids`` are taken), and every kept placeholder keeps the column of its representative
  (``CompressOutput.index``: a merged token sits where its first member sat, so a kept video token stays after its
  own timestamp); text keeps its own columns. They go in as ``[4, B, L']`` position ids (row 0: contiguous text
  positions, which only build the causal mask), and ``model.model.rope_deltas`` is set to ``max position + 1 - kept
  length`` per sample (the model's definition), so decoding continues where the uncompressed model would.
  ``mm_token_type_ids`` shrinks with ``input_ids``; pixels and grids leave the call (``mm_encoder_outputs`` carries
  the features).
* **Stage "input"** (``resize``, images): the call's own patches resampled to a smaller grid
  (:mod:`tokenzip.adapters.resample`, as on Qwen2-VL: both towers take any grid; Qwen3.5's learned position
  embeddings are interpolated to it by the model); the model computes the new sequence's positions. ``frames``
  (clips): whole temporal grids, each dropped grid's timestamped block leaving the prompt, as on Qwen3-VL
  (:func:`tokenzip.adapters.temporal_grids.timestamped_frames_call`); where the timestamp sits is the processor's,
  so the adapter declares the span finder (``frame_block_spans``: Qwen3.5's prompts are ``Qwen3VLProcessor``'s,
  timestamp before each block; GLM's timestamp follows each block). A call with images and clips on one
  placeholder (GLM) is refused here too, before anything is edited.
* **Stage "encoder"**: :mod:`tokenzip.adapters.merge_unit_vit` (merge units between the model's own vision blocks;
  the tail after the blocks is the adapter's ``_vision_tail``).
* **Stage "llm"**: each image's placeholder run and each clip's placeholders (all its blocks) are one
  :class:`~tokenzip.llm.hooks.LLMItem`; after a pre-LLM method (features precomputed, no grids) the items have
  the kept counts and no layout.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

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
from .merge_unit_vit import MergeUnitEncoderStage, VitPass
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

MEDIA_KEYS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}


class MRopeVLAdapter(MergeUnitEncoderStage, LLMAccess, Adapter):
    """Base adapter (module doc). Subclasses set ``model_classes``, ``family`` (for messages) and, where the model
    puts clips on other placeholders than its ``video_token_id`` (GLM-4.1V: the image token), ``video_placeholder``."""

    modalities = ("image", "video")
    stages = ("pre_llm", "encoder", "llm")
    signals = frozenset({"cls_attention", "keys", "projected", "text", "text_mask"})
    family = "this model"
    video_hint = "the model's processor returns them"
    _call_grids = per_call(factory=dict)  # the outermost call's grids (begin_call), per call (per thread)

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.core = model.model
        self.visual = self.core.visual
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        self.video_token_id = int(self.video_placeholder(cfg))
        self.token_of = {"image": self.image_token_id, "video": self.video_token_id}
        self.merge = int(cfg.vision_config.spatial_merge_size)
        self.cuts: tuple[int, ...] | None = None  # stage "encoder": compress after these numbers of vision blocks
        self.step: Any = None  # a schedule's compression at the cuts before the last
        self._tower: dict[str, VitPass] = {}

    @staticmethod
    def video_placeholder(cfg: Any) -> int:
        """The token id of a clip's placeholders in ``input_ids``."""
        return int(cfg.video_token_id)

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

    def _check_shared_placeholder(self, present: list[str]) -> None:
        if self.image_token_id == self.video_token_id and len(present) > 1:
            raise ValueError(f"{self.family} puts images and videos on the same placeholder token "
                             f"({self.image_token_id}) and refuses both in one call (its placeholder check counts "
                             f"every placeholder for each modality): pass images and videos in separate calls")

    def _grid(self, kwargs: dict[str, Any], modality: str = "image") -> torch.Tensor | None:
        pixels, key = MEDIA_KEYS[modality]
        if kwargs.get(pixels) is None:
            return None
        grid = check_grid(kwargs.get(key), key, pixels, modality, self.merge, self.family, self.video_hint)
        if int(grid.prod(-1).sum()) != kwargs[pixels].shape[0]:
            raise ValueError(f"{pixels} has {kwargs[pixels].shape[0]} patches but {key} {grid.tolist()} needs "
                             f"{int(grid.prod(-1).sum())}")
        return grid

    def _layout(self, t: int, h: int, w: int, modality: str = "image") -> L.Layout:
        m = self.merge
        return L.Layout([L.Segment("image" if modality == "image" and t == 1 else "frames", t, h // m, w // m)])

    def _sizes(self, grid: torch.Tensor) -> list[int]:
        return [int(t * h * w) // (self.merge ** 2) for t, h, w in grid.tolist()]

    # ---- encode -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, kwargs: dict[str, Any], needs: frozenset[str]) -> list[Item]:
        input_ids = require_input_ids(kwargs)
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError("pass either pixel_values/pixel_values_videos or mm_encoder_outputs, not both (the model "
                             "refuses both)")
        cache = cache_from(kwargs)
        if cache is not None and hasattr(cache, "get_seq_length") and int(cache.get_seq_length()) > 0:
            raise ValueError("tokenzip compresses media at prefill only: pixels came with a non-empty cache (a "
                             "continued conversation); start from an empty cache")
        grids = {m: g for m in ("image", "video") if (g := self._grid(kwargs, m)) is not None}
        self._check_shared_placeholder(list(grids))
        items: list[Item] = []
        for modality, grid in grids.items():
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
        sizes = self._sizes(grid)
        owner = items_per_sample(input_ids, self.token_of[modality], sizes, modality)
        if self.cuts is not None:
            return self._encode_in_vit(kwargs, needs, modality, grid, sizes, owner)
        pixels = kwargs[MEDIA_KEYS[modality][0]]
        probe = VisionBlockProbe(self.visual.blocks[-1].attn, needs & ATTENTION_SIGNALS)
        features = self.core.get_image_features if modality == "image" else self.core.get_video_features
        out = probe.run(lambda: features(pixels, grid.to(pixels.device), return_dict=True))
        # per patch (merge-group order) -> per LLM token: mean over the four patches of each group
        grouped = {name: t.reshape(t.shape[0] // unit, unit, *t.shape[1:]).mean(dim=1)
                   for name, t in (("cls_attention", probe.received), ("keys", probe.keys)) if t is not None}
        if "cls_attention" in grouped:  # sum over a segment's queries -> mean over them (one segment per grid)
            per_frame = (grid[:, 1] * grid[:, 2]).repeat_interleave(torch.tensor(sizes, device=grid.device))
            grouped["cls_attention"] = grouped["cls_attention"] / per_frame.to(grouped["cls_attention"])
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
            items.append(Item(modality, owner[i], tokens, self._layout(t, h, w, modality), sig))
            start += n
        return items

    # ---- rebuild ------------------------------------------------------------------------------------------------
    def _original_positions(self, kwargs: dict[str, Any]) -> torch.Tensor:
        """``[4, B, L]`` position ids of the uncompressed call: the caller's 3- or 4-row ids, else the installed
        model's own ``get_rope_index`` (rows 1-3) under a contiguous text row."""
        input_ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        real = torch.ones_like(input_ids) if mask is None else mask
        given = P.caller_positions(kwargs, input_ids)
        if given is not None:
            if given.shape[0] == 1:
                raise ValueError(f"position_ids must be [3, B, L] or [4, B, L] (M-RoPE) for {self.family}, got "
                                 f"{tuple(kwargs['position_ids'].shape)}")
            return given if given.shape[0] == 4 else torch.cat([P.text_row(real, given.dtype).unsqueeze(0), given])
        if kwargs.get("mm_token_type_ids") is None:
            raise ValueError(f"mm_token_type_ids is required with pixel_values/pixel_values_videos for {self.family} "
                             f"(the 3-D M-RoPE positions need it); the model's processor returns it with input_ids")
        rope, _ = self.core.get_rope_index(input_ids, kwargs["mm_token_type_ids"],
                                           image_grid_thw=kwargs.get("image_grid_thw"),
                                           video_grid_thw=kwargs.get("video_grid_thw"), attention_mask=mask)
        return torch.cat([P.text_row(real, rope.dtype).unsqueeze(0), rope], dim=0)

    def _keep_mask(self, input_ids: torch.Tensor, items: list[Item], outputs: list[CompressOutput]) -> torch.Tensor:
        """Text is kept; each item keeps the placeholders at its output tokens' representatives (``index``)."""
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        for token in self.token_of.values():
            keep &= input_ids != token
        cursor: dict[tuple[int, int], int] = {}
        nth: dict[str, int] = {}
        for item, out in zip(items, outputs):
            token = self.token_of[item.modality]
            key = (token, item.sample)
            c = cursor.get(key, 0)
            slots = (input_ids[item.sample] == token).nonzero().flatten()[c: c + item.tokens_in]
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
            if pairs and self.cuts is not None:  # the blocks after the cut and the tail (stage "encoder")
                encoded[modality] = BaseModelOutputWithPooling(
                    pooler_output=self._finish_vit(modality, [out for _, out in pairs])[0])
            elif pairs:
                encoded[modality] = BaseModelOutputWithPooling(pooler_output=tuple(out.tokens[0] for _, out in pairs))
        for key in ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw"):
            new.pop(key, None)
        new["mm_encoder_outputs"] = encoded
        return new

    # ---- stage "input": each image resized to a smaller grid ("resolution", adapters/resample.py, as on Qwen2-VL);
    # where the adapter declares "frames", fewer temporal grids of each clip, each dropped grid's timestamped block
    # leaving the prompt (adapters/temporal_grids.py, as on Qwen3-VL), found by the span finder the adapter declares
    # as ``frame_block_spans`` (a temporal_grids.SpanFinder) for its processor's layout
    input_reductions: tuple[str, ...] = ("resolution",)

    def input_plan(self, kwargs: dict[str, Any], reduction: str) -> list:
        require_input_ids(kwargs)
        if reduction not in self.input_reductions:
            raise TypeError(self._no_input_stage(reduction))
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError("pass either pixel_values/pixel_values_videos or mm_encoder_outputs, not both (the model "
                             "refuses both)")
        self._check_shared_placeholder([m for m in ("image", "video") if kwargs.get(MEDIA_KEYS[m][0]) is not None])
        if reduction == "frames":  # clips only (images pass through)
            return TG.timestamped_frames_plan(self, kwargs)
        if kwargs.get("pixel_values") is None:  # clips only: "resolution" resizes images (clips pass through)
            return []
        return resample.qwen_input_plan(self, kwargs, reduction)

    @torch.no_grad()
    def rescale_inputs(self, kwargs: dict[str, Any], reduction: str, items: list, targets: list[int]
                       ) -> tuple[dict[str, Any], list]:
        if reduction not in self.input_reductions:
            raise TypeError(self._no_input_stage(reduction))
        if reduction == "frames":
            return TG.timestamped_frames_call(self, kwargs, items, targets)
        return resample.qwen_rescale_inputs(self, kwargs, items, targets)

    # ---- stage "llm" (tokenzip.llm) -----------------------------------------------------------------------------
    def llm_items(self, kwargs: dict[str, Any]) -> list:
        """Each image's placeholder run and each clip's placeholders (all its temporal grids), in sequence order:
        after a pre-LLM method the precomputed features' lengths (no layout), else the grids."""
        input_ids = require_input_ids(kwargs)
        pre = kwargs.get("mm_encoder_outputs") or {}
        self._check_shared_placeholder([m for m in ("image", "video")
                                        if pre.get(m) is not None or kwargs.get(MEDIA_KEYS[m][0]) is not None])
        found = []
        for modality in ("image", "video"):
            if pre.get(modality) is not None:
                rows = pre[modality].pooler_output
                if isinstance(rows, torch.Tensor):
                    raise ValueError(f"mm_encoder_outputs[{modality!r}].pooler_output must be a tuple of per-item "
                                     f"tensors, as the model's get_{modality}_features returns")
                sizes, grids = [int(t.shape[0]) for t in rows], None
                grid = self._grid(kwargs, modality)
                if grid is None:
                    grid = self._call_grids.get(modality)
                # generate() encodes the media once and passes the features precomputed (without the grids): while
                # they are whole (no pre-LLM method ran), the items keep the outer call's layout
                if grid is not None and sizes == self._sizes(grid):
                    grids = [self._layout(t, h, w, modality) for t, h, w in grid.tolist()]
            else:
                grid = self._grid(kwargs, modality)
                if grid is None:
                    continue
                sizes = self._sizes(grid)
                grids = [self._layout(t, h, w, modality) for t, h, w in grid.tolist()]
            owners = items_per_sample(input_ids, self.token_of[modality], sizes, modality)
            found += placeholder_items(input_ids, self.token_of[modality], sizes, owners, modality, grids)
        return sorted(found, key=lambda it: (it.sample, int(it.positions[0]) if it.positions.numel() else -1))

    def begin_call(self, kwargs: dict[str, Any]) -> None:
        self._call_grids = {m: g for m in ("image", "video") if (g := self._grid(kwargs, m)) is not None}

    def release(self) -> None:
        self._call_grids = {}
        self._tower = {}
