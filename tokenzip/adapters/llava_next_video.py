"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``): LLaVA-NeXT for images (adapters/llava_next.py,
the AnyRes path of adapters/anyres.py) plus video clips (``pixel_values_videos``, the mixin of adapters/pooled_video.py
shared with LLaVA-OneVision).

What is compressed for a clip. Its LLM-space features exactly as the stock model feeds them to the LLM: the output of
``model.model.get_video_features`` — the CLIP tower per frame (feature layer, [CLS] dropped), the
``vision_resampler`` (``LlavaNextVideoPooler``: a ``spatial_pool_stride`` x ``spatial_pool_stride`` pooling, 2 x 2
average in the released configs: 24 x 24 -> 12 x 12 = 144 tokens per frame at 336 px), the projector, frames
concatenated. No newline token: a clip's ``N`` is ``T * g * g`` with ``g = side // stride``, and its layout is
``[frames(T, g, g)]``. Images next to the clips in the same call are NeXT images (layout, signals, budget as there),
one item each; items come in sequence order (sample, then position), images and clips mixed.

Signals for a clip. ``cls_attention`` is each frame's [CLS] attention over its patches (mean over heads) at the
feature layer and ``keys`` that layer's keys (mean over heads), recomputed by the probe during the same
``get_video_features`` pass, then pooled to the token grid by the same ``stride x stride`` windows with an average
(the model's own pooling for the "average" mode; for "max" and "conv", whose channel maths has no meaning for a
signal, the average over the same windows). ``projected`` is the tokens themselves; ``text`` / ``text_mask`` the
prompt's text embeddings (image and video placeholders excluded).

Rebuild. Every clip keeps its first ``k`` ``<video>`` placeholders and every image its first ``k`` ``<image>``
ones; the compressed features go through ``mm_encoder_outputs`` (``"video"``: one row ``[1, sum k, D]``, which the
model flattens and scatters over the kept placeholders; ``"image"``: the per-image tuple). ``retain=1`` gives the
model exactly its own features.

Stage "llm": each image's and each clip's placeholder run (``T * g * g`` ``<video>`` tokens, layout above; after a
pre-LLM method the kept counts). Stage "input": ``"crops"`` for images as LLaVA-NeXT; ``"frames"`` for clips (frame
selection before the tower, ``tokenzip.base.FrameSelector``): a clip can keep ``j = 1 .. T`` frames (``j * g * g``
tokens); its frames are handed to the method as RGB in ``[0, 1]`` (the call's pixels un-normalised with the CLIP
mean/std of ``LlavaNextVideoVideoProcessor``), the new call carries only the kept frames' pixels and shortened
placeholder runs, so the model's own ``get_video_features`` encodes just those (each frame is encoded and pooled on
its own, so a kept frame's tokens are the ones the full clip gives it). The model takes one ``[V, T, 3, S, S]``
tensor: every clip of a call has the same number of frames, and must keep the same number (a per-clip budget does).
Stage "encoder": images as LLaVA-NeXT; clips are refused there with a ValueError (compress them before the LLM).
"""

from __future__ import annotations

import math

import torch

from .llava_next import LlavaNextAdapter
from .pooled_video import PooledVideo


class NextVideo(PooledVideo):
    """Mixin: LLaVA-NeXT-Video clips (module doc): ``spatial_pool_stride`` pooling per frame, no newline."""

    video_trailing = 0

    def _stride(self) -> int:
        return int(self.model.config.spatial_pool_stride)

    def video_grid(self) -> int:
        """Pooled tokens per frame side: ``side // stride`` (the pooler's windows, stride = kernel, no padding)."""
        vc = self.model.config.vision_config
        return (vc.image_size // vc.patch_size) // self._stride()

    def pool_signal_channels(self, per_patch: torch.Tensor) -> torch.Tensor:
        """``[frames, side * side, C]`` -> ``[frames, g * g, C]``: the average over each ``stride x stride`` window
        (module doc)."""
        frames, n, c = per_patch.shape
        side = math.isqrt(n)
        grid = per_patch.reshape(frames, side, side, c).permute(0, 3, 1, 2)
        pooled = torch.nn.functional.avg_pool2d(grid, kernel_size=self._stride(), stride=self._stride())
        return pooled.flatten(2).transpose(1, 2)


class LlavaNextVideoAdapter(NextVideo, LlavaNextAdapter):
    """See the module docstring: images as :class:`LlavaNextAdapter`, clips by :class:`NextVideo`."""

    family = "LLaVA-NeXT-Video"
    model_classes = ("LlavaNextVideoForConditionalGeneration",)
    modalities = ("image", "video")
    input_reductions = ("crops", "frames")
