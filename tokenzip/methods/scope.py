"""SCOPE: greedy selection by saliency times the coverage a token adds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput

TIE_TOLERANCE = 1e-6  # relative: scores this close to the best count as ties (to the earliest token)


def scope_select(feats: torch.Tensor, saliency: torch.Tensor, k: int) -> torch.Tensor:
    """SCOPE on one item: ``feats`` ``[N, D]``, ``saliency`` ``[N]`` (non-negative). Returns the ``k`` picks in order.

    Set coverage of a selection ``S``: ``C(S) = sum_i max(0, max_{s in S} cos(v_i, v_s))`` over all ``N`` tokens.
    The coverage gain of an unselected token ``j`` is ``C(S + j) - C(S) = sum_i max(0, cos(v_i, v_j) - c_i)`` with
    ``c_i`` the current coverage of token ``i``; each step picks the unselected token of largest ``gain * saliency``
    (ties, within a relative ``TIE_TOLERANCE``, to the earliest) and raises every ``c_i`` to
    ``max(c_i, cos(v_i, v_j))``. The gains are updated from the
    rows whose coverage rose (float64), not recomputed over the whole ``N x N`` matrix each step."""
    unit = F.normalize(feats.double(), dim=-1)
    sim = unit @ unit.T  # [N, N], symmetric
    n = sim.shape[0]
    covered = torch.zeros(n, dtype=sim.dtype, device=sim.device)
    gain = sim.clamp(min=0).sum(dim=0)  # [N]: column j = the gain of adding token j to the empty set
    picked = torch.zeros(n, dtype=torch.bool, device=sim.device)
    order = []
    for _ in range(k):
        score = (gain * saliency.double()).masked_fill(picked, float("-inf"))
        # the first token within a relative 1e-6 of the maximum: float32 features from different attention
        # kernels (SDPA / eager) differ in the last bits, and a strict argmax would let that noise pick
        best = score.max()
        j = int(torch.nonzero(score >= best - TIE_TOLERANCE * best.abs())[0])
        order.append(j)
        picked[j] = True
        # only the rows whose coverage rises change the gains: subtract their old terms, add the new ones
        rows = (sim[:, j] > covered).nonzero().flatten()
        if rows.numel():
            old, new = covered[rows], sim[rows, j]
            block = sim[rows]
            gain = gain - (block - old[:, None]).clamp(min=0).sum(dim=0)
            gain = gain + (block - new[:, None]).clamp(min=0).sum(dim=0)
            covered[rows] = new
    return torch.tensor(order, dtype=torch.long, device=feats.device)


@dataclass
class SCOPE(Compressor):
    """SCOPE ("SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient Multimodal LLMs", Deng et al., NeurIPS
    2025, arXiv:2510.24214).

    Before the LLM, each image keeps ``k`` tokens picked one at a time: the token whose SCOPE score -- the coverage
    gain it adds to the selected set (:func:`scope_select`; coverage measured by cosine similarity of the features)
    times its saliency ``cls_attention ** alpha`` (``alpha`` default 1, as in the paper and the authors' code) -- is
    largest. Similarity is computed on the tokens being compressed (the vision features: the authors' LLaVA code uses
    the penultimate CLIP layer's hidden states, the layer LLaVA feeds its projector), saliency on the [CLS]
    attention of that layer (or, for encoders without [CLS], the adapter's mean attention received).

    Departures: saliency is the mean over heads where the authors' code sums them (a constant factor: the same picks
    for the multiplicative score). Per-item budget. Ties (scores within a relative 1e-6 of the best) go to the
    earliest token.
    """

    alpha: float = 1.0

    info: ClassVar[MethodInfo] = MethodInfo(
        name="scope", family="attention", modalities=("image",), stage="pre_llm", query_aware=False,
        reference="Deng et al., SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient Multimodal LLMs, "
                  "arXiv:2510.24214")
    requires: ClassVar[tuple[str, ...]] = ("cls_attention",)

    def __post_init__(self) -> None:
        super().__post_init__()
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= float(a) <= 10.0:
            raise ValueError(f"alpha must be a float in [0, 10] (the saliency exponent), got {a!r}")

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        saliency = signals["cls_attention"].float().clamp(min=0) ** float(self.alpha)
        rows = [scope_select(tokens[i], saliency[i], k) for i in range(tokens.shape[0])]
        return ops.select(tokens, torch.stack(rows))
