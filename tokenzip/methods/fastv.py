"""FastV: prune visual tokens inside the LLM by the attention they receive."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import MethodInfo
from ..llm.base import LLMScorer


@dataclass
class FastV(LLMScorer):
    """FastV ("An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
    Vision-Language Models", Chen et al., arXiv:2403.06764).

    Layers ``< layer`` (default 2, the paper's K; ``None`` = 2 clamped to ``L - 1`` for LLMs of fewer layers) run on the
    full sequence; before decoder layer ``layer`` each item keeps its top-``k`` visual tokens ranked by the attention
    they receive in layer ``layer - 1`` (the last full layer, i.e. the paper's "attention map of layer K" in 1-based
    counting), and the rest of the LLM runs on the kept tokens. ``score="last"`` (default, as in the official
    implementation) ranks by the last token's attention row, mean over heads; ``score="text"`` by the mean over the rows
    of the text tokens after the item. Signals: ``score="last"`` requires ``last_attention``; ``score="text"``
    requires ``text_attention`` and ``last_attention`` (the ranking for an item no text token follows).

    Departures: the budget is per item (``retain``/``tokens`` of each image), where the paper drops R% of all image
    tokens of the prompt; kept tokens keep their original position ids (as the official code does); ties go to the
    earlier token. The rows are recomputed from the layer's q/k projections, so the model keeps running SDPA.
    Video: each clip is one item whose tokens are ranked like an image's (an application to video tokens, as video
    pruning work such as DyCoke and FrameFusion applies FastV-style pruning; the budget is per clip).
    """

    layer: int | None = None
    score: str = "last"

    info: ClassVar[MethodInfo] = MethodInfo(
        name="fastv", family="attention", modalities=("image", "video"), stage="llm", query_aware=True,
        reference="Chen et al., An Image is Worth 1/2 Tokens After Layer 2, arXiv:2403.06764")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score not in ("last", "text"):
            raise ValueError(f"score must be 'last' or 'text', got {self.score!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 1):
            raise ValueError(f"layer must be an int >= 1, got {self.layer!r}")

    @property
    def requires(self) -> tuple[str, ...]:  # type: ignore[override]  # depends on `score`
        return ("last_attention", "text_attention") if self.score == "text" else ("last_attention",)

    def schedule(self, n: int, num_layers: int) -> list[tuple[int, int]]:
        layer = min(2, num_layers - 1) if self.layer is None else self.layer
        return [(self.check_layer(layer, num_layers), self.budget.count(n))]

    def score_tokens(self, tokens: torch.Tensor, layout: ops.Layout, signals: dict[str, torch.Tensor]) -> torch.Tensor:
        return received_attention(signals, self.score)


def received_attention(signals: dict[str, torch.Tensor], score: str) -> torch.Tensor:
    """``[B, N]`` score per visual token: the last token's row, or the mean over the text rows (falling back to the
    last token's row when no text token follows the item)."""
    if score == "text":
        att = signals.get("text_attention")
        if att is not None and att.shape[1] > 0:
            return att.mean(dim=1)
    att = signals.get("last_attention")
    if att is None:
        raise ValueError("needs the last_attention signal (run inside the LLM via `with method(model):`)")
    return att
