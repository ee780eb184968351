"""VTW: withdraw every visual token after a chosen LLM layer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import MethodInfo
from ..llm.base import LLMCompressor
from ..output import CompressOutput


@dataclass
class VTW(LLMCompressor):
    """VTW ("Boosting Multimodal Large Language Models with Visual Tokens Withdrawal for Rapid Inference", Lin et
    al., arXiv:2405.05803): visual tokens take part in the first ``K`` decoder layers only; from layer ``K`` on,
    all of them are withdrawn and the LLM runs on the text alone.

    Budget (explicit): VTW keeps 0 visual tokens after ``K``, so its budget is measured in **layers**:
    ``retain=r`` lets the visual tokens through the first ``K = max(1, round(r * L))`` of the ``L`` decoder layers
    (``retain=1.0``: all layers, i.e. no compression); ``tokens=t`` gives ``K = min(t, L)`` layers. ``layer=K``
    sets ``K`` directly and then overrides the budget. ``retain`` is therefore the share of (visual token x layer)
    work kept, and the item statistics report ``tokens_out == 0`` whenever ``K < L``.

    Departures: the paper picks ``K`` per model with a KL-divergence criterion on a small calibration set; here
    ``K`` comes from the budget or ``layer`` (the paper's LLaVA-1.5 setting is around half the depth). Text tokens
    keep their original positions.
    Video: a clip's tokens are withdrawn after ``K`` like an image's (an application to video tokens).
    """

    layer: int | None = None

    info: ClassVar[MethodInfo] = MethodInfo(
        name="vtw", family="input", modalities=("image", "video"), stage="llm", query_aware=False,
        reference="Lin et al., Visual Tokens Withdrawal, arXiv:2405.05803")

    def __post_init__(self) -> None:
        if self.layer is not None and self.retain is None and self.tokens is None:
            self.retain = 1.0  # `layer` alone is a complete budget; retain is unused then
        super().__post_init__()
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 1):
            raise ValueError(f"layer must be an int >= 1, got {self.layer!r}")

    def withdraw_layer(self, num_layers: int) -> int:
        """``K``: the first decoder layer without visual tokens (``K == L``: none withdrawn)."""
        if self.layer is not None:
            return min(self.layer, num_layers)
        if self.budget.tokens is not None:
            return min(self.budget.tokens, num_layers)
        return max(1, min(num_layers, math.floor(float(self.budget.retain) * num_layers + 0.5)))

    def final_count(self, n: int, num_layers: int) -> int:
        return 0 if self.withdraw_layer(num_layers) < num_layers else n

    def schedule(self, n: int, num_layers: int) -> list[tuple[int, int]]:
        k = self.withdraw_layer(num_layers)
        return [] if k >= num_layers else [(k, 0)]

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        # tensor-level use only (the LLM stage drops every token itself): keep the first k
        return ops.select(tokens, torch.arange(k, device=tokens.device).expand(tokens.shape[0], -1))
