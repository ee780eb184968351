"""Top-K audio tokens by the attention they receive in the encoder's last layer (optionally segment-wise)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import MethodInfo
from ..scorer import ScorerCompressor


@dataclass
class AttnTopK(ScorerCompressor):
    """Keep the ``k`` tokens that receive the most attention in the audio encoder, in temporal order.

    Top-K selection as applied to Whisper-style audio encoders in "Segmentwise Pruning in Audio-Language Models"
    (Gibier et al., arXiv:2511.14293): a token's score is the softmax attention it receives, averaged over heads
    and queries, in the encoder's last layer (Whisper has no CLS token). ``segments=S > 1`` is that paper's
    Segmentwise Top-K: the sequence is cut into ``S`` equal time segments and each keeps its share of ``k``
    (largest-remainder split, so the total is exact), which spreads the kept tokens over time. The issue attributes
    Top-K to "Lee & Lee 2025"; we could not verify that reference, so we cite the paper above, whose baseline and
    segment variant this implements. Departure: the score comes from the last encoder layer only (the layer whose
    output the decoder reads). Ties go to the earlier token.
    """

    segments: int = 1
    info: ClassVar[MethodInfo] = MethodInfo(
        name="attn_topk", family="attention", modalities=("audio",), stage="pre_llm", query_aware=False,
        reference="Top-K / Segmentwise Top-K: Segmentwise Pruning in Audio-Language Models, arXiv:2511.14293")
    requires: ClassVar[tuple[str, ...]] = ("cls_attention",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.segments, bool) or not isinstance(self.segments, int) or self.segments < 1:
            raise ValueError(f"segments must be an int >= 1, got {self.segments!r}")

    def score_tokens(self, tokens: torch.Tensor, layout: ops.Layout, signals: dict[str, torch.Tensor]) -> torch.Tensor:
        return signals["cls_attention"].float()

    def keep(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        # Segmentwise Top-K: each of the S time segments keeps its share of k (S = 1: plain top-k)
        n = scores.shape[1]
        s = min(self.segments, n)
        bounds = [((i * n) // s, ((i + 1) * n) // s) for i in range(s)]
        alloc = ops.split_budget([b - a for a, b in bounds], k)
        parts = [a + ops.stable_topk(scores[:, a:b], kk) for (a, b), kk in zip(bounds, alloc) if kk > 0]
        return torch.cat(parts, dim=1)
