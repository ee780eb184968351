"""Random selection: the baseline every method must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput


@dataclass
class RandomPrune(Compressor):
    """Keep ``k`` tokens chosen uniformly at random, in their original order.

    Baseline used throughout the token-pruning literature (e.g. "Feather the Throttle", arXiv:2412.13180, and
    "Token Pruning in Multimodal LLMs: Are We Solving the Right Problem?", arXiv:2502.11501, which finds random
    and pooling baselines hard to beat). Choice: every item draws from its own generator seeded with ``seed``, so the
    selection is deterministic and an item gets the same tokens alone or in a batch.
    """

    seed: int = 0
    info: ClassVar[MethodInfo] = MethodInfo(
        name="random", family="input", modalities=("image", "video", "audio"), stage="pre_llm", query_aware=False,
        reference="Baseline; see Wen et al., Token Pruning in MLLMs: Are We Solving the Right Problem? "
                  "arXiv:2502.11501")

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        b, n, _ = tokens.shape
        rows = []
        for _ in range(b):
            g = torch.Generator().manual_seed(self.seed)
            rows.append(torch.randperm(n, generator=g)[:k])
        return ops.select(tokens, torch.stack(rows).to(tokens.device))
