"""Tiny random-weight instances of the real transformers classes, and inputs for them.

Used by the test-suite and the ``tiny`` bench preset. Each ``Case`` knows how to build its model with a given
attention implementation and how to make a (padded) batch of samples with media."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

IMAGE_TOKEN = 100
PAD = 0
VOCAB = 128


@dataclass
class Sample:
    """One prompt: text token ids around ``n_items`` media items, and a seed for its media."""

    before: list[int]
    n_items: int
    after: list[int]
    seed: int


def default_samples() -> list[Sample]:
    return [
        Sample([1, 5, 6, 7], 1, [8, 9, 10, 11, 12], seed=1),
        Sample([1, 13], 2, [14, 15, 16], seed=2),
        Sample([1, 17, 18, 19, 20, 21, 22], 1, [23], seed=3),
    ]


@dataclass
class Case:
    name: str
    build: Callable[[str], torch.nn.Module]  # attn_implementation -> model (eval, seeded)
    make_inputs: Callable[[torch.nn.Module, list[Sample]], dict[str, Any]]  # left-padded batch
    language_model: Callable[[torch.nn.Module], torch.nn.Module]  # the module whose input length we check
    modalities: tuple[str, ...] = ("image",)
    stages: tuple[str, ...] = ("pre_llm",)


def left_pad(rows: list[list[int]], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def _llama_text_config(**kw: Any):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=PAD, bos_token_id=1, eos_token_id=2, **kw)


def tiny_llava(attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=_llama_text_config(), image_token_id=IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=PAD)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    return model.eval()


def llava_inputs(model: torch.nn.Module, samples: list[Sample]) -> dict[str, Any]:
    size = model.config.vision_config.image_size
    n = (size // model.config.vision_config.patch_size) ** 2
    rows, pixels = [], []
    for s in samples:
        rows.append(s.before + [IMAGE_TOKEN] * (n * s.n_items) + s.after)
        g = torch.Generator().manual_seed(s.seed)
        pixels.append(torch.randn(s.n_items, 3, size, size, generator=g))
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(pixels)}


CASES: dict[str, Case] = {
    "llava": Case("llava", tiny_llava, llava_inputs, lambda m: m.model.language_model),
}
