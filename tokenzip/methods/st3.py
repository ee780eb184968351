"""ST3: progressive visual token pruning across LLM layers, and visual token annealing while decoding."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import MethodInfo
from ..llm.base import LLMScorer, geometric_counts, stage_layers

# PVTP's default stage placement, as fractions of the LLM's depth: 2/32, 8/32, 16/32, 24/32 (layers 2, 8, 16, 24 of
# a 32-layer LLM): the first cut early, where attention to the image has become sparse (the paper's "lazy layer"
# finding, as FastV's layer 2), then a cut every quarter of the depth
DEFAULT_FRACTIONS = (2 / 32, 8 / 32, 16 / 32, 24 / 32)


@dataclass
class ST3(LLMScorer):
    """ST3 ("ST3: Accelerating Multimodal Large Language Model by Spatial-Temporal Visual Token Trimming", Zhuang et
    al., arXiv:2412.20105). Two parts, a spatial one (across layers) and a temporal one (across decoding steps):

    - **PVTP** (progressive visual token pruning) maps onto the LLM stage's multi-layer schedule (``schedule``): the
      visual tokens are pruned in several stages at increasing depth. Before each stage layer ``l`` each item keeps
      its visual tokens most attended by the last token in layer ``l - 1`` (mean over heads: the attention of the
      layer just before, which the paper reuses instead of computing new scores). Stages at ``layers`` (default
      2/32, 8/32, 16/32 and 24/32 of the depth, i.e. layers 2, 8, 16, 24 of a 32-layer LLM, deduplicated and clamped
      to ``[1, L - 1]``); counts shrink with a constant keep ratio from ``N`` to the budget, the last stage exactly
      the budget ``k`` (``retain``/``tokens`` of the item's ``N`` tokens, :func:`tokenzip.llm.base.geometric_counts`):
      at prefill every layer from the last stage on runs on exactly ``k`` visual tokens of the item.
    - **VTA** (visual token annealing; ``anneal=True``) maps onto the decode-time KV pruning machinery
      (``decode_layer`` / ``decode_keep``): at each decoding step the item's visual KV entries in the layers from
      the last PVTP stage on (or from ``layer``, which must not precede it) shrink linearly with the number of
      generated tokens, from ``k`` to ``f = max(1, round(anneal_keep * k))`` (``anneal_keep`` default 0.5) over
      ``anneal_steps`` steps (default 32): a step drops the ``r = ceil((k - f) / anneal_steps)`` entries the current
      token attends to least (in the layer before, mean over heads), never going below ``f``; after ``s`` steps an
      item holds ``max(f, k - s * r)`` entries. Dropped entries are freed from the cache.

    ``anneal`` defaults to False (PVTP alone, the paper's ablation without VTA): the runner's decode-time KV pruning
    is refused on decoders with sliding-window layers (Gemma 3), so the full method is opt-in,
    ``tz.get("st3", retain=..., anneal=True)``.

    Departures: the stage placement and the geometric counts are ours, set by the budget (the paper fixes per-layer
    ratios for LLaVA); VTA anneals the layers from the last PVTP stage on (the paper anneals every layer's visual
    tokens), along a straight line to ``anneal_keep`` of the budget (the paper's annealing curve and floor are its
    own hyper-parameters). Per-item budget (the paper counts all image tokens of a prompt together); kept tokens
    keep their original positions; ties go to the earlier token. Video: each clip is one item ranked like an image
    (an application to video, not the paper's evaluation).
    """

    layers: tuple[int, ...] | None = None
    anneal: bool = False
    layer: int | None = None
    anneal_steps: int = 32
    anneal_keep: float = 0.5

    info: ClassVar[MethodInfo] = MethodInfo(
        name="st3", family="attention", modalities=("image", "video"), stage="llm", query_aware=True,
        reference="Zhuang et al., ST3: Spatial-Temporal Visual Token Trimming, arXiv:2412.20105")
    requires: ClassVar[tuple[str, ...]] = ("last_attention",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.anneal, bool):
            raise TypeError(f"anneal must be a bool, got {type(self.anneal).__name__}")
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
                raise TypeError(f"layers must be a tuple of decoder-layer indices, got {self.layers!r}")
            self.layers = tuple(self.layers)
            if not self.layers or any(isinstance(x, bool) or not isinstance(x, int) for x in self.layers) \
                    or list(self.layers) != sorted(set(self.layers)):
                raise ValueError(f"layers must be strictly increasing decoder-layer indices, got {self.layers!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 1):
            raise ValueError(f"layer must be None or an int >= 1, got {self.layer!r}")
        if isinstance(self.anneal_steps, bool) or not isinstance(self.anneal_steps, int) or self.anneal_steps < 1:
            raise ValueError(f"anneal_steps must be an int >= 1, got {self.anneal_steps!r}")
        if isinstance(self.anneal_keep, bool) or not isinstance(self.anneal_keep, (int, float)) \
                or not 0.0 <= float(self.anneal_keep) <= 1.0:
            raise ValueError(f"anneal_keep must be in [0, 1], got {self.anneal_keep!r}")

    # ---- PVTP: prefill stages -----------------------------------------------------------------------------------
    def boundaries(self, num_layers: int) -> list[int]:
        """The PVTP stage layers for an LLM of ``num_layers`` decoder layers."""
        if num_layers < 2:
            raise ValueError(f"st3 needs an LLM of at least 2 layers, got {num_layers}")
        if self.layers is not None:
            return [self.check_layer(x, num_layers, "layers[i]") for x in self.layers]
        return stage_layers(DEFAULT_FRACTIONS, num_layers)

    def schedule(self, n: int, num_layers: int) -> list[tuple[int, int]]:
        layers = self.boundaries(num_layers)
        return list(zip(layers, geometric_counts(n, self.budget.count(n), len(layers))))

    def score_tokens(self, tokens: torch.Tensor, layout: ops.Layout, signals: dict[str, torch.Tensor]) -> torch.Tensor:
        return signals["last_attention"]

    # ---- VTA: decode-time annealing -----------------------------------------------------------------------------
    def decode_layer(self, num_layers: int) -> int | None:
        if not self.anneal:
            return None
        last = self.boundaries(num_layers)[-1]
        if self.layer is None:
            return last
        layer = self.check_layer(self.layer, num_layers)
        if layer < last:
            raise ValueError(f"layer (VTA's first layer) must not precede the last PVTP stage {last}, got {layer}")
        return layer

    def anneal_count(self, n: int, m: int) -> int:
        """Entries an item of ``n`` tokens keeps at a decoding step that starts with ``m`` of them: one linear
        annealing step from the budget ``k`` to the floor ``f``, ``max(f, m - ceil((k - f) / anneal_steps))``."""
        k = self.budget.count(n)
        floor = min(k, max(1, math.floor(float(self.anneal_keep) * k + 0.5)))
        if m <= floor:
            return m
        return max(floor, m - math.ceil((k - floor) / self.anneal_steps))

    def decode_keep(self, scores: torch.Tensor, n: int) -> torch.Tensor | None:
        m = scores.numel()
        keep = self.anneal_count(n, m)
        if keep >= m:
            return None
        return torch.sort(ops.stable_topk(scores[None].float(), keep)[0]).values
