"""Score-then-keep methods: a subclass scores every token, the base keeps the ``k`` best (kvpress's ScorerPress)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops
from .base import Compressor
from .output import CompressOutput


@dataclass
class ScorerCompressor(Compressor):
    """Base of the methods that rank tokens and keep the top ``k``, in their original order.

    Subclasses implement only :meth:`score_tokens` (kvpress's ``score``; named apart from methods' own ``score``
    fields, e.g. FastV's): ``[B, N]``, higher = keep. The base keeps the ``k`` highest with
    :func:`tokenzip.ops.stable_topk` (ties go to the lower index, so selections are deterministic) and returns them
    in ascending position order with :func:`tokenzip.ops.select`. A method that keeps the top ``k`` under a
    constraint (e.g. a share per time segment) overrides :meth:`keep` instead of writing its own ``_compress``.
    """

    def score_tokens(self, tokens: torch.Tensor, layout: ops.Layout, signals: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, N]`` score of each token of ``tokens`` ``[B, N, D]`` (higher = keep)."""
        raise NotImplementedError

    def keep(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Indices ``[B, k]`` of the tokens to keep, in any order."""
        return ops.stable_topk(scores, k)

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        return ops.select(tokens, self.keep(self.score_tokens(tokens, layout, signals), k))
