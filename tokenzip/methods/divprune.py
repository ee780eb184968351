"""DivPrune: keep a maximally diverse subset (greedy max-min diversity)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput


def greedy_max_min(feats: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Greedy max-min diversity selection on cosine distance for one sample's ``[N, D]`` features; returns ``k``
    indices in pick order. Distances are computed row by row (memory ``O(N * chunk)``, not ``O(N^2)``).

    The first pick is the token farthest from its nearest neighbour; every next pick is the token whose distance
    to the already picked set is largest. Ties go to the earliest token."""
    x = F.normalize(feats.float(), dim=-1)
    n = x.shape[0]
    nearest = torch.empty(n, device=x.device)
    for s in range(0, n, chunk):
        dist = 1.0 - x[s: s + chunk] @ x.T
        rows = torch.arange(dist.shape[0], device=x.device)
        dist[rows, rows + s] = float("inf")  # not its own neighbour
        nearest[s: s + chunk] = dist.min(dim=1).values
    picked = torch.zeros(n, dtype=torch.bool, device=x.device)
    score = nearest.nan_to_num(posinf=0.0)  # N == 1: no neighbour at all
    order = []
    for step in range(k):
        i = int(torch.argmax(score.masked_fill(picked, float("-inf"))))  # first maximum: earliest token
        order.append(i)
        picked[i] = True
        dist_i = 1.0 - x @ x[i]
        # distance of every token to the picked set (the first pick replaces the nearest-neighbour score)
        score = dist_i if step == 0 else torch.minimum(score, dist_i)
    return torch.tensor(order, dtype=torch.long, device=x.device)


@dataclass
class DivPrune(Compressor):
    """Keep the ``k`` tokens that solve the Max-Min Diversity Problem greedily on cosine distance.

    "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models" (Alvar et al., CVPR 2025,
    arXiv:2503.02175). As in the paper, the first token is the one with the largest distance to its nearest
    neighbour and each further token maximises its minimum cosine distance (``1 - cos``) to the tokens already
    kept. Departure/choice: the paper measures distances on the visual embeddings fed to the LLM; we use the
    ``projected`` signal (those embeddings) when the adapter provides it and otherwise the tokens being compressed
    (for LLaVA-1.5 that is the encoder features before the projector). Ties go to the earliest token.
    """

    info: ClassVar[MethodInfo] = MethodInfo(
        name="divprune", family="similarity", modalities=("image", "audio"), stage="pre_llm",
        query_aware=False, reference="DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models, "
                                     "arXiv:2503.02175")
    optional: ClassVar[tuple[str, ...]] = ("projected",)

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        feats = signals.get("projected", tokens)
        rows = []
        for i in range(tokens.shape[0]):
            rows.append(greedy_max_min(feats[i], k))
        return ops.select(tokens, torch.stack(rows))
