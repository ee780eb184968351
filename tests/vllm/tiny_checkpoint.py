"""A tiny random-weight Qwen2.5-VL / Qwen2-VL / Qwen3-VL checkpoint in a directory, with a tokenizer and processor
made here (no hub): what vLLM loads in tests/vllm, and what the HF path loads for the same weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tokenzip.vllm.checkpoint import save, token_ids, tokenizer


def build(path: Path, arch: str = "qwen2_5_vl", seed: int = 0) -> Path:
    """Save model, tokenizer and processor of a tiny ``arch`` ("qwen2_5_vl", "qwen2_vl" or "qwen3_vl") in
    ``path``."""
    import transformers as tf

    tok = tokenizer()
    ids = token_ids(tok)
    text = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=1024, rms_norm_eps=1e-6, initializer_range=0.1,
                bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]})
    if arch == "qwen2_5_vl":
        # window 56 px = 2x2 merged tokens; block 0 full attention, the LAST block windowed (the signal path's
        # harder case: attention received within windows, window order undone)
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14,
                      temporal_patch_size=2, spatial_merge_size=2, window_size=56, out_hidden_size=128,
                      fullatt_block_indexes=[0], tokens_per_second=2, initializer_range=0.1)
        cfg = tf.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
        model_cls = tf.Qwen2_5_VLForConditionalGeneration
    elif arch == "qwen2_vl":
        vision = dict(depth=2, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=14,
                      temporal_patch_size=2, spatial_merge_size=2, initializer_range=0.1)
        cfg = tf.Qwen2VLConfig(vision_config=vision, text_config=text, **ids)
        model_cls = tf.Qwen2VLForConditionalGeneration
    elif arch == "qwen3_vl":
        # 16-px patches; DeepStack levels after vision blocks 0 and 1, added after text layers 0 and 1; q/k norms
        # and interleaved M-RoPE in the text model (Qwen3's)
        text.update(head_dim=64, rope_parameters=dict(text["rope_parameters"], mrope_interleaved=True))
        vision = dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16,
                      temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=128, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1], initializer_range=0.1)
        cfg = tf.Qwen3VLConfig(vision_config=vision, text_config=text, **ids)
        model_cls = tf.Qwen3VLForConditionalGeneration
    else:
        raise ValueError(f"arch must be 'qwen2_5_vl', 'qwen2_vl' or 'qwen3_vl', got {arch!r}")
    torch.manual_seed(seed)
    model = model_cls._from_config(cfg, torch_dtype=torch.float32).eval()
    with torch.no_grad():  # random weights with visible structure: a wrong token or position changes the output
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    unit = (vision["patch_size"] * vision["spatial_merge_size"]) ** 2  # one merged token's pixels
    save(path, model, tok, 4 * unit, 64 * unit)
    return Path(path)


def image(h: int, w: int, seed: int) -> np.ndarray:
    """An RGB uint8 image with structure (smooth gradients + noise), ``h x w`` pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / (7 + seed)), np.cos(y / 9), np.sin((x + y) / 11)], -1)
    return ((base * 0.4 + 0.5 + rng.normal(0, 0.15, (h, w, 3))).clip(0, 1) * 255).astype(np.uint8)


def video(frames: int, h: int, w: int, seed: int) -> np.ndarray:
    """``[frames, h, w, 3]`` uint8 frames with motion."""
    return np.stack([np.roll(image(h, w, seed), 6 * i, axis=1) for i in range(frames)])
