"""TokenCarve: inside the LLM, select by attention and SVD information contribution, then merge similar tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import ops
from ..base import MethodInfo
from ..llm.base import LLMCompressor
from ..output import CompressOutput


def borda(scores: torch.Tensor) -> torch.Tensor:
    """``[N]`` rank points of ``scores`` ``[N]``: the highest gets ``N``, the next ``N - 1``, ..., the lowest 1 (ties:
    the earlier token ranks higher)."""
    n = scores.shape[0]
    order = torch.sort(scores, descending=True, stable=True).indices
    points = torch.empty(n, dtype=torch.float32, device=scores.device)
    points[order] = torch.arange(n, 0, -1, dtype=torch.float32, device=scores.device)
    return points


def information_contribution(x: torch.Tensor) -> torch.Tensor:
    """``[N]`` each row's contribution to the information of the matrix ``x`` ``[N, D]``: with ``x = U S V^T``, the
    L1 norm of row ``i`` of ``U S`` (TokenCarve's SVD score)."""
    u, s, _ = torch.linalg.svd(x.double(), full_matrices=False)
    return (u * s[None, :]).abs().sum(dim=1).float()


def carve(tokens: torch.Tensor, attention: torch.Tensor, k: int, weight: float, candidates: float) -> torch.Tensor:
    """TokenCarve on one item: ``tokens`` ``[N, D]`` hidden states, ``attention`` ``[N]`` the last token's attention.
    Returns the assignment ``[N]`` of every token to one of ``k`` groups (``-1``: dropped), for :func:`ops.merge`.

    1. Information-preservation-guided selection: each token gets ``weight`` times its rank points by attention plus
       ``1 - weight`` times its rank points by information contribution (:func:`borda`); the top
       ``R = min(N, floor(candidates * k))`` are candidates, in that order.
    2. Merging: the first ``floor(R / 2)`` candidates form set A, the rest set B. Each B token's most similar A token
       (cosine) is its match; the ``R - k`` B tokens with the most similar matches merge into them (mean); the other
       B tokens and every A token stay. Ties go to the earlier token."""
    n = tokens.shape[0]
    score = weight * borda(attention.float()) + (1 - weight) * borda(information_contribution(tokens))
    r = min(n, math.floor(candidates * k))
    ranked = ops.stable_topk(score.unsqueeze(0), r)[0]
    n_a = r // 2
    a, b = ranked[:n_a], ranked[n_a:]
    assign = torch.full((n,), -1, dtype=torch.long, device=tokens.device)
    merged = r - k
    if merged == 0:
        assign[ranked] = torch.arange(r, device=tokens.device)
        return assign
    unit = F.normalize(tokens.float(), dim=-1)
    sim = unit[b] @ unit[a].T  # [|B|, |A|]
    best, match = sim.max(dim=1)  # first maximum: the earlier A token in rank order
    order = torch.sort(best, descending=True, stable=True).indices
    fold, stay = order[:merged], order[merged:]
    assign[a] = torch.arange(n_a, device=tokens.device)
    assign[b[stay]] = n_a + torch.arange(stay.numel(), device=tokens.device)
    assign[b[fold]] = match[fold]
    return assign


@dataclass
class TokenCarve(LLMCompressor):
    """TokenCarve ("TokenCarve: Information-Preserving Visual Token Compression in Multimodal Large Language Models",
    Tan et al., arXiv:2503.10501).

    Layers ``< layer`` (default 3: the authors' code compresses after its work layer 2, 0-based, scoring on that
    layer's attention and output; ``None`` = 3 clamped to ``L - 1``) run on the full sequence. Before decoder layer
    ``layer`` each item is carved to exactly ``k`` tokens in two steps (:func:`carve`): an information-preservation
    guided selection keeps ``floor(candidates * k)`` candidates (``candidates`` default 1.5, the authors' rank =
    3/2 of the final count) by the sum of two rank scores -- the attention the last token pays each visual token
    (``weight``, default 0.5) and each token's contribution to the SVD of the item's hidden-state matrix -- and a
    similarity merge folds the ``candidates * k - k`` B-half candidates most similar to an A-half candidate into it
    (mean), so the count lands exactly on ``k``. The rest of the LLM runs on the carved tokens, which keep their
    original positions.

    Departures: the paper decomposes the attention output matrix; its code (and this implementation, which works on
    the hidden states the LLM stage hands a method) decomposes the image tokens' output of the scoring layer. A
    merged token sits at its group's earliest position (tokenzip's merge convention; the authors' code keeps the A
    token's position). The candidate count is ``floor(candidates * k)`` capped at ``N`` and the merged count is what
    makes the total exactly ``k`` (the authors' code merges ``min(R / 2, k / 2)``). Per-item budget (the paper's
    code assumes one image); ties go to the earlier token. Video: each clip is one item (an application to video
    tokens, as FastV's here).
    """

    layer: int | None = None
    weight: float = 0.5
    candidates: float = 1.5

    info: ClassVar[MethodInfo] = MethodInfo(
        name="tokencarve", family="attention", modalities=("image", "video"), stage="llm", query_aware=True,
        reference="Tan et al., TokenCarve: Information-Preserving Visual Token Compression in Multimodal Large "
                  "Language Models, arXiv:2503.10501")
    requires: ClassVar[tuple[str, ...]] = ("last_attention",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 1):
            raise ValueError(f"layer must be an int >= 1, got {self.layer!r}")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= float(w) <= 1.0:
            raise ValueError(f"weight must be a float in [0, 1] (the attention share of the rank), got {w!r}")
        c = self.candidates
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 1.0 <= float(c) <= 2.0:
            raise ValueError(f"candidates must be a float in [1, 2] (candidates per kept token), got {c!r}")

    def schedule(self, n: int, num_layers: int) -> list[tuple[int, int]]:
        layer = min(3, num_layers - 1) if self.layer is None else self.layer
        return [(self.check_layer(layer, num_layers), self.budget.count(n))]

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        att = signals["last_attention"]
        assign = torch.stack([carve(tokens[i], att[i], k, float(self.weight), float(self.candidates))
                              for i in range(tokens.shape[0])])
        return ops.merge(tokens, assign, k)
