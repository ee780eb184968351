"""VisPruner: important tokens by [CLS] attention plus diverse tokens from the rest."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput


def remove_duplicates(feats: torch.Tensor, order: torch.Tensor, keep: int, step: int = 8,
                      max_cached: int = 1 << 26) -> torch.Tensor:
    """VisPruner's duplicate removal on one sample: from the candidate positions ``order`` (a 1-D tensor), drop up
    to ``step`` tokens per round until ``keep`` remain. Each round splits the candidates alternately into A and B,
    scores every A token by its largest cosine similarity to a B token and drops the highest-scoring A tokens.
    The candidates' similarity matrix is computed once when it has at most ``max_cached`` entries."""
    if keep <= 0:
        return order[:0]
    m = F.normalize(feats[order].float(), dim=-1)
    cached = m @ m.T if order.shape[0] ** 2 <= max_cached else None
    local = torch.arange(order.shape[0], device=order.device)  # positions into ``order``
    while local.shape[0] > keep:
        a, b = local[0::2], local[1::2]
        r = min(step, local.shape[0] - keep, a.shape[0])
        sim = cached.index_select(0, a).index_select(1, b) if cached is not None else m[a] @ m[b].T
        score = sim.max(dim=1).values
        # as in the released code, the surviving A tokens go first, least similar last (ties: earlier A dropped)
        survivors = torch.sort(score, descending=True, stable=True).indices[r:]
        local = torch.cat([a[survivors], b])
    return order[local]


@dataclass
class VisPruner(Compressor):
    """Keep the most attended tokens, then a diverse subset of the rest.

    "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs" (Zhang et al., ICCV
    2025; arXiv:2412.01818 v2+, the successor of FasterVLM). ``floor(k * important_ratio)`` tokens with the highest
    ``cls_attention`` are important (default 0.5, the authors' released code); the others come from the remaining
    tokens, taken in descending attention order, by repeatedly splitting them alternately into A/B, scoring each A
    token by its highest cosine similarity to a B token and dropping at most 8 of the most similar A tokens per
    round, until the budget is met. Similarity is on the tokens being compressed (the encoder's output features,
    as in the paper). Choice: with ``k = 1`` and the default ratio no token is important and the single token comes
    from the diversity step, as in the released code. Ties go to the earliest token.
    """

    important_ratio: float = 0.5
    info: ClassVar[MethodInfo] = MethodInfo(
        name="vispruner", family="attention", modalities=("image",), stage="pre_llm", query_aware=False,
        reference="VisPruner: Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in "
                  "VLMs, arXiv:2412.01818 (v2+)")
    requires: ClassVar[tuple[str, ...]] = ("cls_attention",)

    def __post_init__(self) -> None:
        super().__post_init__()
        r = self.important_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"important_ratio must be a float in [0, 1], got {r!r}")

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        n_imp = min(k, math.floor(k * float(self.important_ratio)))
        order = torch.sort(signals["cls_attention"].float(), dim=-1, descending=True, stable=True).indices
        rows = []
        for i in range(tokens.shape[0]):
            diverse = remove_duplicates(tokens[i], order[i, n_imp:], k - n_imp)
            rows.append(torch.cat([order[i, :n_imp], diverse]))
        return ops.select(tokens, torch.stack(rows))
