"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP tower (no CLS), 2-layer MLP projector, AnyRes
tiling, one run of ``image_token_id`` placeholders per image.

What is compressed. The packed LLM-space features, exactly as the stock model would feed them to the LLM: the
output of ``model.model.get_image_features`` (projector applied, base view followed by the AnyRes crop grid after
unpadding and, for ``anyres_max_*``, bilinear down-scaling, with one ``image_newline`` marker closing each row of the
crop grid). An image's budget ``N`` is all of its tokens that would reach the LLM, newline markers included; a method
may drop, keep or merge a marker like any other token (the model has no rule that needs them).

Layout handed to the method, per image:
  * single-image samples (AnyRes): ``[(h, w), (H, W + 1)]`` — the base view's patch grid, then the unpadded crop grid
    whose last column holds the newline markers;
  * samples with several images (the processor's ``batch_num_images > 1``, where the model does not tile):
    ``[(h, w), (1, 1)]`` — the base view and its single trailing newline marker.
Spatial methods (pooling, 2-D neighbourhoods) therefore see the true 2-D structure. ``Item.extra["newline"]`` is
the boolean mask of the markers.

Placeholders. ``LlavaOnevisionProcessor`` writes, per image, ``num_image_tokens`` (base view) + the unpadded (and,
past ``anyres_max_N``, down-scaled) crop grid + one newline per grid row, or ``num_image_tokens + 1`` in samples with
several images — the length of the model's packed features, which is what this adapter counts; prompts whose
placeholder runs do not add up to the images' feature counts get a ValueError naming both.

Signals. SigLIP has no CLS token, so ``cls_attention`` is the attention each patch receives (mean over queries and
heads) at the vision feature layer, recomputed from that layer's own q/k projections (adapters/probe.py; the tower
keeps its SDPA/flash kernel); ``keys`` are that layer's keys (mean over heads). Both are per crop, so they are run
through the model's own ``pack_image_features`` (same crop arrangement, unpadding and interpolation as the features)
with a zero vector in place of ``image_newline``: newline markers get ``cls_attention`` 0 and zero keys. In the
``anyres_max_*`` down-scaled case the signals are bilinearly interpolated like the features. ``projected`` is the
tokens themselves (already in LLM space); ``text`` / ``text_mask`` are the prompt's text embeddings.

The vision tower runs once per call: the probe records the signals during the same ``get_image_features`` pass that
produces the features. The shortened prompt (each image keeps its first ``k`` placeholders) and the compressed
features go to the stock model through ``mm_encoder_outputs`` (no patching of model internals). With ``k == N`` for
every image the LLM receives exactly the original features. Videos (``pixel_values_videos``) are items of modality
``"video"``: see adapters/onevision_video.py (a mixin; images and clips of one call are compressed together).

Like the stock ``forward`` (transformers 5.23), image features use ``config.vision_aspect_ratio``; a
``vision_aspect_ratio`` call argument is ignored by the model, and so it is here, so that ``retain=1`` is lossless.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from .. import layout as L
from ..output import CompressOutput
from . import resample
from .base import Item
from .llava import LlavaFamily
from .onevision_video import OnevisionVideo
from .placeholders import image_llm_items, items_per_sample, require_input_ids, text_signals
from .probe import probe
from .vision import has_cls_token, signal_layer

ATTENTION_SIGNALS = ("cls_attention", "keys")


