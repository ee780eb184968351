"""Qwen3.5 and Qwen3.5-MoE (``Qwen3_5ForConditionalGeneration``, ``Qwen3_5MoeForConditionalGeneration``): images and
videos, before and inside the hybrid LLM.

The model (``models/qwen3_5/modeling_qwen3_5.py``). The vision side is Qwen3-VL's without DeepStack: a ViT over
16-px patches (Conv3d over ``temporal_patch_size = 2`` frames, learned position embeddings resampled to the grid,
2-D rotary embeddings, blocks with one fused ``qkv`` and attention segments of one temporal grid) and a merger that
maps each 2x2 group of neighbouring patches (four consecutive patches) to one LLM token. Prompts as Qwen3-VL's
(``Qwen3VLProcessor``): an image is ``<vision_start> <image>*(h*w/4) <vision_end>``, a clip is per temporal grid a
timestamp text, ``<vision_start>``, ``<video>*(h*w/4)``, ``<vision_end>``; ``get_rope_index`` splits a clip per
temporal grid. **The LLM is hybrid**: Gated DeltaNet layers (linear attention: a causal depthwise convolution and a
recurrent state, no attention matrix, no positions) interleaved with full-attention layers (every
``full_attention_interval``-th layer, ``config.text_config.layer_types``) whose ``q_proj`` also produces an output
gate.

Design before the LLM: :mod:`tokenzip.adapters.mrope_vl` (items, last-block signals, positions gathered from the
model's own ``get_rope_index`` of the full sequence, ``mm_encoder_outputs``). Stage "encoder": Qwen3-VL's
(:mod:`tokenzip.adapters.merge_unit_vit`) without DeepStack taps; the tail is the model's merger. Stage "input":
``resize`` (images) and ``frames`` (whole temporal grids of a clip; a dropped grid's timestamped block leaves the
prompt, so the call is the processor's for the kept frames: Qwen3-VL's, ``adapters/temporal_grids.py``).

Design inside the LLM (stage "llm", :mod:`tokenzip.llm.hooks`): the adapter reports the layer kinds
(``llm_layer_kinds``). A token dropped before layer ``K`` never enters a later layer: the full-attention layers
run on the shortened sequence with its gathered positions, and the linear-attention layers run on it too (the
kept tokens in sequence order, the batch's filler slots on the left and zeroed by a 2-D mask, as the model zeroes
left padding), so their convolution and recurrent state see only kept tokens. The cache holds full-length
states for layers ``< K`` and shortened ones (K/V, convolution and recurrent states) for the others; decoding
continues from it. The attention signals of a stage before layer ``K`` come from the last full-attention layer
before ``K`` (a linear-attention layer has no attention to read): a method whose stage has no full-attention layer
before it and needs attention is a ValueError naming the valid layers. Attention rows read the query half of the
gated ``q_proj`` (:func:`tokenzip.llm.scores.separate_qk`).
"""

from __future__ import annotations

import torch
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD

from . import temporal_grids as TG
from .mrope_vl import MRopeVLAdapter


class Qwen3_5Adapter(MRopeVLAdapter):
    model_classes = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")
    family = "Qwen3.5"
    video_hint = "or tokenzip.video.qwen3_vl_video_inputs for videos (Qwen3.5 uses Qwen3VLProcessor)"
    # stage "input": images resized, and clips' temporal grids as on Qwen3-VL (the same processor layout)
    input_reductions = ("resolution", "frames")
    # Qwen3VLVideoProcessor's normalisation (ImageNet-standard 0.5 mean/std, rescale 1/255)
    video_pixel_mean: tuple[float, float, float] = tuple(IMAGENET_STANDARD_MEAN)
    video_pixel_std: tuple[float, float, float] = tuple(IMAGENET_STANDARD_STD)
    frame_block_spans = TG.leading_timestamp_spans  # each grid's timestamp before its block (Qwen3VLProcessor)

    def llm_mixer(self, index: int) -> torch.nn.Module:
        layer = self.llm_layers()[index]
        return layer.linear_attn if self.llm_layer_kinds()[index] == "linear_attention" else self.llm_attention(layer)
