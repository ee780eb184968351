"""Top-k by the vision encoder's [CLS] attention (FasterVLM)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import MethodInfo
from ..scorer import ScorerCompressor


@dataclass
class ClsTopK(ScorerCompressor):
    """Keep the ``k`` tokens the [CLS] token attends to most, in their original order.

    FasterVLM ("[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference Faster",
    Zhang et al., arXiv:2412.01818 v1; later versions of that arXiv entry became VisPruner). The paper reads the
    [CLS] row of the penultimate layer's attention, averaged over heads; we use the adapter's ``cls_attention``
    signal, which for encoders without a [CLS] token is the mean attention each token receives (a departure the
    paper does not cover). Ties go to the earlier token.
    """

    info: ClassVar[MethodInfo] = MethodInfo(
        name="cls_topk", family="attention", modalities=("image",), stage="pre_llm", query_aware=False,
        reference="FasterVLM: [CLS] Attention is All You Need for Training-Free Visual Token Pruning, "
                  "arXiv:2412.01818 (v1)")
    requires: ClassVar[tuple[str, ...]] = ("cls_attention",)

    def score_tokens(self, tokens: torch.Tensor, layout: ops.Layout, signals: dict[str, torch.Tensor]) -> torch.Tensor:
        return signals["cls_attention"].float()
