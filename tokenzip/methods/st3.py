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
    al., arXiv:2412.20105). Two parts, the spatial one and the temporal one:

    - **PVTP** (progressive visual token pruning, across layers; the default, ``anneal=False``): the LLM prunes the
      visual tokens in several stages at increasing depth. Before each stage layer ``l`` each item keeps its visual
      tokens most attended by the last token in layer ``l - 1`` (mean over heads: the attention of the layer just
      before, which the paper reuses instead of computing a new score, its "QK heredity"). Maps onto the LLM stage's
      multi-layer schedule (``schedule``): stages at ``layers`` (default 2/32, 8/32, 16/32 and 24/32 of the depth,
      i.e. layers 2, 8, 16, 24 of a 32-layer LLM, deduplicated and clamped to ``[1, L - 1]``), counts shrinking with
      a constant keep ratio from ``N`` to the budget, the last stage exactly the budget ``k`` (``retain``/``tokens``
      of the item's ``N`` tokens; :func:`tokenzip.llm.base.geometric_counts`). Every layer from the last stage on
      runs on exactly ``k`` visual tokens of the item.
    - **VTA** (visual token annealing, over decoding steps; ``anneal=True``): prefill keeps every token; at each
      decoding step the visual KV entries of layers ``>= layer`` shrink linearly with the number of generated
      tokens, from ``N`` to the budget ``k`` in ``anneal_steps`` steps: a step drops the
      ``r = ceil((N - k) / anneal_steps)`` entries the current token attends to least (in layer ``layer - 1``, mean
      over heads), never going below ``k``; after ``s`` steps an item holds ``max(k, N - s * r)`` entries. Maps onto
      the decode-time KV pruning machinery (``decode_layer`` / ``decode_keep``, as ``dycoke_kv``); dropped entries
      are freed from the cache. ``layer`` default 2 (clamped to ``L - 1``).

    Departures: the two parts do not run in the same call. The LLM runner refuses decode-time KV pruning on a cache
    that prefill stages have shortened (tokenzip/llm/hooks.py), so ``anneal=True`` runs VTA from an unpruned prefill
    and ``anneal=False`` runs PVTP alone (the paper stacks VTA on the PVTP-pruned cache). The stage placement and
    the geometric counts are ours, set by the budget (the paper fixes per-layer ratios for LLaVA); VTA's schedule is
    a straight line to the budget over ``anneal_steps`` steps (the paper lowers the per-layer counts as generation
    grows; its floor is not the budget). Per-item budget (the paper counts all image tokens of a prompt together);
    kept tokens keep their original positions; ties go to the earlier token. Video: each clip is one item ranked
    like an image (an application to video, not the paper's evaluation).
    """

    layers: tuple[int, ...] | None = None
    anneal: bool = False
    layer: int = 2
    anneal_steps: int = 32

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
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer must be an int >= 1, got {self.layer!r}")
        if isinstance(self.anneal_steps, bool) or not isinstance(self.anneal_steps, int) or self.anneal_steps < 1:
            raise ValueError(f"anneal_steps must be an int >= 1, got {self.anneal_steps!r}")

    # ---- PVTP: prefill stages -----------------------------------------------------------------------------------
    def boundaries(self, num_layers: int) -> list[int]:
        """The PVTP stage layers for an LLM of ``num_layers`` decoder layers."""
        if num_layers < 2:
            raise ValueError(f"st3 needs an LLM of at least 2 layers, got {num_layers}")
        if self.layers is not None:
            return [self.check_layer(x, num_layers, "layers[i]") for x in self.layers]
        return stage_layers(DEFAULT_FRACTIONS, num_layers)

    def schedule(self, n: int, num_layers: int) -> list[tuple[int, int]]:
        if self.anneal:
            return []  # VTA: prefill keeps every token
        layers = self.boundaries(num_layers)
        return list(zip(layers, geometric_counts(n, self.budget.count(n), len(layers))))

    def final_count(self, n: int, num_layers: int) -> int:
        return n if self.anneal else self.budget.count(n)

    def score_tokens(self, tokens: torch.Tensor, layout: ops.Layout, signals: dict[str, torch.Tensor]) -> torch.Tensor:
        return signals["last_attention"]

    # ---- VTA: decode-time annealing -----------------------------------------------------------------------------
    def decode_layer(self, num_layers: int) -> int | None:
        if not self.anneal:
            return None
        if num_layers < 2:
            raise ValueError(f"st3 needs an LLM of at least 2 layers, got {num_layers}")
        return min(self.layer, num_layers - 1)

    def anneal_count(self, n: int, m: int) -> int:
        """Entries an item of ``n`` tokens keeps at a decoding step that starts with ``m`` of them: one linear
        annealing step, ``max(k, m - ceil((n - k) / anneal_steps))``."""
        k = self.budget.count(n)
        if m <= k:
            return m
        return max(k, m - math.ceil((n - k) / self.anneal_steps))

    def decode_keep(self, scores: torch.Tensor, n: int) -> torch.Tensor | None:
        m = scores.numel()
        keep = self.anneal_count(n, m)
        if keep >= m:
            return None
        return torch.sort(ops.stable_topk(scores[None].float(), keep)[0]).values
