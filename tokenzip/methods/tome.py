"""ToMe: bipartite soft matching, applied in rounds until exactly ``k`` tokens remain."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput


@dataclass
class ToMe(Compressor):
    """Token Merging by bipartite soft matching ("Token Merging: Your ViT But Faster", Bolya et al.,
    arXiv:2210.09461), used as a one-shot reducer between encoder and LLM.

    Each round splits the current tokens alternately into sets A and B, links every A token to its most similar B
    token (cosine similarity of the ``keys`` signal when given, else of the tokens themselves, as ToMe uses the
    attention keys), and merges the ``r`` most similar links with a size-weighted average; sizes and groups are
    tracked across rounds. Departures: ToMe merges a fixed ``r`` inside every transformer block; here rounds run
    back to back on the final features with ``r = min(n - k, floor(n / 2))`` so exactly ``k`` tokens remain. Between
    rounds the tokens are kept in the order of their group's first input position (so the A/B alternation stays
    spatial), and a merged group's similarity metric is the size-weighted mean of its members' keys. Because sizes
    count input tokens, every output token is the plain mean of its group's input tokens. Ties go to the earliest
    token.
    """

    info: ClassVar[MethodInfo] = MethodInfo(
        name="tome", family="similarity", modalities=("image", "audio"), stage="pre_llm",
        query_aware=False, reference="ToMe: Token Merging: Your ViT But Faster, arXiv:2210.09461")
    optional: ClassVar[tuple[str, ...]] = ("keys",)

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        b, n, _ = tokens.shape
        metric_all = signals.get("keys", tokens)
        assigns = []
        for i in range(b):
            assigns.append(self._groups(metric_all[i].float(), k))
        return ops.merge(tokens, torch.stack(assigns), k)

    @staticmethod
    def _groups(metric: torch.Tensor, k: int) -> torch.Tensor:
        """Group id ``[N]`` in ``[0, k)`` of every token after the rounds of bipartite matching."""
        n = metric.shape[0]
        dev = metric.device
        group = torch.arange(n, device=dev)  # input token -> current slot
        msum = metric.clone()  # per slot: the sum of its members' metric rows (size-weighted mean * size)
        size = torch.ones(n, device=dev)
        while msum.shape[0] > k:
            cur = msum.shape[0]
            r = min(cur - k, cur // 2)
            merge, unmerge = ops.bipartite_soft_matching((msum / size.unsqueeze(-1)).unsqueeze(0), r)
            slot = ops.merge_source(unmerge, group.unsqueeze(0), cur - r)[0]  # input token -> merged slot
            # slots stay ordered by their first input position: a B slot absorbing an earlier A slot moves up
            first = torch.full((cur - r,), n, dtype=torch.long, device=dev)
            first = first.scatter_reduce(0, slot, torch.arange(n, device=dev), reduce="amin")
            order = torch.sort(first, stable=True).indices
            group = torch.argsort(order)[slot]
            msum = merge(msum.unsqueeze(0))[0][order]
            size = merge(size.unsqueeze(0))[0][order]
        return group
