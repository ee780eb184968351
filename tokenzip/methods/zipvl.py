"""ZipVL-style progressive layer-wise pruning with an attention-mass-adaptive ratio per layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import MethodInfo
from ..llm.base import LLMScorer, geometric_counts
from .fastv import received_attention


@dataclass
class ZipVL(LLMScorer):
    """Progressive, layer-wise pruning after ZipVL ("ZipVL: Efficient Large Vision-Language Models with Dynamic
    Token Sparsification", Wang et al., arXiv:2410.08584).

    ZipVL's key idea is a layer-specific, input-adaptive ratio of important tokens: at a layer, keep the fewest
    tokens whose attention scores add up to a share ``tau`` (default 0.975) of the total. Here the visual tokens of
    each item are pruned at EVERY decoder layer in ``[start, end]`` (default: from layer 2 to half the depth, or
    ``layers=``): at each one the item keeps the fewest of its remaining tokens covering ``tau`` of the attention
    the text tokens after it pay to them (mean over those rows and heads; the last token's row when no text
    follows), but never fewer than the budget and never more than a geometric schedule towards it (so the count
    shrinks at least geometrically); the last layer keeps exactly the budget (``retain``/``tokens`` counts at the
    END), ranked by the same scores.

    Departures: ZipVL keeps all tokens in the residual stream and applies the sparsity to the attention
    computation (plus a mixed-precision KV cache); we drop the unimportant visual tokens from the sequence, which
    makes it a progressive pruning method with ZipVL's adaptive ratio. Per-item budget; original positions kept.
    Video: each clip is one item (the paper also evaluates video, LongVA on Video-MME).
    """

    tau: float = 0.975
    start: int = 2
    end: int | None = None
    layers: tuple[int, ...] | None = None

    info: ClassVar[MethodInfo] = MethodInfo(
        name="zipvl", family="attention", modalities=("image", "video"), stage="llm", query_aware=True,
        reference="Wang et al., ZipVL, arXiv:2410.08584 (adaptive ratio); progressive pruning variant")
    # the text rows rank the tokens; the last token's row ranks an item no text token follows
    requires: ClassVar[tuple[str, ...]] = ("last_attention", "text_attention")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < float(self.tau) <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau!r}")
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if not self.layers or list(self.layers) != sorted(set(self.layers)):
                raise ValueError(f"layers must be strictly increasing decoder-layer indices, got {self.layers!r}")

    def stage_layers(self, num_layers: int) -> list[int]:
        if self.layers is not None:
            return [self.check_layer(layer, num_layers, "layers[i]") for layer in self.layers]
        first = self.check_layer(min(self.start, num_layers - 1), num_layers, "start")
        last = num_layers // 2 if self.end is None else self.end
        last = self.check_layer(max(first, min(last, num_layers - 1)), num_layers, "end")
        return list(range(first, last + 1))

    def schedule(self, n: int, num_layers: int) -> list[tuple[int, int]]:
        layers = self.stage_layers(num_layers)
        return list(zip(layers, geometric_counts(n, self.budget.count(n), len(layers))))

    def adapt(self, k: int, m: int, final: int, signals: dict) -> int:
        score = received_attention(signals, "text")[0].float()
        share = torch.sort(score, descending=True).values.cumsum(0) / score.sum().clamp(min=1e-12)
        need = int((share < self.tau).sum()) + 1  # fewest tokens reaching tau of the mass
        return min(k, max(final, need))

    def score_tokens(self, tokens: torch.Tensor, layout: ops.Layout, signals: dict[str, torch.Tensor]) -> torch.Tensor:
        return received_attention(signals, "text")
