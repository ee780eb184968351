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
from .. import ops
from ..callstate import per_call
from ..encoder import EncoderRunner, EncoderSpec, MergedTokens
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
from .vision import attention_module, encoder_layers, has_cls_token, object_layer, signal_layer


class LlavaFamily(LLMAccess, Adapter):
    """What LLaVA-1.5 and LLaVA-OneVision share: ``pixel_values`` media, one placeholder token per image feature,
    and the feature layer / select strategy taken from the call or the config."""

    modalities = ("image",)
    concurrent_calls = True  # the stock forward keeps no state on its modules; ours is per_call (tests/test_threads.py)
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

    def encoder_depth(self) -> int:
        """The number of vision-tower layers the encoder stage runs: up to the one whose output the LLM reads
        (``vision_feature_layer``; later layers are never run). ``tz.InEncoder`` layer forms resolve against it."""
        layer = self.model.config.vision_feature_layer
        count = len(encoder_layers(self.core.vision_tower))
        return (layer if isinstance(layer, int) else max(layer)) % (count + 1)

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
        ids the padding must not use). An item's run is ``item.tokens_in`` placeholders long (inside the encoder
        the method may see other tokens than the ones the prompt counts)."""
        input_ids = kwargs["input_ids"]
        counts: list[list[tuple[int, int]]] = [[] for _ in range(input_ids.shape[0])]
        for item, out in zip(items, outputs):
            counts[item.sample].append((item.tokens_in, out.tokens.shape[1]))
        keep = placeholder_keep_mask(input_ids, self.image_token_id, counts)
        return shrink_sequences(kwargs, keep, pad_id_for(self.model.config, avoid))

    def _tower_spec(self) -> EncoderSpec:
        """The vision tower up to the layer whose output the LLM reads (later layers are never read), for the
        encoder stage's runner: its own embeddings (and CLIP's pre-norm), layers and attention modules."""
        tower = self.core.vision_tower
        layers = encoder_layers(tower)
        depth = self.model.config.vision_feature_layer % (len(layers) + 1)
        embeddings = getattr(tower, "vision_model", tower).embeddings
        pre_norm = getattr(getattr(tower, "vision_model", tower), "pre_layrnorm", None)  # CLIP; SigLIP/DINOv2: none

        def embed(pixel_values: torch.Tensor) -> torch.Tensor:
            hidden = embeddings(pixel_values.to(tower.dtype))
            return hidden if pre_norm is None else pre_norm(hidden)

        return EncoderSpec(embed=embed, layers=layers[:depth], final_norm=None, attention=attention_module)


class LlavaAdapter(LlavaFamily):
    """LLaVA-1.5. Stage "encoder" (``tz.InEncoder(method, layer=L)``): the vision tower's embedding and layers
    ``0..L-1`` run, the method compresses the patch tokens that leave layer ``L-1`` (signals from that layer's
    attention; the [CLS] token is not a candidate: it stays, as the attention hub ViT layers rely on), and the layers
    from ``L`` up to the one whose output the LLM reads (``vision_feature_layer``, -2 by default) run on [CLS] + the
    kept/merged tokens with proportional attention (``log`` size as an additive mask, SDPA-safe). Layers after the
    feature layer are not run at all (their output is never read). Supported for a single integer feature layer
    with the "default" select strategy (the [CLS] token is not a feature) on towers with a [CLS] token; a budget
    counts the tokens that reach the LLM, as before. ``projected`` is not available inside the encoder (the
    projector expects feature-layer tokens), so methods that require it are refused at that stage.

    Schedules (``layer=(l1, l2, ...)``, ToMe/AuroraCap style): after each listed layer count the patch tokens are
    compressed a little (:func:`tokenzip.encoder.schedule_counts`, the same count for every image of the batch since
    they all have the tower's fixed size), the tokens carry their sizes from cut to cut and every later layer gets
    proportional attention; [CLS] rides along uncompressed with size 1. After the first cut the kept tokens no longer
    tile the patch grid, so the later cuts hand the method a 1-D layout."""

    model_classes = ("LlavaForConditionalGeneration",)
    # per-call state, per thread (tokenzip/callstate.py)
    _cls = per_call()
    _state = per_call()
    stages = ("pre_llm", "encoder", "llm")
    signals = LlavaFamily.signals | {"mid_attention"}
    encoder_signals = frozenset({"cls_attention", "keys", "text", "text_mask"})

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.runner: EncoderRunner | None = None
        self.step: Any = None  # compresses at the cuts of a schedule before the last
        self._cls: torch.Tensor | None = None  # [B, 1, D] the [CLS] hidden state at the (last) cut, per call
        self._state: MergedTokens | None = None  # the patch tokens at the last cut, per call

    # ---- stage "encoder" ----------------------------------------------------------------------------------------
    def set_encoder_layer(self, layer: int | tuple[int, ...], step: Any = None) -> None:
        cfg = self.model.config
        tower = self.core.vision_tower
        if not isinstance(cfg.vision_feature_layer, int) or cfg.vision_feature_select_strategy != "default":
            raise ValueError("LLaVA's encoder stage needs one integer vision_feature_layer and the 'default' select "
                             f"strategy; this config has {cfg.vision_feature_layer!r} / "
                             f"{cfg.vision_feature_select_strategy!r}")
        if not has_cls_token(tower):
            raise ValueError(f"LLaVA's encoder stage needs a vision tower with a [CLS] token; "
                             f"{type(tower).__name__} has none")
        runner = EncoderRunner(self._tower_spec(), layer)  # ValueError naming the valid cuts
        if len(runner.cuts) > 1 and step is None:
            raise ValueError("a schedule of encoder cuts needs a compression step for the intermediate cuts")
        self.runner, self.step = runner, step

    @torch.no_grad()
    def _encode_to_cut(self, kwargs: dict[str, Any], needs: frozenset[str]) -> tuple[torch.Tensor, dict, list[int]]:
        """The tower up to the last cut, compressing at the earlier cuts of a schedule: the patch tokens there
        ``[B, n, D]``, the signals of the layer before it (with the [CLS] column) and, for a schedule, the counts
        after each cut (empty for one cut)."""
        layer, strategy = self._feature_args(kwargs)
        cfg = self.model.config
        if (layer, strategy) != (cfg.vision_feature_layer, cfg.vision_feature_select_strategy):
            raise ValueError("the encoder stage was set up for the config's vision_feature_layer/select_strategy; "
                             "a call cannot override them")
        runner = self.runner
        hidden = runner.embed(kwargs["pixel_values"])
        cls, state = hidden[:, :1], MergedTokens.start(hidden[:, 1:])
        n = state.source.shape[1]
        counts = self.step.counts(n, len(runner.cuts)) if len(runner.cuts) > 1 else []  # the InEncoder's schedule
        owner = items_per_sample(kwargs["input_ids"], self.image_token_id, [n] * hidden.shape[0]) if counts else []
        start, results = 0, {}
        for j, cut in enumerate(runner.cuts):  # the signals at a cut come from layer `cut - 1`, which made the tokens
            size = torch.cat([torch.ones_like(state.size[:, :1]), state.size], dim=1)  # [CLS] stands for itself
            mask = None if bool((size == 1).all()) else ops.size_bias(size).to(state.hidden.dtype)
            hidden = runner.run(torch.cat([cls, state.hidden], dim=1), start, cut - 1, mask)
            with probe(runner.span_attention(cut), needs, 0) as p:
                hidden = runner.run(hidden, cut - 1, cut, mask)
            cls, state, results = hidden[:, :1], MergedTokens(hidden[:, 1:], state.size, state.source), p.results
            if j == len(runner.cuts) - 1:
                break
            grid = L.grid(1, state.hidden.shape[1])  # a selection/merge no longer tiles the patch grid
            outputs = []
            for i in range(hidden.shape[0]):
                sig = {name: t[i: i + 1, 1:] for name, t in results.items()}
                if "text" in needs or "text_mask" in needs:
                    sig.update({name: t.unsqueeze(0) for name, t in text_signals(
                        self.core.get_input_embeddings(), kwargs["input_ids"], kwargs.get("attention_mask"),
                        {self.image_token_id}, owner[i]).items()})
                outputs.append(self.step(state.hidden[i: i + 1], counts[j], grid, sig))
            state = state.after(outputs)
            start = cut
        self._cls, self._state = cls, state
        return torch.cat([cls, state.hidden], dim=1), results, counts

    def release(self) -> None:
        self._cls = None
        self._state = None

    @torch.no_grad()
    def encode(self, kwargs: dict[str, Any], needs: frozenset[str]) -> list[Item]:
        input_ids = require_input_ids(kwargs)
        pixel_values = kwargs["pixel_values"]
        tower = self.core.vision_tower
        layer, strategy = self._feature_args(kwargs)
        cls = has_cls_token(tower)
        counts: list[int] = []
        if self.runner is not None:
            feats, results, counts = self._encode_to_cut(kwargs, needs)
        else:
            # the object-centric middle layer's attention received (every query, [CLS] included) when asked for
            mid_needs = frozenset({"cls_attention"} if "mid_attention" in needs else ())
            with probe(signal_layer(tower, layer), needs, 0 if cls else None) as p, \
                    probe(object_layer(tower), mid_needs, None) as mid:
                out = tower(pixel_values.to(tower.dtype), output_hidden_states=True, return_dict=True)
            if isinstance(layer, int):
                feats = out.hidden_states[layer]
            else:
                feats = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
            results = dict(p.results)
            if mid_needs:
                results["mid_attention"] = mid.results["cls_attention"]
        drop = 1 if strategy == "default" else 0
        feats = feats[:, drop:]
        n = feats.shape[1]
        if counts:  # a schedule: the last cut's tokens stand for the tower's patches and reach their budget
            n_in = self._state.source.shape[1]
            grid = L.grid(1, n)
        else:
            n_in = n
            side = math.isqrt(n - (1 if cls and not drop else 0))
            grid = L.grid(side, side) if not (cls and not drop) else L.Layout([L.Segment("cls", 1, 1, 1),
                                                                             L.Segment("image", 1, side, side)])
        owner = items_per_sample(input_ids, self.image_token_id, [n_in] * feats.shape[0])
        items = []
        for i in range(feats.shape[0]):
            sig: dict[str, torch.Tensor] = {name: t[i, drop:] for name, t in results.items()}
            if "projected" in needs:
                sig["projected"] = self.core.multi_modal_projector(feats[i])
            if "text" in needs:
                sig.update(text_signals(self.core.get_input_embeddings(), input_ids, kwargs.get("attention_mask"),
                                        {self.image_token_id}, owner[i]))
            extra = {"tokens_in": n_in, "k": counts[-1]} if counts else {}
            if counts and drop:  # the stats of a schedule refer to the tower's patches (Item.extra, source_in)
                side = math.isqrt(n_in)
                extra.update(source_in=self._state.source[i],
                             grid_in=L.grid(side, side) if side * side == n_in else L.grid(1, n_in))
            items.append(Item("image", owner[i], feats[i], grid, sig, extra=extra))
        return items

    def rebuild(self, kwargs: dict[str, Any], items: list[Item], outputs: list[CompressOutput]) -> dict[str, Any]:
        if self.runner is None:
            feats = [self.core.multi_modal_projector(out.tokens[0]) for out in outputs]
        else:
            feats = list(self.core.multi_modal_projector(self._finish_tower(items, outputs)))
        new = self._shorten_prompt(kwargs, items, outputs, {self.image_token_id})
        new.pop("pixel_values", None)
        new.pop("image_sizes", None)
        new["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=tuple(feats))}
        return new

    @torch.no_grad()
    def _finish_tower(self, items: list[Item], outputs: list[CompressOutput]) -> torch.Tensor:
        """The layers after the (last) cut on [CLS] + each image's compressed tokens (equal counts: one budget for
        every image of the tower's fixed size), up to the feature layer; returns the features without [CLS]."""
        patches = self._state.after(outputs)
        cls = self._cls
        b = cls.shape[0]
        ones = torch.ones(b, 1, dtype=patches.size.dtype, device=patches.size.device)
        zero = torch.zeros(b, 1, dtype=patches.source.dtype, device=patches.source.device)
        state = MergedTokens(torch.cat([cls.to(patches.hidden.dtype), patches.hidden], dim=1),
                             torch.cat([ones, patches.size], dim=1),
                             torch.cat([zero, torch.where(patches.source >= 0, patches.source + 1, -1)], dim=1))
        return self.runner.finish(state)[:, 1:]

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
            it.grid = L.grid(side, side) if side * side == n else None
        return items

    # no stage "input": the tower's position embeddings are for one fixed input size, and the LLM always reads its
    # (size/patch)^2 tokens, so a smaller image cannot give fewer tokens
    input_stage_note = ("LLaVA-1.5's CLIP tower takes a fixed 336-px input and always gives 576 tokens, so "
                        "input-level resolution does not apply; use a pre-LLM or encoder-stage method")

