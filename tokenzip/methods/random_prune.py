"""Random selection: the baseline every method must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import MethodInfo
from ..scorer import ScorerCompressor


@dataclass
class RandomPrune(ScorerCompressor):
    """Keep ``k`` tokens chosen uniformly at random, in their original order.

    Baseline used throughout the token-pruning literature (e.g. "Feather the Throttle", arXiv:2412.13180, and
    "Token Pruning in Multimodal LLMs: Are We Solving the Right Problem?", arXiv:2502.11501, which finds random
    and pooling baselines hard to beat). Choice: every item draws from its own generator seeded with ``seed``, so the
    selection is deterministic and an item gets the same tokens alone or in a batch (the score of a token is its
    rank in that seeded permutation). Layout-agnostic (a uniform random subset of each item's tokens), so it is the
    baseline for images, video clips and audio alike.
    """

    seed: int = 0
    info: ClassVar[MethodInfo] = MethodInfo(
        name="random", family="baseline", modalities=("image", "video", "audio"), stage="pre_llm", query_aware=False,
        reference="Baseline; see Wen et al., Token Pruning in MLLMs: Are We Solving the Right Problem? "
                  "arXiv:2502.11501")

    def score_tokens(self, tokens: torch.Tensor, layout: ops.Layout, signals: dict[str, torch.Tensor]) -> torch.Tensor:
        b, n, _ = tokens.shape
        # the j-th token of a seeded permutation scores n - j, so the top k are the permutation's first k
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).to(tokens.device)
        score = torch.empty_like(perm)
        score[perm] = torch.arange(n, 0, -1, device=tokens.device)
        return score.expand(b, -1)
