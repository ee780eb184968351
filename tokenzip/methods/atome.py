"""A-ToMe: merge temporally adjacent tokens with the highest cosine similarity."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput


def adjacent_groups(metric: torch.Tensor, k: int, step: float = 0.1,
                    allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Group id ``[N]`` in ``[0, k)`` (non-decreasing: groups are contiguous runs) after merging adjacent runs.

    Rounds: the cosine similarity of each pair of neighbouring runs (run = mean of its members' ``metric`` rows) is
    ranked, and up to ``r = max(1, ceil(step * M))`` non-overlapping pairs are merged, most similar first (ties: the
    earlier pair), with ``r <= M - k`` so exactly ``k`` runs remain. ``allowed`` ``[N - 1]`` (optional, bool) forbids
    merging across the boundary after position ``i`` where False, as long as enough other pairs remain.
    """
    n = metric.shape[0]
    dev = metric.device
    group = torch.arange(n, device=dev)
    msum = metric.float().clone()
    size = torch.ones(n, device=dev)
    barrier = None if allowed is None else ~allowed.to(dev)  # [M - 1]: True = boundary we prefer not to merge
    while msum.shape[0] > k:
        m = msum.shape[0]
        r = min(m - k, max(1, math.ceil(step * m)))
        x = F.normalize(msum / size.unsqueeze(-1), dim=-1)
        sim = (x[:-1] * x[1:]).sum(-1)
        if barrier is not None:
            sim = torch.where(barrier, sim - 4.0, sim)  # cosine is in [-1, 1]: barriers rank last
        order = torch.sort(sim, descending=True, stable=True).indices.tolist()
        used = [False] * m
        starts: list[int] = []
        for j in order:
            if not used[j] and not used[j + 1]:
                used[j] = used[j + 1] = True
                starts.append(j)
                if len(starts) == r:
                    break
        is_new = torch.ones(m, dtype=torch.long, device=dev)
        is_new[torch.tensor(starts, device=dev) + 1] = 0
        gid = torch.cumsum(is_new, 0) - 1
        m2 = int(gid[-1]) + 1
        msum = torch.zeros(m2, msum.shape[1], device=dev).index_add_(0, gid, msum)
        size = torch.zeros(m2, device=dev).index_add_(0, gid, size)
        if barrier is not None:
            keep = is_new[1:].bool()  # boundaries between runs that stay separate
            barrier = barrier[keep]
        group = gid[group]
    return group


@dataclass
class AToMe(Compressor):
    """Adjacent Token Merging ("Accelerating Transducers through Adjacent Token Merging", Li, Wu, Li & Liu,
    Interspeech 2023, arXiv:2306.16009).

    Speech changes slowly at Whisper's 20 ms frame rate, so neighbouring frames are often near duplicates. A-ToMe
    merges adjacent tokens whose cosine similarity is highest, which gives an adaptive frame rate: steady vowels and
    silences collapse, fast transitions keep their resolution. Output tokens are the plain means of their (contiguous)
    members, in temporal order.

    Departures: the paper inserts merge modules between encoder layers and uses the attention keys with a fixed merge
    ratio or threshold per layer; here merging runs once on the encoder output, in rounds that merge the
    ``step`` fraction of the current tokens (non-overlapping neighbour pairs, most similar first) until exactly ``k``
    remain, on the tokens themselves (the adapter hands over encoder outputs, not per-layer keys). A merged run's
    similarity is that of its mean.
    """

    step: float = 0.1
    info: ClassVar[MethodInfo] = MethodInfo(
        name="atome", family="similarity", modalities=("audio",), stage="pre_llm", query_aware=False,
        reference="A-ToMe: Accelerating Transducers through Adjacent Token Merging, arXiv:2306.16009")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.step, bool) or not isinstance(self.step, (int, float)) or not 0 < self.step <= 0.5:
            raise ValueError(f"step must be a fraction in (0, 0.5], got {self.step!r}")

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        assign = torch.stack([adjacent_groups(tokens[i], k, self.step) for i in range(tokens.shape[0])])
        return ops.merge(tokens, assign, k)
