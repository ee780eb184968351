"""SpeechPrune: prune audio tokens by speech-text similarity, then by first-layer attention."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import MethodInfo
from ..llm.base import LLMCompressor
from ..output import CompressOutput


@dataclass
class SpeechPrune(LLMCompressor):
    """SpeechPrune ("SpeechPrune: Context-aware Token Pruning for Speech Information Retrieval", Lin et al.,
    arXiv:2412.12009), for Speech LLMs such as Qwen2-Audio (stage ``"llm"``).

    Two phases, both query-aware, on each clip's audio tokens:

    1. speech-text similarity: each audio token is scored by its highest cosine similarity to the prompt's text
       tokens after the clip; the ``ceil(phase1 * k)`` best (at most all) go on to phase 2;
    2. first-layer attention: of those, the ``k`` that receive the most attention from the text tokens after the clip
       (mean over their rows and over heads) in the LLM's first decoder layer are kept, in temporal order.

    Stage: the pruning happens before decoder layer ``layer`` (default 1), scored with the attention of layer
    ``layer - 1`` (layer 0: the paper's first transformer layer), and the rest of the LLM runs on the kept tokens.

    Departures (choices the implementation makes, to document): the paper scores with an *approximated* (binarized)
    first-layer attention so that it can prune before the LLM; we read the exact attention of layer 0 (recomputed
    from its q/k projections) and therefore let layer 0 run on the full sequence, pruning from layer 1 on (a
    FastV-style placement). Phase 1 compares the tokens' hidden states at the input of ``layer`` (not the raw input
    embeddings), and we aggregate over text tokens by the maximum (our choice). Without text after the clip, phase 1
    keeps everything and phase 2 ranks by the last token's attention row. Budget per clip; ties go to the earlier
    token; kept tokens keep their original positions.
    """

    layer: int = 1
    phase1: float = 2.0

    info: ClassVar[MethodInfo] = MethodInfo(
        name="speechprune", family="query", modalities=("audio",), stage="llm", query_aware=True,
        reference="Lin et al., SpeechPrune: Context-aware Token Pruning for Speech Information Retrieval, "
                  "arXiv:2412.12009")
    # text_mask: without it every text row counts as real
    requires: ClassVar[tuple[str, ...]] = ("last_attention", "text_attention", "text")
    optional: ClassVar[tuple[str, ...]] = ("text_mask",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer must be an int >= 1, got {self.layer!r}")
        if isinstance(self.phase1, bool) or not isinstance(self.phase1, (int, float)) or not self.phase1 >= 1:
            raise ValueError(f"phase1 must be a number >= 1 (phase-1 keeps phase1 * k tokens), got {self.phase1!r}")

    def schedule(self, n: int, num_layers: int) -> list[tuple[int, int]]:
        return [(self.check_layer(self.layer, num_layers), self.budget.count(n))]

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        m = tokens.shape[1]
        score = signals["last_attention"].float()
        text = signals.get("text")
        if text is None or text.shape[1] == 0:
            return ops.select(tokens, ops.stable_topk(score, k))
        mask = signals.get("text_mask")
        mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device) if mask is None else mask.bool()
        has_text = mask.any(dim=1)  # [B]; rows without text fall back to the last token's attention
        w = mask.float().unsqueeze(-1)  # [B, T, 1]
        att = (signals["text_attention"].float() * w).sum(dim=1) / w.sum(dim=1).clamp(min=1)  # mean over real rows
        score = torch.where(has_text[:, None], att, score)
        sim = ops.cosine_similarity_matrix(tokens, text).masked_fill(~mask[:, None, :], float("-inf"))
        first = ops.stable_topk(sim.max(dim=-1).values, min(m, math.ceil(self.phase1 * k)))
        phase2 = torch.full_like(score, float("-inf")).scatter(1, first, score.gather(1, first))
        score = torch.where(has_text[:, None], phase2, score)
        return ops.select(tokens, ops.stable_topk(score, k))
