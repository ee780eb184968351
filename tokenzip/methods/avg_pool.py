"""2-D average pooling of the token grid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput


@dataclass
class AvgPool(Compressor):
    """Average pooling over the spatial grid (temporal axis for 1-D sequences).

    As in LLaVA-OneVision's/LLaVA-Video's 2x2 pooling of video frames and Qwen2-Audio's stride-2 pooling
    ("LLaVA-OneVision: Easy Visual Task Transfer", arXiv:2408.03326; "Qwen2-Audio Technical Report",
    arXiv:2407.10759). Departure: the papers pool with a fixed stride; to meet any budget exactly we use adaptive
    rectangular bins, and when ``k`` is not a product ``rows x cols`` the last band of rows gets fewer, wider bins.
    A layout of several grids (e.g. base view + anyres crops) shares ``k`` among them in proportion to their size.
    """

    info: ClassVar[MethodInfo] = MethodInfo(
        name="avgpool", family="transformation", modalities=("image", "audio"), stage="pre_llm",
        query_aware=False, reference="LLaVA-OneVision, arXiv:2408.03326 (spatial pooling); Qwen2-Audio, "
                                     "arXiv:2407.10759 (temporal pooling)")

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        assign = ops.pool_assignment(layout, k, tokens.device).expand(tokens.shape[0], -1)
        return ops.merge(tokens, assign, k)
