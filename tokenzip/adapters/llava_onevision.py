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

Stage "encoder" (``tz.InEncoder(method, layer=L)``, or a schedule ``layer=(l1, ..., lm)``). Every crop of every
image (base view and AnyRes crops) is one row of the SigLIP tower, as in the model; the embedding and layers
``0 .. L-1`` run on all of them unchanged. At the cut an image's candidates are its crops' patch tokens that the
model's packing keeps (the unpadded ones), in the packed order: the mapping crop patch -> packed slot comes from the
model's own ``pack_image_features`` run on an index tensor. Where ``anyres_max_*`` down-scales (large images) the
packed tokens are bilinear mixtures with no one-to-one source, so the candidates are the unpadded crop tokens
before down-scaling (that packing is asked for with a ``vision_aspect_ratio`` too large to down-scale). Their
layout is ``[(h, w), (H, W)]`` (base view, unpadded crop grid; no newline column: newline markers do not exist
inside the encoder), ``[(h, w)]`` for an untiled image. Signals at the cut: ``cls_attention``/``keys`` of layer
``L-1`` per crop (the probe above, each crop on its own tokens), ``text``/``text_mask`` as before; ``projected`` is
not available (the projector reads feature-layer tokens).

Budget: unchanged. An image's ``N`` is its packed count with newline markers, ``k = budget.count(N)`` tokens reach
the LLM exactly, and ``last_stats`` reports ``N -> k``. Markers are not encoder tokens, so the method keeps ``k``
candidates; only when ``k`` covers every candidate (near ``retain=1``; with down-scaling: ``k >= N``) is the image
kept whole: it is not compressed in the tower, its crops run in full, and the LLM gets the model's own packing
(``image_newline`` markers included) with the markers past ``k`` dropped — so an image with ``k == N`` gets exactly
the stock features, and a call where every image does (``retain=1``) runs the stock computation (no mask, one
projector call on the same rows): identical logits. Such an image's item is its packed tokens at the cut (markers
as zero vectors), ``k`` of them, which the method returns unchanged (``k >= n``).

After the cut each kept/merged token belongs to the crop of its first source token; the remaining tower layers, up
to the one the LLM reads (``vision_feature_layer``, -1 by default; later layers are never run, nor the unused
``post_layernorm``), run per crop: one row per crop that still has tokens, rows of every image of the call padded to
the longest, with one additive float mask ``[rows, 1, 1, n]``: ``log(size)`` on real keys (ToMe's proportional
attention, arXiv:2210.09461) and the dtype's minimum on padding — the form SDPA and eager both take. Then the
projector, and each image's tokens enter the LLM in the order the method returned them (ascending first source: the
packed order), with the prompt shortened as at the pre-LLM stage, through ``mm_encoder_outputs``. A schedule
compresses at each earlier cut too (the counts go from the candidates to ``k`` with a constant ratio,
:func:`tokenzip.encoder.schedule_counts`); the signals there are computed on each crop row's real tokens (padding
excluded), and after the first cut the tokens no longer tile a grid, so the method gets a 1-D layout. Supported for
one integer ``vision_feature_layer`` with the "full" select strategy (the OneVision configs); videos in the same
call are encoded as the model would and passed through uncompressed.
"""

from __future__ import annotations

from typing import Any

import torch

from .anyres import AnyResImages
from .onevision_video import OnevisionVideo


class LlavaOnevisionAdapter(OnevisionVideo, AnyResImages):
    """See the module docstring; the image path (all four stages) is adapters/anyres.py, shared with LLaVA-NeXT;
    videos: adapters/onevision_video.py."""

    family = "LLaVA-OneVision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    modalities = ("image", "video")  # videos: adapters/onevision_video.py
    input_reductions = ("crops", "frames")

    def batch_num_images(self, kwargs: dict[str, Any]) -> Any:
        return kwargs.get("batch_num_images")

    def tiling(self, n_images: int, batch_num_images: Any) -> list[bool]:
        """The model tiles an image only in a sample with one image (``batch_num_images``; absent: every image)."""
        if batch_num_images is None:
            return [True] * n_images
        counts = [int(n) for n in batch_num_images]
        if any(n < 0 for n in counts) or sum(counts) != n_images:
            raise ValueError(f"batch_num_images {counts} must be >= 0 and sum to the number of images "
                             f"({n_images} image_sizes)")
        return [n == 1 for n in counts for _ in range(n)]

    def image_features(self, pixel_values: torch.Tensor, image_sizes: Any, layer: Any, strategy: str,
                       batch_num_images: Any) -> list[torch.Tensor]:
        return list(self.core.get_image_features(pixel_values, image_sizes, vision_feature_layer=layer,
                                                 vision_feature_select_strategy=strategy,
                                                 batch_num_images=batch_num_images, return_dict=True).pooler_output)

    def pack_features(self, per_image: list[torch.Tensor], image_sizes: Any, newline: torch.Tensor,
                      aspect: str | None = None) -> list[torch.Tensor]:
        """``pack_image_features`` with the config's ``vision_aspect_ratio`` (as the stock forward, module doc) or
        ``aspect``."""
        aspect = aspect or getattr(self.model.config, "vision_aspect_ratio", None) or "anyres_max_9"
        packed, _ = self.core.pack_image_features(per_image, image_sizes, image_newline=newline,
                                                  vision_aspect_ratio=aspect)
        return list(packed)
