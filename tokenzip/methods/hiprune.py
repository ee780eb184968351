"""HiPrune: anchors from a middle encoder layer, their spatial neighbours, and register tokens from a deep layer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput


def grid_neighbours(layout: ops.Layout, n: int) -> list[list[int]]:
    """For each of the ``n`` tokens, its 4-neighbours in its own grid, in the order left, right, up, down (a token of
    a 1-D grid has left/right only; grids do not touch each other)."""
    out: list[list[int]] = [[] for _ in range(n)]
    for start, h, w in layout.frames():
        for r in range(h):
            for c in range(w):
                i = start + r * w + c
                if i >= n:
                    continue
                cand = [(r, c - 1), (r, c + 1), (r - 1, c), (r + 1, c)]
                out[i] = [start + rr * w + cc for rr, cc in cand if 0 <= rr < h and 0 <= cc < w]
    return out


def hiprune_select(mid: torch.Tensor, deep: torch.Tensor, k: int, anchors: int,
                   neighbours: list[list[int]]) -> torch.Tensor:
    """HiPrune on one image: ``mid`` / ``deep`` ``[N]`` attention at the object layer / the deep layer. The
    ``anchors`` tokens of highest ``mid`` (in that order) each bring themselves and then their neighbours (buffer
    tokens), skipping tokens already in, until ``k`` are in; the rest of ``k`` are the register tokens: the highest
    ``deep`` among the tokens not yet kept. Ties go to the earliest token. Returns ``k`` indices (unordered)."""
    chosen: list[int] = []
    seen: set[int] = set()
    for a in ops.stable_topk(mid.unsqueeze(0), anchors)[0].tolist():
        for t in [a] + neighbours[a]:
            if len(chosen) < k and t not in seen:
                chosen.append(t)
                seen.add(t)
    picked = torch.tensor(chosen, dtype=torch.long, device=deep.device)
    rest = deep.float().clone()
    rest[picked] = float("-inf")
    registers = ops.stable_topk(rest.unsqueeze(0), k - len(chosen))[0]
    return torch.cat([picked, registers])


@dataclass
class HiPrune(Compressor):
    """HiPrune ("HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language Models",
    Liu et al., arXiv:2508.00553).

    Before the LLM, each image keeps three kinds of tokens, read off the vision encoder's attention hierarchy:
    anchor tokens, the ``round(alpha * k / 5)`` tokens most attended in an object-centric middle layer
    (``mid_attention``: attention received, mean over queries and heads, at layer ``round(3/8 * depth)``, HiPrune's
    layer 9 of CLIP ViT-L); buffer tokens, each anchor's 4 spatial neighbours (so anchors and buffers take about
    ``alpha * k``; ``alpha`` default 0.1, the authors' setting); and register tokens, the rest of the budget, the
    tokens most attended in the deep layer the LLM reads (``cls_attention``) among those not yet kept.

    Departures: neighbours are the 4-neighbours in the item's own grid (the authors' code adds ``i +- 1`` and
    ``i +- 24`` on the flat index, which wraps across rows and assumes a 24-wide grid); anchors bring their
    neighbours one anchor at a time until the budget is met, so the count is exact even when ``5 * anchors > k``.
    The deep-layer score is tokenzip's ``cls_attention``: the [CLS] row on towers with a [CLS] token (the authors'
    code averages the attention every token receives there too; a tower without [CLS] gets exactly that). The object
    layer is fixed by the adapter at 3/8 of the tower's depth (the authors' code takes it as a setting, 9 for
    LLaVA's CLIP). Per-item budget. Ties go to the earliest token.
    """

    alpha: float = 0.1

    info: ClassVar[MethodInfo] = MethodInfo(
        name="hiprune", family="attention", modalities=("image",), stage="pre_llm", query_aware=False,
        reference="Liu et al., HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in "
                  "Vision-Language Models, arXiv:2508.00553")
    requires: ClassVar[tuple[str, ...]] = ("mid_attention", "cls_attention")

    def __post_init__(self) -> None:
        super().__post_init__()
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= float(a) <= 1.0:
            raise ValueError(f"alpha must be a float in [0, 1] (the budget share of anchors and buffers), got {a!r}")

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        n = tokens.shape[1]
        anchors = min(k, math.floor(float(self.alpha) * k / 5 + 0.5))
        neighbours = grid_neighbours(layout, n)
        mid, deep = signals["mid_attention"], signals["cls_attention"]
        rows = [hiprune_select(mid[i], deep[i], k, anchors, neighbours) for i in range(tokens.shape[0])]
        return ops.select(tokens, torch.stack(rows).to(tokens.device))
