"""SmolVLM / SmolVLM2 (``SmolVLMForConditionalGeneration``) and Idefics3 (``Idefics3ForConditionalGeneration``):
SigLIP tower on fixed-size tiles (an image split into rows x cols tiles plus a downscaled global image; every tile of
a sample rides in ``pixel_values [B, tiles, 3, S, S]``, all-zero tiles pad the batch), pixel shuffle by
``scale_factor`` and a linear projection: ``T = (S / patch / scale)^2`` tokens per tile (64 / 81 on SmolVLM2, 169 on
Idefics3), a square grid. In the prompt each tile is ``<fake_token_around_image><row_i_col_j>`` + ``<image>`` x T,
a newline after each row of tiles, then ``<fake_token_around_image><global-img>`` + ``<image>`` x T +
``<fake_token_around_image>``; a video is frames with timestamp text, each frame one such global block.

One item per tile (the global image and each video frame included), in sequence order: each tile's run of
``<image>`` placeholders shrinks to its budget, and every marker, row/column token, newline and timestamp stays
(they are text). Compression acts on the projected tokens (the LLM's input space: a pixel-shuffled token holds
``scale x scale`` patches, so the tower's patches are not the LLM's tokens); ``cls_attention`` (attention received,
no CLS) and ``keys`` come from the tower's last layer over each tile's real patches (``pixel_attention_mask``),
averaged over each token's ``scale x scale`` patches. The shortened prompt and the compressed features reach the
stock model through ``mm_encoder_outputs``; what differs between transformers releases (the features' form) is in
:mod:`tokenzip.compat`.

Stage ``"encoder"`` (``tz.InEncoder(method, layer=L)`` or a schedule; :mod:`tokenzip.adapters.grouped_tower`,
shared with Gemma 3): one item per real tile, the unit one pixel-shuffle group (``scale x scale`` patches = one LLM
token, as the model's own ``pixel_shuffle`` stacks them); the tower runs with the model's patch mask (padding patches
stay masked as keys and never leak into a merged real patch), and the post-norm and the model's own connector turn
each kept group into its token. ``projected`` is not offered inside the tower.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .. import layout as L
from ..callstate import per_call
from ..compat import tile_features, tile_features_input
from ..encoder import EncoderSpec
from ..llm.adapter import LLMAccess
from ..llm.hooks import LLMItem
from ..output import CompressOutput
from .attention import attention_signals
from .base import Adapter, InputItem, Item, ModelParts
from .grouped_tower import GroupedTower, TowerImage, shuffle_groups
from .placeholders import (
    check_runs,
    pad_id_for,
    placeholder_keep_mask,
    placeholder_runs,
    require_input_ids,
    shrink_sequences,
    square_image_items,
    text_signals,
)
from .probe import capture_input
from .vision import attention_module, encoder_layers, pool_patch_signals

HINT = "build the inputs with the model's processor (one run of <image> placeholders per tile)"


class SmolVLMAdapter(LLMAccess, Adapter):
    model_classes = ("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration")
    modalities = ("image",)
    # per-call state, per thread (tokenzip/callstate.py): each tile's groups inside SigLIP (stage "encoder")
    _tower_images = per_call()
    stages = ("pre_llm", "encoder", "llm")
    signals = frozenset({"cls_attention", "keys", "projected", "text", "text_mask"})
    # inside the tower the connector has not run: no ``projected``
    encoder_signals = frozenset({"cls_attention", "keys", "text", "text_mask"})

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.core = model.model
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        self.scale = int(cfg.scale_factor)
        patches = int(cfg.vision_config.image_size) // int(cfg.vision_config.patch_size)
        self.side = patches // self.scale
        self.tokens_per_tile = self.side * self.side
        self.tower: GroupedTower | None = None  # stage "encoder" (set_encoder_layer)
        self.step: Any = None  # a schedule's compression at the cuts before the last
        self._tower_images: list[TowerImage] | None = None

    def parts(self) -> ModelParts:
        core = self.core
        lm = core.text_model
        return ModelParts(encoder=core.vision_model, encoder_layers=encoder_layers(core.vision_model),
                          projector=core.connector, language_model=lm, decoder_layers=lm.layers, final_norm=lm.norm,
                          embed=core.get_input_embeddings(), media_token_ids={"image": self.image_token_id})

    def has_media(self, kwargs: dict[str, Any]) -> bool:
        return kwargs.get("pixel_values") is not None

    def batch_size(self, kwargs: dict[str, Any]) -> int:
        return require_input_ids(kwargs).shape[0]

    # ---- stage "pre_llm" ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, kwargs: dict[str, Any], needs: frozenset[str]) -> list[Item]:
        input_ids = require_input_ids(kwargs)
        pixel_values = kwargs["pixel_values"]
        if pixel_values.dim() != 5:
            raise ValueError(f"pixel_values must be [batch, tiles, 3, height, width] as the model's processor makes "
                             f"them, got shape {tuple(pixel_values.shape)}")
        if self.tower is not None:
            return self._encode_in_tower(kwargs, needs, input_ids, pixel_values)
        tower = self.core.vision_model
        seen: dict[str, torch.Tensor] = {}

        def note(module: torch.nn.Module, args: tuple, kw: dict) -> None:  # the tower's own patch mask
            seen["patches"] = kw.get("patch_attention_mask")

        attn = attention_module(encoder_layers(tower)[-1])
        handle = tower.register_forward_pre_hook(note, with_kwargs=True)
        try:
            with capture_input(attn) as box:
                out = self.core.get_image_features(pixel_values, kwargs.get("pixel_attention_mask"), return_dict=True)
        finally:
            handle.remove()
        feats = tile_features(out.pooler_output, self.tokens_per_tile)  # [tiles, T, D], placeholder order
        owners = check_runs(placeholder_runs(input_ids, self.image_token_id),
                            [self.tokens_per_tile] * feats.shape[0], "tile", HINT)
        pooled = self._tile_signals(attn, box["x"], seen.get("patches"), needs)
        return square_image_items(self.core.get_input_embeddings(), kwargs, self.image_token_id, feats, owners, pooled,
                                  self.side, needs)

    def _tile_signals(self, attn: torch.nn.Module, x: torch.Tensor, patches: torch.Tensor | None,
                      needs: frozenset[str]) -> dict[str, torch.Tensor]:
        """Attention signals of the tower's last layer per tile, over the tile's real patches only (the tower masks
        padded patches out as keys), pooled to the tile's tokens; padded patches count as 0."""
        wanted = needs & {"cls_attention", "keys"}
        if not wanted:
            return {}
        n, p2 = x.shape[0], x.shape[1]
        valid = torch.ones(n, p2, dtype=torch.bool, device=x.device) if patches is None else \
            patches.reshape(n, p2).to(x.device)
        if bool(valid.all()):
            results = attention_signals(attn, x, frozenset(wanted), None)
        else:
            rows: dict[str, list[torch.Tensor]] = {}
            for i in range(n):
                part = attention_signals(attn, x[i: i + 1, valid[i]], frozenset(wanted), None)
                for name, t in part.items():
                    full = t.new_zeros(1, p2, *t.shape[2:])
                    full[:, valid[i]] = t
                    rows.setdefault(name, []).append(full)
            results = {name: torch.cat(ts) for name, ts in rows.items()}
        return pool_patch_signals(results, self.side, self.scale)

    def rebuild(self, kwargs: dict[str, Any], items: list[Item], outputs: list[CompressOutput]) -> dict[str, Any]:
        input_ids = kwargs["input_ids"]
        counts: list[list[tuple[int, int]]] = [[] for _ in range(input_ids.shape[0])]
        for item, out in zip(items, outputs):
            counts[item.sample].append((item.tokens_in, out.tokens.shape[1]))
        keep = placeholder_keep_mask(input_ids, self.image_token_id, counts)  # markers and newlines stay
        new = shrink_sequences(kwargs, keep, pad_id_for(self.model.config.text_config, {self.image_token_id}))
        new.pop("pixel_values", None)
        new.pop("pixel_attention_mask", None)
        feats = [out.tokens[0] for out in outputs] if self.tower is None else \
            self.tower.finish(self._tower_images, outputs, int(self.model.config.vision_config.hidden_size))
        pooler = tile_features_input(self.model, feats)
        new["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=pooler)}
        return new

    # ---- stage "encoder" (adapters/grouped_tower.py: whole pixel-shuffle groups inside SigLIP) ---------------------
    def encoder_depth(self) -> int:
        """SigLIP's layers: the connector reads the last one's output (after the post-norm)."""
        return len(encoder_layers(self.core.vision_model))

    def release(self) -> None:
        self._tower_images = None

    def set_encoder_layer(self, layer: int | tuple[int, ...], step: Any = None) -> None:
        vm = self.core.vision_model
        spec = EncoderSpec(embed=lambda x: x, layers=encoder_layers(vm), final_norm=vm.post_layernorm,
                           attention=attention_module)
        connector = self.core.connector
        groups = shuffle_groups(lambda ids: connector.pixel_shuffle(ids, self.scale), self.side * self.scale)
        tower = GroupedTower(spec, layer, groups, connector, self.side)  # ValueError naming the valid cuts
        if len(tower.cuts) > 1 and step is None:
            raise ValueError("a schedule of encoder cuts needs a compression step for the intermediate cuts")
        self.tower, self.step = tower, step

    def _encode_in_tower(self, kwargs: dict[str, Any], needs: frozenset[str], input_ids: torch.Tensor,
                         pixel_values: torch.Tensor) -> list[Item]:
        """SigLIP up to the (last) cut on the call's real tiles (all-zero tiles pad the batch: the model's own rule),
        with the model's patch mask (a patch is real where any of its pixels is); one item per tile whose tokens are
        its pixel-shuffle groups' patches."""
        vm = self.core.vision_model
        b, t = pixel_values.shape[:2]
        flat = pixel_values.flatten(0, 1).to(self.core.dtype)
        real = (flat != 0).flatten(1).any(-1)
        tiles = flat[real]
        masks = kwargs.get("pixel_attention_mask")
        p = int(self.model.config.vision_config.patch_size)
        if masks is None:
            patch_mask = torch.ones(tiles.shape[0], tiles.shape[-2] // p, tiles.shape[-1] // p, dtype=torch.bool,
                                    device=tiles.device)
        else:
            if tuple(masks.shape[:2]) != (b, t) or tuple(masks.shape[-2:]) != tuple(tiles.shape[-2:]):
                raise ValueError(f"pixel_attention_mask must be [batch, tiles, height, width] like pixel_values "
                                 f"{tuple(pixel_values.shape)}, got {tuple(masks.shape)}")
            m = masks.flatten(0, 1)[real].bool()
            patch_mask = m.view(m.shape[0], m.shape[1] // p, p, m.shape[2] // p, p).any(dim=4).any(dim=2)
        owners = check_runs(placeholder_runs(input_ids, self.image_token_id),
                            [self.tokens_per_tile] * tiles.shape[0], "tile", HINT)
        texts = {s: text_signals(self.core.get_input_embeddings(), input_ids, kwargs.get("attention_mask"),
                                 {self.image_token_id}, s) if {"text", "text_mask"} & needs else {}
                 for s in set(owners)}
        hidden = vm.embeddings(pixel_values=tiles, patch_attention_mask=patch_mask)
        take = self.step is not None and "image" in (getattr(self.step, "modalities", None) or ("image",))
        images, layouts, counts = self.tower.encode(hidden, patch_mask.flatten(1), needs,
                                                    self.step if take else None, lambda i: texts[owners[i]])
        self._tower_images = images
        extra: dict[str, Any] = {"tokens_in": self.tokens_per_tile}
        if counts:  # a schedule: the last cut reaches each tile's budget
            extra["k"] = counts[-1]
        return [Item("image", s, im.state.hidden[0], layout, {**im.signals, **texts[s]}, extra=dict(extra))
                for im, layout, s in zip(images, layouts, owners)]

    # ---- stage "input": fewer tiles before the tower ------------------------------------------------------------
    input_reductions = ("crops",)

    def _images(self, kwargs: dict[str, Any]) -> list[tuple[int, list[torch.Tensor], int]]:
        """Each image of the call in sequence order: ``(sample, its tiles' placeholder runs, index of its first tile
        among the sample's tiles)``. Every image ends with its global tile, whose run follows ``<global-img>``: that
        token is the one before each sample's last run (also for a video frame: a lone global tile)."""
        input_ids = require_input_ids(kwargs)
        pixel_values = kwargs["pixel_values"]
        if pixel_values.dim() != 5:
            raise ValueError(f"pixel_values must be [batch, tiles, 3, height, width] as the model's processor makes "
                             f"them, got shape {tuple(pixel_values.shape)}")
        runs = placeholder_runs(input_ids, self.image_token_id)
        real = (pixel_values != 0).flatten(2).any(-1)  # all-zero tiles pad the batch (the model's own rule)
        closers = {int(input_ids[b, sample[-1][0] - 1]) for b, sample in enumerate(runs) if sample}
        if len(closers) > 1:
            raise ValueError(f"cannot find each image's global tile: the samples' last tiles follow different tokens "
                             f"{sorted(closers)}; {HINT}")
        images = []
        for b, sample in enumerate(runs):
            if len(sample) != int(real[b].sum()) or any(r.numel() != self.tokens_per_tile for r in sample):
                raise ValueError(f"sample {b}: {int(real[b].sum())} tiles but {len(sample)} placeholder runs of "
                                 f"lengths {[int(r.numel()) for r in sample]}; {HINT}")
            start = 0
            for j, r in enumerate(sample):
                if int(input_ids[b, r[0] - 1]) in closers:
                    images.append((b, sample[start: j + 1], start))
                    start = j + 1
        return images

    def input_plan(self, kwargs: dict[str, Any], reduction: str) -> list[InputItem]:
        """Reduction ``"crops"``: each image is one item of its tiles' tokens (``tiles x T``); it can be given whole
        or as its global tile alone (``T``)."""
        if reduction not in self.input_reductions:
            raise TypeError(self._no_input_stage(reduction))
        t = self.tokens_per_tile
        return [InputItem("image", b, len(tiles) * t, tuple(sorted({t, len(tiles) * t})),
                          L.Layout([L.Segment("image", len(tiles), self.side, self.side)]),
                          extra={"tiles": len(tiles), "first": first, "runs": tiles})
                for b, tiles, first in self._images(kwargs)]

    @torch.no_grad()
    def rescale_inputs(self, kwargs: dict[str, Any], reduction: str, items: list[InputItem], targets: list[int]
                       ) -> tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor]]]:
        """An image whose target is under its tiled count keeps its global tile only: the other tiles' pixels leave
        the call (never encoded) and their placeholder runs leave the prompt; their ``<fake_token_around_image>``
        / ``<row_i_col_j>`` markers and newlines stay, as at every other stage (the text the LLM reads is the
        caller's minus placeholders). The call keeps pixels, so a pre-LLM method can follow."""
        if reduction not in self.input_reductions:
            raise TypeError(self._no_input_stage(reduction))
        input_ids = kwargs["input_ids"]
        pixel_values = kwargs["pixel_values"]
        masks = kwargs.get("pixel_attention_mask")
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        kept_tiles: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
        maps = []
        t = self.tokens_per_tile
        for it, k in zip(items, targets):
            m, first = it.extra["tiles"], it.extra["first"]
            if k == it.tokens:
                kept_tiles[it.sample] += list(range(first, first + m))
                maps.append((torch.arange(k), torch.arange(k)))
                continue
            if k != t:
                raise ValueError(f"an image of {m} tiles can be given {it.achievable} tokens, not {k}")
            kept_tiles[it.sample].append(first + m - 1)
            for run in it.extra["runs"][:-1]:
                keep[it.sample, run] = False
            source = torch.full((it.tokens,), -1, dtype=torch.long)
            source[-t:] = torch.arange(t)
            maps.append((source, torch.arange(it.tokens - t, it.tokens)))
        new = shrink_sequences(kwargs, keep, pad_id_for(self.model.config.text_config, {self.image_token_id}))
        width = max(1, max(len(k) for k in kept_tiles))
        pv = pixel_values.new_zeros(pixel_values.shape[0], width, *pixel_values.shape[2:])
        pm = None if masks is None else masks.new_zeros(masks.shape[0], width, *masks.shape[2:])
        for b, tiles in enumerate(kept_tiles):
            pv[b, : len(tiles)] = pixel_values[b, tiles]
            if pm is not None:
                pm[b, : len(tiles)] = masks[b, tiles]
        new["pixel_values"] = pv
        if pm is not None:
            new["pixel_attention_mask"] = pm
        return new, maps

    # ---- stage "llm" --------------------------------------------------------------------------------------------
    def llm_items(self, kwargs: dict[str, Any]) -> list[LLMItem]:
        """Each tile's run of ``<image>`` placeholders in the LLM sequence (markers stay outside the runs); an
        uncompressed run gets the tile's square grid, one a pre-LLM method shortened (``tz.compose``) none."""
        pre = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if kwargs.get("pixel_values") is None and pre is None:
            return []
        runs = placeholder_runs(require_input_ids(kwargs), self.image_token_id)
        grid = L.grid(self.side, self.side)
        return [LLMItem("image", b, pos, grid if pos.numel() == self.tokens_per_tile else None)
                for b, sample in enumerate(runs) for pos in sample]

