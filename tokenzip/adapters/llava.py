"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower with CLS, features from a chosen layer (default -2),
MLP projector, one run of ``image_token_id`` placeholders per image.

Compression acts on the vision tower's selected features (the space VisionZip/PruMerge/ToMe work in), before the
projector; the projector then maps only the kept/merged tokens. The shortened prompt and the precomputed features
go to the stock model through ``mm_encoder_outputs`` (no patching of model internals)."""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .. import layout as L
from ..llm.adapter import LLMAccess
from ..output import CompressOutput
from .base import Adapter, Item, ModelParts
from .placeholders import (
    image_llm_items,
    items_per_sample,
    pad_id_for,
    placeholder_keep_mask,
    require_input_ids,
    shrink_sequences,
    text_signals,
)
from .probe import probe
from .vision import encoder_layers, has_cls_token, signal_layer


class LlavaFamily(LLMAccess, Adapter):
    """What LLaVA-1.5 and LLaVA-OneVision share: ``pixel_values`` media, one placeholder token per image feature,
    and the feature layer / select strategy taken from the call or the config."""

    modalities = ("image",)
    stages = ("pre_llm", "llm")
    signals = frozenset({"cls_attention", "keys", "projected", "text", "text_mask"})

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.core = model.model
        self.image_token_id = int(model.config.image_token_id)

    def parts(self) -> ModelParts:
        core = self.core
        lm = core.language_model
        return ModelParts(encoder=core.vision_tower, encoder_layers=encoder_layers(core.vision_tower),
                          projector=core.multi_modal_projector, language_model=lm, decoder_layers=lm.layers,
                          final_norm=lm.norm, embed=core.get_input_embeddings(),
                          media_token_ids=self.media_tokens())

    def media_tokens(self) -> dict[str, int]:
        return {"image": self.image_token_id}

    def has_media(self, kwargs: dict[str, Any]) -> bool:
        return kwargs.get("pixel_values") is not None

    def batch_size(self, kwargs: dict[str, Any]) -> int:
        return require_input_ids(kwargs).shape[0]

    def _feature_args(self, kwargs: dict[str, Any]) -> tuple[Any, str]:
        cfg = self.model.config
        layer = kwargs.get("vision_feature_layer")
        strategy = kwargs.get("vision_feature_select_strategy")
        return (cfg.vision_feature_layer if layer is None else layer,
                cfg.vision_feature_select_strategy if strategy is None else strategy)

    def _shorten_prompt(self, kwargs: dict[str, Any], items: list[Item], outputs: list[CompressOutput],
                        avoid: set[int]) -> dict[str, Any]:
        """The call's sequence tensors with each image keeping only its first ``k`` placeholders (``avoid``: token
        ids the padding must not use)."""
        input_ids = kwargs["input_ids"]
        counts: list[list[tuple[int, int]]] = [[] for _ in range(input_ids.shape[0])]
        for item, out in zip(items, outputs):
            counts[item.sample].append((item.tokens.shape[0], out.tokens.shape[1]))
        keep = placeholder_keep_mask(input_ids, self.image_token_id, counts)
        return shrink_sequences(kwargs, keep, pad_id_for(self.model.config, avoid))


class LlavaAdapter(LlavaFamily):
    model_classes = ("LlavaForConditionalGeneration",)

    @torch.no_grad()
    def encode(self, kwargs: dict[str, Any], needs: frozenset[str]) -> list[Item]:
        input_ids = require_input_ids(kwargs)
        pixel_values = kwargs["pixel_values"]
        tower = self.core.vision_tower
        layer, strategy = self._feature_args(kwargs)
        cls = has_cls_token(tower)
        with probe(signal_layer(tower, layer), needs, 0 if cls else None) as p:
            out = tower(pixel_values.to(tower.dtype), output_hidden_states=True, return_dict=True)
        if isinstance(layer, int):
            feats = out.hidden_states[layer]
        else:
            feats = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
        drop = 1 if strategy == "default" else 0
        feats = feats[:, drop:]
        n = feats.shape[1]
        owner = items_per_sample(input_ids, self.image_token_id, [n] * feats.shape[0])
        side = math.isqrt(n - (1 if cls and not drop else 0))
        grid = L.grid(side, side) if not (cls and not drop) else L.Layout([L.Segment("cls", 1, 1, 1),
                                                                         L.Segment("image", 1, side, side)])
        items = []
        for i in range(feats.shape[0]):
            sig: dict[str, torch.Tensor] = {name: t[i, drop:] for name, t in p.results.items()}
            if "projected" in needs:
                sig["projected"] = self.core.multi_modal_projector(feats[i])
            if "text" in needs:
                sig.update(text_signals(self.core.get_input_embeddings(), input_ids, kwargs.get("attention_mask"),
                                        {self.image_token_id}, owner[i]))
            items.append(Item("image", owner[i], feats[i], grid, sig))
        return items

    def rebuild(self, kwargs: dict[str, Any], items: list[Item], outputs: list[CompressOutput]) -> dict[str, Any]:
        feats = [self.core.multi_modal_projector(out.tokens[0]) for out in outputs]
        new = self._shorten_prompt(kwargs, items, outputs, {self.image_token_id})
        new.pop("pixel_values", None)
        new.pop("image_sizes", None)
        new["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=tuple(feats))}
        return new

    # ---- stage "llm" --------------------------------------------------------------------------------------------
    def llm_items(self, kwargs: dict[str, Any]) -> list:
        """Each image's placeholder run in the LLM sequence: from ``pixel_values`` (one run of the tower's feature
        count per image) or, after a pre-LLM method (``tz.compose``), from the precomputed features' lengths; a run
        whose length is a square gets that square grid."""
        def plan() -> tuple[list[int], None]:
            pv = kwargs["pixel_values"]
            side = int(pv.shape[-1]) // int(self.model.config.vision_config.patch_size)
            _, strategy = self._feature_args(kwargs)
            return [side * side + (0 if strategy == "default" else 1)] * int(pv.shape[0]), None

        items = image_llm_items(kwargs, self.image_token_id, plan)
        for it in items:
            n = int(it.positions.numel())
            side = math.isqrt(n)
            it.grid = [(side, side)] if side * side == n else None
        return items
