"""tokenzip's vLLM models: Qwen2.5-VL and Qwen2-VL (vLLM 0.32's in-tree classes) with compressed images and videos.

The contract and what each hook does are tokenzip/vllm/common.py's (shared with Qwen3-VL). Both architectures
compress images and videos; tokenzip writes the placeholders of both modalities.

Qwen2-VL's in-tree class has no pruning hooks: its subclass adds the interface and an ``embed_multimodal`` that calls
the same two post-processing hooks. ``recompute_mrope_positions`` is tokenzip's own for both (vLLM's, which EVS
uses, misplaces the second of two pruned items in one prompt: see the method in common.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..deps import optional_imports
from .common import TokenzipProcessorMixin, TokenzipQwenVLMixin

with optional_imports():  # a missing vLLM names the extra: pip install "tokenzip[vllm]"
    from vllm.model_executor.models.interfaces import SupportsMultiModalPruning
    from vllm.model_executor.models.qwen2_5_vl import (
        Qwen2_5_VLDummyInputsBuilder,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLMultiModalProcessor,
        Qwen2_5_VLProcessingInfo,
    )
    from vllm.model_executor.models.qwen2_vl import (
        Qwen2VLDummyInputsBuilder,
        Qwen2VLForConditionalGeneration,
        Qwen2VLMultiModalProcessor,
        Qwen2VLProcessingInfo,
    )
    from vllm.multimodal import MULTIMODAL_REGISTRY


class TokenzipQwen2_5_VLProcessor(TokenzipProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    tokenzip_modalities = ("image", "video")


class TokenzipQwen2VLProcessor(TokenzipProcessorMixin, Qwen2VLMultiModalProcessor):
    tokenzip_modalities = ("image", "video")


class _Qwen2Family(TokenzipQwenVLMixin):
    """Items' grids for the positions: the in-tree ``iter_mm_grid_thw`` (the temporal factor included)."""

    def _tokenzip_grids(self, features: list[Any]) -> Iterator[tuple[int, int, int, int, float]]:
        return self.iter_mm_grid_thw(features)


@MULTIMODAL_REGISTRY.register_processor(TokenzipQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class TokenzipQwen2_5_VLForConditionalGeneration(_Qwen2Family, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL (vLLM's in-tree class) with tokenzip's compression (tokenzip/vllm/common.py)."""

    model_type = "qwen2_5_vl"


@MULTIMODAL_REGISTRY.register_processor(TokenzipQwen2VLProcessor, info=Qwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class TokenzipQwen2VLForConditionalGeneration(_Qwen2Family, Qwen2VLForConditionalGeneration,
                                              SupportsMultiModalPruning):
    """Qwen2-VL (vLLM's in-tree class, which has no pruning hooks) with tokenzip's compression: the pruning
    interface and an ``embed_multimodal`` that calls the post-processing hooks."""

    model_type = "qwen2_vl"

    def embed_multimodal(self, **kwargs: object) -> tuple[torch.Tensor, ...]:
        modalities = self._parse_and_validate_multimodal_inputs(**kwargs)
        out: tuple[torch.Tensor, ...] = ()
        for key, media_input in (modalities or {}).items():  # the in-tree order of modalities
            if key == "images":
                out += self._postprocess_image_embeds_evs(self._process_image_input(media_input), media_input)
            elif key == "videos":
                out += self._postprocess_video_embeds_evs(self._process_video_input(media_input), media_input)
        return out