class LlavaOnevisionAdapter(OnevisionVideo, LlavaFamily):
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    modalities = ("image", "video")  # videos: adapters/onevision_video.py

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.media_token_ids = set(self.media_tokens().values())  # placeholders the prompt shortening must keep

    def media_tokens(self) -> dict[str, int]:
        video = getattr(self.model.config, "video_token_id", None)
        return {"image": self.image_token_id, **({"video": int(video)} if video is not None else {})}

    # ---- crop bookkeeping (the model's own rule, see LlavaOnevisionModel.get_image_features) -------------------------
    def crops_per_image(self, pixel_values: torch.Tensor, image_sizes: Any, batch_num_images: Any) -> list[int]:
        """How many vision-tower crops each image has (base view included), validating the media arguments."""
        if image_sizes is None:
            raise ValueError("LLaVA-OneVision needs image_sizes (the (height, width) of each image) next to "
                             "pixel_values; build inputs with LlavaOnevisionProcessor")
        n_images = len(image_sizes)
        if batch_num_images is None:
            patching = [True] * n_images
        else:
            counts = [int(n) for n in batch_num_images]
            if any(n < 0 for n in counts) or sum(counts) != n_images:
                raise ValueError(f"batch_num_images {counts} must be >= 0 and sum to the number of images "
                                 f"({n_images} image_sizes)")
            patching = [n == 1 for n in counts for _ in range(n)]
        cfg = self.model.config
        crops = [image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                 if tile else 1 for size, tile in zip(image_sizes, patching)]
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != n_images or pixel_values.shape[1] < max(crops, default=0):
                raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)} do not fit {n_images} image(s) "
                                 f"needing {crops} crops (image_sizes/batch_num_images)")
        elif pixel_values.dim() == 4:
            if pixel_values.shape[0] != sum(crops):
                raise ValueError(f"pixel_values hold {pixel_values.shape[0]} crops, but image_sizes/batch_num_images "
                                 f"need {sum(crops)} ({crops} per image)")
        else:
            raise ValueError(f"pixel_values must be 4-D or 5-D, got shape {tuple(pixel_values.shape)}")
        return crops

    @torch.no_grad()
    def encode(self, kwargs: dict[str, Any], needs: frozenset[str]) -> list[Item]:
        if kwargs.get("pixel_values_videos") is not None:  # clips (and images next to them): onevision_video.py
            return self.encode_media(kwargs, needs)
        input_ids = require_input_ids(kwargs)
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError("pass either pixel_values or mm_encoder_outputs, not both (the model refuses both)")
        pixel_values = kwargs["pixel_values"]
        image_sizes = kwargs.get("image_sizes")
        batch_num_images = kwargs.get("batch_num_images")
        layer, strategy = self._feature_args(kwargs)
        crops, marks, grids = self.plan(pixel_values, image_sizes, batch_num_images, strategy)
        owner = items_per_sample(input_ids, self.image_token_id, [m.shape[0] for m in marks])  # before the tower
        tower = self.core.vision_tower
        cls = has_cls_token(tower)
        probe_needs = frozenset(needs) & frozenset(ATTENTION_SIGNALS)
        # one pass through the tower: the model's own feature path, with the probe recording the signal layer
        with probe(signal_layer(tower, layer), probe_needs, 0 if cls else None) as p:
            out = self.core.get_image_features(pixel_values, image_sizes, vision_feature_layer=layer,
                                               vision_feature_select_strategy=strategy,
                                               batch_num_images=batch_num_images, return_dict=True)
        feats = list(out.pooler_output)
        if [f.shape[0] for f in feats] != [m.shape[0] for m in marks]:  # adapter bug, not user input
            raise RuntimeError(f"planned {[m.shape[0] for m in marks]} tokens per image, the model gave "
                               f"{[f.shape[0] for f in feats]}")
        drop = 1 if strategy == "default" else 0
        signals = self._pack_signals({name: t[:, drop:] for name, t in p.results.items()}, crops, image_sizes)
        items = []
        for i, f in enumerate(feats):
            sig = {name: t.to(f.device) for name, t in signals[i].items()}  # split device maps: where the tokens are
            if "projected" in needs:
                sig["projected"] = f
            if "text" in needs or "text_mask" in needs:
                sig.update(text_signals(self.core.get_input_embeddings(), input_ids, kwargs.get("attention_mask"),
                                        self.media_token_ids, owner[i]))
            items.append(Item("image", owner[i], f, grids[i], sig,
                              extra={"newline": marks[i].to(f.device), "crops": crops[i]}))
        return items

    def plan(self, pixel_values: torch.Tensor, image_sizes: Any, batch_num_images: Any, strategy: str
             ) -> tuple[list[int], list[torch.Tensor], list[list[tuple[int, int]]]]:
        """Without running the tower: each image's crop count, the boolean mask of its newline markers among its
        packed tokens (so its token count ``N``) and its layout, from the model's own packing of a dummy tensor."""
        crops = self.crops_per_image(pixel_values, image_sizes, batch_num_images)
        vc = self.model.config.vision_config
        per_crop = (vc.image_size // vc.patch_size) ** 2 + int(has_cls_token(self.core.vision_tower))
        per_crop -= 1 if strategy == "default" else 0
        ones = torch.ones(sum(crops), per_crop, 1, device=pixel_values.device)
        marks = [t[:, 0] < 0.5 for t in self._pack(ones, crops, image_sizes)]
        grids = [self._layout(m, c) for m, c in zip(marks, crops)]
        return crops, marks, grids

    def _pack(self, per_crop: torch.Tensor, crops: list[int], image_sizes: Any) -> list[torch.Tensor]:
        """Per-crop values ``[sum(crops), P, C]`` arranged like the image features by the model's own
        ``pack_image_features`` (crop grid, unpadding, down-scaling), with zeros as the newline markers."""
        aspect = getattr(self.model.config, "vision_aspect_ratio", None) or "anyres_max_9"
        packed, _ = self.core.pack_image_features(list(torch.split(per_crop, crops, dim=0)), image_sizes,
                                                  image_newline=per_crop.new_zeros(per_crop.shape[-1]),
                                                  vision_aspect_ratio=aspect)
        return list(packed)

    def _pack_signals(self, results: dict[str, torch.Tensor], crops: list[int], image_sizes: Any
                      ) -> list[dict[str, torch.Tensor]]:
        """The probe's per-crop ``cls_attention`` ``[crops, P]`` / ``keys`` ``[crops, P, d]`` arranged like the
        features, in one packing call (the signals ride as channels)."""
        if not results:
            return [{} for _ in crops]
        names = [(name, results[name]) for name in ATTENTION_SIGNALS if name in results]
        chans = [t.float().unsqueeze(-1) if t.dim() == 2 else t.float() for _, t in names]
        packed = self._pack(torch.cat(chans, dim=-1), crops, image_sizes)
        out = []
        for t in packed:
            d: dict[str, torch.Tensor] = {}
            start = 0
            for (name, _), c in zip(names, chans):
                width = c.shape[-1]
                d[name] = t[:, start] if name == "cls_attention" else t[:, start: start + width]
                start += width
            out.append(d)
        return out

    def _layout(self, newline: torch.Tensor, crops: int) -> L.Layout:
        """Base view + crop grid with its newline column (``[(h, w), (H, W + 1)]``) for a tiled image, base view +
        one newline marker (``[(h, w), (1, 1)]``) for an untiled one (see module doc)."""
        n = newline.shape[0]
        pos = newline.nonzero().flatten().tolist()
        if crops <= 1:
            if pos != [n - 1]:
                raise RuntimeError(f"expected one trailing newline marker, found {pos[:6]}")  # adapter bug
            side = math.isqrt(n - 1)
            h, w = (side, side) if side * side == n - 1 else (1, n - 1)
            return L.Layout([L.Segment("base", 1, h, w), L.Segment("newline", 1, 1, 1)])
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size  # the model checks the base view is side x side when tiling
        rows = len(pos)
        width1 = (n - side * side) // max(rows, 1)
        if rows == 0 or pos != [side * side + (r + 1) * width1 - 1 for r in range(rows)]:
            raise RuntimeError(f"unexpected newline positions {pos[:6]}... for {n} tokens")  # adapter bug
        return L.Layout([L.Segment("base", 1, side, side), L.Segment("crops", 1, rows, width1, newline=True)])

    def rebuild(self, kwargs: dict[str, Any], items: list[Item], outputs: list[CompressOutput]) -> dict[str, Any]:
        if any(item.modality == "video" for item in items):  # clips (and images next to them): onevision_video.py
            return self.rebuild_media(kwargs, items, outputs)
        feats = [out.tokens[0] for out in outputs]
        new = self._shorten_prompt(kwargs, items, outputs, self.media_token_ids)
        for key in ("pixel_values", "image_sizes", "batch_num_images"):
            new.pop(key, None)
        new["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=tuple(feats))}
        return new

    # ---- stage "llm" (tokenzip.llm): each image's placeholder run (newline tokens included), planned without the tower
    def llm_items(self, kwargs: dict[str, Any]) -> list:
        def plan() -> tuple[list[int], list]:
            _, strategy = self._feature_args(kwargs)
            _, marks, grids = self.plan(kwargs["pixel_values"], kwargs.get("image_sizes"),
                                        kwargs.get("batch_num_images"), strategy)
            return [int(m.shape[0]) for m in marks], grids

        return image_llm_items(kwargs, self.image_token_id, plan)

    # ---- stage "input" (tokenzip.base.InputCompressor): fewer AnyRes crops (adapters/resample.py) --------------------
    input_reductions = ("crops",)
    input_keeps_media = False  # the reduced call carries precomputed features

    def input_plan(self, kwargs: dict[str, Any], reduction: str) -> list:
        return resample.onevision_input_plan(self, kwargs, reduction)

    def rescale_inputs(self, kwargs: dict[str, Any], reduction: str, items: list, targets: list[int]
                       ) -> tuple[dict[str, Any], list]:
        return resample.onevision_rescale_inputs(self, kwargs, items, targets)
