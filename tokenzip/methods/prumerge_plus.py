"""LLaVA-PruMerge+: attention outliers plus spatial samples, with the pruned tokens merged into them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput
from .visionzip import even_picks


def iqr_outliers(attn: torch.Tensor) -> torch.Tensor:
    """Positions whose score is above ``Q3 + 1.5 * IQR`` (linear-interpolated quartiles), highest first."""
    q1, q3 = torch.quantile(attn, torch.tensor([0.25, 0.75], dtype=attn.dtype, device=attn.device))
    order = torch.sort(attn, descending=True, stable=True).indices
    return order[attn[order] > q3 + 1.5 * (q3 - q1)]


@dataclass
class PruMergePlus(Compressor):
    """Keep [CLS]-attention outliers and spatially uniform samples, and fold the pruned tokens into them.

    "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models" (Shang et al.,
    arXiv:2403.15388), PruMerge+ variant. Selection: tokens whose ``cls_attention`` is an IQR outlier
    (``> Q3 + 1.5 IQR``) are kept; the rest of the budget is filled with evenly spaced tokens (in sequence order,
    i.e. a uniform spatial sampling of each grid) among the non-outliers. Merge: every kept token lists its ``knn``
    most ``keys``-similar pruned tokens (cosine; the tokens themselves without ``keys``); each pruned token joins the
    most similar kept token that listed it, and a kept token becomes the weighted mean of itself (weight 1) and its
    joiners (weight: their attention). Departures, for an exact budget and a partition (``source``): the paper's
    budget is adaptive (outlier count, then about three spatial samples per outlier); here the count is exactly
    ``k`` — outliers are capped at ``k`` (highest attention first) and spatial samples fill the rest. The paper's
    neighbour lists overlap, may include other kept tokens and are added without normalisation
    (``x_i + sum a_j x_j``), plus one extra token for all pruned tokens; we assign each pruned token to one kept
    token, normalise by the total weight (keeping the feature scale) and add no extra token. Pruned tokens no kept
    token lists are dropped. ``knn = 32`` as in the authors' code. Ties go to the earliest token.
    """

    knn: int = 32
    info: ClassVar[MethodInfo] = MethodInfo(
        name="prumerge_plus", family="attention", modalities=("image",), stage="pre_llm",
        query_aware=False, reference="LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal "
                                     "Models (PruMerge+), arXiv:2403.15388")
    requires: ClassVar[tuple[str, ...]] = ("cls_attention",)
    optional: ClassVar[tuple[str, ...]] = ("keys",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.knn, bool) or not isinstance(self.knn, int) or self.knn < 1:
            raise ValueError(f"knn must be an int >= 1, got {self.knn!r}")

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        b, n, _ = tokens.shape
        dev = tokens.device
        attn = signals["cls_attention"].float()
        metric = signals.get("keys", tokens)
        keeps, targets = [], []
        for i in range(b):
            outliers = iqr_outliers(attn[i])[:k]
            rest_mask = torch.ones(n, dtype=torch.bool, device=dev)
            rest_mask[outliers] = False
            rest = rest_mask.nonzero().flatten()
            keep = torch.sort(torch.cat([outliers, rest[even_picks(rest.shape[0], k - outliers.shape[0], dev)]]))
            keep = keep.values
            pruned_mask = torch.ones(n, dtype=torch.bool, device=dev)
            pruned_mask[keep] = False
            pruned = pruned_mask.nonzero().flatten()
            target = torch.full((n,), -1, dtype=torch.long, device=dev)
            if pruned.numel():
                m = F.normalize(metric[i].float(), dim=-1)
                sim = m[keep] @ m[pruned].T  # [k, P]
                listed = torch.zeros_like(sim, dtype=torch.bool)
                listed.scatter_(1, ops.stable_topk(sim, min(self.knn, pruned.shape[0])), True)
                best = sim.masked_fill(~listed, float("-inf"))
                owner = torch.argmax(best, dim=0)  # first maximum: the earliest kept token
                joined = listed.any(dim=0)
                target[pruned[joined]] = keep[owner[joined]]
            target[keep] = keep
            keeps.append(keep)
            targets.append(target)
        weights = attn.to(tokens.dtype).clone()
        keep_all = torch.stack(keeps)
        weights.scatter_(1, keep_all, 1.0)
        return ops.merge_into_kept(tokens, keep_all, torch.stack(targets), weights=weights)
