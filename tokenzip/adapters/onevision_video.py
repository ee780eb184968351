"""LLaVA-OneVision video items: what :class:`~tokenzip.adapters.llava_onevision.LlavaOnevisionAdapter` adds for
``pixel_values_videos`` (a mixin on adapters/pooled_video.py, shared with LLaVA-NeXT-Video; the image path is
adapters/anyres.py).

What is compressed. Each clip's LLM-space features exactly as the stock model feeds them to the LLM: the output of
``model.model.get_video_features`` — SigLIP per frame, the projector, ``apply_pooling`` (bilinear down-scaling of
the ``side x side`` patch grid to ``ceil(side / 2)`` per axis: 27 -> 14, 196 tokens per frame at 384 px), the frames
concatenated, and ONE ``image_newline`` token closing the clip. A clip's budget ``N = T * g * g + 1`` counts that
newline: it is one token of the item like the image newlines, so a method may keep, drop or merge it (the model has
no rule that needs it). Layout: ``[frames(T, g, g), newline(1, 1, 1)]`` (``Item.extra["newline"]`` masks it).

Signals (as for images). SigLIP has no CLS token: ``cls_attention`` is the attention each patch receives (mean over
queries and heads) at the vision feature layer, recomputed from that layer's q/k for every frame by the probe during
the same ``get_video_features`` pass; ``keys`` are that layer's keys (mean over heads). Both live on the
``side x side`` patch grid of each frame, so they are pooled to the ``g x g`` token grid by the model's own
``apply_pooling`` (the signals ride as channels: the same bilinear interpolation the features get); the newline
token gets ``cls_attention`` 0 and zero keys. ``projected`` is the tokens themselves; ``text`` / ``text_mask`` the
prompt's text embeddings (image and video placeholders excluded).

Rebuild. Every clip keeps its first ``k`` ``<video>`` placeholders; the compressed features go to the stock model as
``mm_encoder_outputs["video"]`` — a 3-D ``pooler_output`` ``[1, sum k, D]`` filled row-major over the placeholders,
which is how ``forward`` scatters it (``flatten(0, 1)``) — next to ``mm_encoder_outputs["image"]`` for the images of
the same call. Items come in sequence order (sample, then position), images and clips mixed.

Batches. ``pixel_values_videos`` is one ``[V, T, 3, S, S]`` tensor: every clip of a call has the same ``T`` (the
model cannot take clips of different lengths in one call); a sample may hold zero, one or several clips.

Stage "llm" (tokenzip/llm). Each clip is one item of the LLM sequence: its run of ``T * g * g + 1`` ``<video>``
placeholders with the layout above. After a pre-LLM method (``tz.compose``) the runs have the kept counts, which the
rebuild records next to the features (:class:`ClipFeatures` ``clip_tokens``: the concatenated row alone does not say
where one clip ends); precomputed features the caller built in the model's own ``[V, N, D]`` form are one clip per
row. An LLM-stage method whose ``info.modalities`` has no ``"video"`` leaves the clips whole (tokenzip/patch.py).

Stage "input", reduction ``"frames"`` (``tokenzip.base.FrameSelector``: frame selection BEFORE the vision encoder).
``video_input_plan`` gives one item per clip: ``N = T * g * g + 1``, achievable counts ``j * g * g + 1`` for ``j = 1 ..
T`` kept frames (the newline stays), and the clip's frames as RGB in ``[0, 1]`` in ``extra["frames"]``: the call's
``pixel_values_videos`` un-normalised with the video processor's mean/std (``video_pixel_mean``/``video_pixel_std``:
``LlavaOnevisionVideoProcessor``'s CLIP values, which the released checkpoints use; set them on the adapter class
for a processor with other values) and clamped to ``[0, 1]``. ``video_rescale_inputs`` keeps each clip's chosen
frames (``InputItem.keep``) of ``pixel_values_videos`` and the first ``k * g * g + 1`` of its ``<video>``
placeholders (``attention_mask``, ``labels`` ... shortened with them; 2-D ``position_ids`` renumbered). The call still
carries pixels, so the model's own ``get_video_features`` encodes only the kept frames, and an encoder-stage or
pre-LLM method can follow in a ``tz.compose`` pipeline. SigLIP, the projector and ``apply_pooling`` work frame by
frame, so a kept frame's tokens are the tokens the full clip gives it: ``source``/``index`` map them (and the newline)
to their original positions; dropped frames' tokens map to -1. The model takes ONE ``[V, T, 3, S, S]`` tensor, so
every clip of a call must keep the same number of frames (with a per-clip budget they do: every clip has the same
``N``); other counts are a ValueError. Images of the same call pass unchanged.

Not supported: stage ``"encoder"`` on videos (a clear ValueError).
"""

from __future__ import annotations

import math

import torch

from .pooled_video import ClipFeatures, PooledVideo


class OnevisionVideo(PooledVideo):
    """Mixin: LLaVA-OneVision video items (module doc): ``apply_pooling`` to ``ceil(side / 2)`` per axis and one
    ``image_newline`` closing each clip."""

    video_trailing = 1

    def video_grid(self) -> int:
        """Pooled tokens per frame side: ``ceil(side / 2)`` of the ``side x side`` patch grid (``apply_pooling``)."""
        vc = self.model.config.vision_config
        return math.ceil(vc.image_size // vc.patch_size / 2)

    def pool_signal_channels(self, per_patch: torch.Tensor) -> torch.Tensor:
        """The model's own ``apply_pooling`` (bilinear), the same interpolation the features get."""
        return self.core.apply_pooling(per_patch)


__all__ = ["ClipFeatures", "OnevisionVideo"]
