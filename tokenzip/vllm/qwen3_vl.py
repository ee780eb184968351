"""tokenzip's vLLM model for Qwen3-VL (vLLM 0.32's in-tree ``Qwen3VLForConditionalGeneration``): compressed images.

The contract and the hooks are tokenzip/vllm/common.py's, shared with Qwen2.5-VL. The in-tree class already
implements ``SupportsMultiModalPruning`` (for its EVS / VidCom2 video pruning); tokenzip's subclass overrides its
hooks as on Qwen2.5-VL. What differs:

* **DeepStack.** vLLM's vision tower returns, per LLM token, the merger's row followed by one row per DeepStack level
  (``[n, out_hidden_size * (1 + levels)]``); ``embed_input_ids`` splits them again and hands the levels to the text
  model, added at the media positions after decoder layers ``0 ... levels - 1``. The method compresses the merger's
  rows only (``projected`` is them, as on the HF path, whose tokens are ``pooler_output``), and each output token's
  DeepStack rows are cut with the same groups: the mean of the rows of the input tokens its ``CompressOutput.source``
  group holds, a kept token's own rows bit for bit (:func:`tokenzip.adapters.merge_unit_vit.cut_rows`,
  the HF adapter's own function). So the text model adds to each kept token the rows tokenzip's HF path adds.
* **Signals** from vLLM's last vision block as on Qwen2.5-VL (the tower uses the same attention module; no windows):
  ``cls_attention`` is the attention each patch receives from its image's queries, ``keys`` the keys before rotary,
  both mean over heads and over the 2x2 merge group, as the HF adapter computes them.
* **Positions**: an image of merged grid ``(h, w)`` takes positions ``(0, i, j)`` after the text before it (the
  in-tree ``get_mrope_input_positions``); tokenzip's ``get_mrope_input_positions`` / ``recompute_mrope_positions``
  give each kept token its own, as on Qwen2.5-VL.

**Images only.** Qwen3-VL lays a clip out as one placeholder run per temporal grid, each after its own timestamp
TEXT (``<t seconds><vision_start><video_pad>*(h*w/4)<vision_end>``); on the HF path a kept video token stays in its
own grid's run, after its timestamp. vLLM's contract fixes every run's length before the encoder runs, so the
per-grid counts of a content-dependent selection cannot be known there (vLLM's EVS lumps all kept tokens into the
first grid's run instead, which puts them before the later timestamps: another sequence than tokenzip's HF path).
And with pruning switched on, the in-tree processor lays out every clip in that lumped form. So the engine refuses to
load unless videos are off (``limit_mm_per_prompt={"video": 0}``), with a method that compresses videos included.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..adapters.merge_unit_vit import cut_rows
from ..deps import optional_imports
from ..output import CompressOutput
from . import config as C
from .common import TokenzipProcessorMixin, TokenzipQwenVLMixin

with optional_imports():  # a missing vLLM names the extra: pip install "tokenzip[vllm]"
    from vllm.model_executor.models.qwen3_vl import (
        Qwen3VLDummyInputsBuilder,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMultiModalProcessor,
        Qwen3VLProcessingInfo,
    )
    from vllm.multimodal import MULTIMODAL_REGISTRY


class TokenzipQwen3VLProcessor(TokenzipProcessorMixin, Qwen3VLMultiModalProcessor):
    tokenzip_modalities = ("image",)


def check_images_only(vllm_config: Any) -> None:
    """Engine-load check: tokenzip's Qwen3-VL model serves images; videos must be off (module docstring)."""
    hf_config = vllm_config.model_config.hf_config
    method = C.method_from_config(hf_config)
    mm = vllm_config.model_config.multimodal_config
    videos = mm.get_limit_per_prompt("video")
    if "video" in method.info.modalities and "image" not in method.info.modalities:
        raise ValueError(f"method {method.info.name!r} compresses videos; tokenzip's vLLM Qwen3-VL model serves "
                         f"images only (Qwen3-VL puts each temporal grid after its own timestamp text, and vLLM fixes "
                         f"each grid's placeholder count before the encoder chooses the tokens)")
    if videos > 0:
        raise ValueError(f"tokenzip's vLLM Qwen3-VL model serves images only: set limit_mm_per_prompt={{'video': 0}} "
                         f"(got {videos} videos per prompt). Qwen3-VL puts each temporal grid after its own timestamp "
                         f"text, and vLLM fixes each grid's placeholder count before the encoder chooses the tokens")


@MULTIMODAL_REGISTRY.register_processor(TokenzipQwen3VLProcessor, info=Qwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class TokenzipQwen3VLForConditionalGeneration(TokenzipQwenVLMixin, Qwen3VLForConditionalGeneration):
    """Qwen3-VL (vLLM's in-tree class) with tokenzip's compression of images, DeepStack rows cut with the tokens
    (module docstring)."""

    model_type = "qwen3_vl"

    def __init__(self, *, vllm_config: Any, prefix: str = "model") -> None:
        check_images_only(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def _tokenzip_split(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.use_deepstack or self.deepstack_num_level == 0:
            return emb, None
        return emb[:, : self.visual_dim], emb[:, self.visual_dim:]

    def _tokenzip_carry(self, res: CompressOutput, rows: torch.Tensor | None) -> torch.Tensor:
        tokens = res.tokens[0]
        if rows is None:
            return tokens
        return torch.cat([tokens, cut_rows(rows, res).to(tokens.dtype)], dim=1)

    def _tokenzip_grids(self, features: list[Any]) -> Iterator[tuple[int, int, int, int, float]]:
        merge = int(self.config.vision_config.spatial_merge_size)
        for feature in features:
            if feature.modality != "image":
                raise ValueError(f"tokenzip's vLLM Qwen3-VL model serves images only, got a {feature.modality} item")
            t, h, w = (int(x) for x in feature.data["image_grid_thw"].data.tolist())
            yield feature.mm_position.offset, t, h // merge, w // merge, 1.0
