"""GLM-4.1V, GLM-4.5V and GLM-4.6V (``Glm4vForConditionalGeneration``, ``Glm4vMoeForConditionalGeneration``,
``Glm46VForConditionalGeneration``): images and videos, before and inside the LLM.

The model (``models/glm4v/modeling_glm4v.py``; GLM-4.6V's ``Glm46VModel`` builds the same vision tower and text
model through ``AutoModel``). A ViT over 14-px patches (a Conv3d over ``temporal_patch_size = 2`` frames, learned
position embeddings interpolated to the grid, 2-D rotary embeddings, blocks with one fused ``qkv`` and attention
segments of one temporal grid), a post-norm, then each 2x2 group of neighbouring patches (four consecutive patches)
is downsampled by a stride-2 convolution into one token and mapped by the merger into the LLM's space. An image of
``grid_thw = (1, h, w)`` patches is ``<|begin_of_image|> <|image|>*(h*w/4) <|end_of_image|>``. **Videos reuse the
image placeholder**: a clip of ``t`` temporal grids is ``<|begin_of_video|>``, then per temporal grid
``<|begin_of_image|> <|image|>*(h*w/4) <|end_of_image|>`` and its timestamp text, then ``<|end_of_video|>``;
``mm_token_type_ids`` (2 at a clip's placeholders) tells ``get_rope_index`` which grid a run belongs to, and
``get_video_features`` runs the ViT on one ``(1, h, w)`` grid per temporal grid. The decoder is a plain
full-attention M-RoPE LLM (GLM-4.5V: its MoE variant).

Design: :mod:`tokenzip.adapters.mrope_vl` (items, signals from the last vision block, positions gathered from the
model's own ``get_rope_index`` of the full sequence, ``mm_encoder_outputs``, stage "llm"). What is particular here:

* a clip's placeholders are the image token (``video_placeholder``); the model's placeholder check counts every
  image token for each modality, so the model itself refuses images and videos in one call: so does the adapter,
  with a ValueError, before anything runs;
* ``rope_deltas`` and the explicit ``[4, B, L']`` position ids are those of the shared design; the begin/end markers
  and timestamps are text and stay;
* stage "encoder" (:mod:`tokenzip.adapters.merge_unit_vit`, shared with Qwen3-VL / Qwen3.5): the ViT meets the
  contract (blocks on ``[patches, D]`` with ``cu_seqlens`` of one temporal grid and a per-patch rotary embedding; the
  learned position embedding is added before block 0, so it is in the stopped pass's states), and the tail after
  the blocks is GLM's own (:meth:`Glm4vAdapter._vision_tail`: post-norm, the stride-2 ``downsample`` convolution
  over each unit's four patches, merger), which maps each unit independently, so it runs on the kept units only.
  A clip's pass is ``get_video_features``' (one ``(1, h, w)`` grid per temporal grid: the same segments);
* stage "input": ``resize`` (images) and ``frames`` (clips: whole temporal grids, as on Qwen3-VL / Qwen3.5,
  :func:`tokenzip.adapters.temporal_grids.timestamped_frames_call`). ``Glm4vProcessor`` writes each grid's
  timestamp AFTER its block (``replace_frame_token_id``: ``<|begin_of_image|> <|image|>*n <|end_of_image|>`` then
  ``int(seconds)`` of the grid's first frame) and the clip's ``video_grid_thw`` is one ``(t, h, w)`` row, which the
  model splits into ``(1, h, w)`` grids itself; so a dropped grid's block is its markers, placeholders and the
  timestamp that follows (:func:`~tokenzip.adapters.temporal_grids.trailing_timestamp_spans`: up to the next
  grid's ``<|begin_of_image|>``, the last grid's up to ``<|end_of_video|>``), and the call is the processor's for
  the kept frames (their timestamps are the same seconds); the frames the selector sees are un-normalised with
  ``Glm4vVideoProcessor``'s OpenAI-CLIP mean/std.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from . import temporal_grids as TG
from .mrope_vl import MRopeVLAdapter


class Glm4vAdapter(MRopeVLAdapter):
    model_classes = ("Glm4vForConditionalGeneration", "Glm4vMoeForConditionalGeneration",
                     "Glm46VForConditionalGeneration")
    family = "GLM-4.1V"
    video_hint = "the model's processor (Glm4vProcessor) returns them"
    # stage "input": images resized; clips' temporal grids, each grid's timestamp after its block (module doc)
    input_reductions = ("resolution", "frames")
    frame_block_spans = TG.trailing_timestamp_spans
    # Glm4vVideoProcessor's normalisation (OpenAI-CLIP mean/std, rescale 1/255)
    video_pixel_mean: tuple[float, float, float] = tuple(OPENAI_CLIP_MEAN)
    video_pixel_std: tuple[float, float, float] = tuple(OPENAI_CLIP_STD)

    @staticmethod
    def video_placeholder(cfg: Any) -> int:
        return int(cfg.image_token_id)  # GLM-4.1V / 4.5V / 4.6V: clips sit on the image placeholder

    def _vision_tail(self, patches: torch.Tensor) -> torch.Tensor:
        """Stage "encoder": the modules after GLM's blocks, as its vision forward calls them, on the kept units'
        patch rows: the post-norm, the 2x2 ``downsample`` convolution over each unit (four consecutive patches),
        the merger."""
        v, m = self.visual, self.merge
        x = v.post_layernorm(patches).view(-1, m, m, patches.shape[-1]).permute(0, 3, 1, 2)
        return v.merger(v.downsample(x).view(-1, v.config.out_hidden_size))
