"""PyramidDrop: drop a fixed share of the remaining visual tokens at the end of every LLM stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import MethodInfo
from ..llm.base import LLMScorer, geometric_counts, stage_layers


@dataclass
class PyramidDrop(LLMScorer):
    """PyramidDrop ("PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy
    Reduction", Xing et al., arXiv:2410.17247).

    The LLM is split into ``stages`` equal stages (default 4, as in the paper: layers 8/16/24 of a 32-layer LLM).
    At the end of each stage but the last, each item keeps a fraction ``lambda`` of its remaining visual tokens,
    ranked by the attention the last instruction token pays them in the stage's last layer (the paper's
    lightweight last-query attention), so the token count forms a pyramid.

    Budget: ``retain``/``tokens`` is the count at the END of the schedule (what the last stage sees). ``lambda`` is
    derived from it: ``lambda = (k / N) ** (1 / (stages - 1))``, counts rounded half up and the last one exactly
    ``k``; with the paper's ``lambda = 0.5`` and 4 stages this is ``retain=0.125``. ``layers`` overrides the stage
    boundaries (decoder-layer indices, each in ``[1, L - 1]``). Departures: per-item budget (the paper ranks all
    image tokens of the prompt together); kept tokens keep their original positions; ties go to the earlier token.
    Video: each clip is one item ranked like an image (an application to video tokens, not the paper's own
    evaluation, which is on images).
    """

    stages: int = 4
    layers: tuple[int, ...] | None = None

    info: ClassVar[MethodInfo] = MethodInfo(
        name="pyramiddrop", family="attention", modalities=("image", "video"), stage="llm", query_aware=True,
        reference="Xing et al., PyramidDrop, arXiv:2410.17247")
    requires: ClassVar[tuple[str, ...]] = ("last_attention",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.stages, bool) or not isinstance(self.stages, int) or self.stages < 2:
            raise ValueError(f"stages must be an int >= 2, got {self.stages!r}")
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if not self.layers or list(self.layers) != sorted(set(self.layers)):
                raise ValueError(f"layers must be strictly increasing decoder-layer indices, got {self.layers!r}")

    def boundaries(self, num_layers: int) -> list[int]:
        if self.layers is not None:
            return [self.check_layer(layer, num_layers, "layers[i]") for layer in self.layers]
        return stage_layers(tuple(s / self.stages for s in range(1, self.stages)), num_layers)

    def schedule(self, n: int, num_layers: int) -> list[tuple[int, int]]:
        layers = self.boundaries(num_layers)
        return list(zip(layers, geometric_counts(n, self.budget.count(n), len(layers))))

    def score_tokens(self, tokens: torch.Tensor, layout: ops.Layout, signals: dict[str, torch.Tensor]) -> torch.Tensor:
        return signals["last_attention"]
