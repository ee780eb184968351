"""DyCoke's second stage: prune the visual entries of the KV cache while decoding, by the current token's attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import MethodInfo
from ..llm.base import LLMCompressor
from ..output import CompressOutput


@dataclass
class DyCokeKV(LLMCompressor):
    """DyCoke's dynamic KV-cache pruning ("DyCoke: Dynamic Compression of Tokens for Fast Video Large Language
    Models", Tao et al., arXiv:2411.15024, the decoding stage; its first stage, temporal token merging, is the
    pre-LLM method ``dycoke``, and ``tz.compose(tz.get("dycoke", ...), tz.get("dycoke_kv", ...))`` runs both).

    Prefill is untouched (every layer sees every token; the first generated token is the stock model's). At every
    later call that continues the cache (each decoding step), the attention the current token pays each cached
    visual entry of an item in decoder layer ``layer - 1`` (mean over heads, recomputed from that layer's q and
    its cached keys, so the model keeps running SDPA) ranks the item's entries, and in every layer ``>= layer`` the
    item keeps only its ``k`` most attended ones (``k`` the budget: ``retain``/``tokens`` of the item's tokens, the
    paper's ``1 - p`` with pruning rate ``p``; ``layer`` default 3, the paper's ``L``, clamped to ``L_llm - 1``).
    With ``mass`` set (top-p), a step keeps only the fewest entries covering that share of the current token's
    attention to the item, never fewer than ``k``: the cache then keeps shrinking while the attention stays
    concentrated.

    Memory is really freed: the dropped entries are removed from the cache tensors of layers ``>= layer`` (rows of a
    batch re-packed to the longest one), whose attention masks shrink with them. Layers ``< layer`` keep every
    entry, so ``generate()``'s positions for new tokens (in transformers 5.24 taken from the 2-D attention mask, or
    from the layer-0 cache length when there is none; no ``cache_position``) stay those of the uncompressed model,
    and kept entries keep the rotary positions baked into their keys.

    Departures: the paper keeps the pruned entries in a "dynamic pruning cache" and re-selects among ALL visual
    entries at every step (the official code keeps the full cache and gathers the selected entries on every read,
    re-selecting when the attention pattern changes, cosine < 0.9 to the previous step's): no memory is saved that
    way. Here a dropped entry is gone, so a step can only keep what earlier steps left: with the fixed ratio the
    first decoding step makes the selection and later steps keep it (``mass`` adds the per-step shrinking).
    Per-item budget; ties go to the earlier entry.
    """

    layer: int = 3
    mass: float | None = None
    requires: ClassVar[tuple[str, ...]] = ("last_attention",)  # tensor level; in a model it is computed while decoding

    info: ClassVar[MethodInfo] = MethodInfo(
        name="dycoke_kv", family="attention", modalities=("video",), stage="llm", query_aware=True,
        reference="DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models, arXiv:2411.15024 "
                  "(KV cache dynamic pruning)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer must be an int >= 1, got {self.layer!r}")
        if self.mass is not None and (isinstance(self.mass, bool) or not isinstance(self.mass, (int, float))
                                      or not 0.0 < float(self.mass) <= 1.0):
            raise ValueError(f"mass must be None or in (0, 1], got {self.mass!r}")

    def schedule(self, n: int, num_layers: int) -> list[tuple[int, int]]:
        return []  # nothing happens at prefill

    def final_count(self, n: int, num_layers: int) -> int:
        return n  # prefill keeps every token; the budget applies to the cache while decoding

    def decode_layer(self, num_layers: int) -> int | None:
        if num_layers < 2:
            raise ValueError(f"dycoke_kv needs an LLM of at least 2 layers, got {num_layers}")
        return min(self.layer, num_layers - 1)

    def decode_keep(self, scores: torch.Tensor, n: int) -> torch.Tensor | None:
        m = scores.numel()
        k = self.budget.count(n)
        if self.mass is not None:
            share = torch.sort(scores.float(), descending=True, stable=True).values.cumsum(0)
            need = int((share < self.mass * share[-1].clamp(min=1e-12)).sum()) + 1
            k = max(k, min(m, need))
        if k >= m:
            return None
        return torch.sort(ops.stable_topk(scores[None].float(), k)[0]).values

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        """Tensor level: one pruning step at the fixed ratio on given tokens, ``last_attention`` standing for the
        current token's attention (inside a model the method works on the KV cache while decoding)."""
        return ops.select(tokens, ops.stable_topk(signals["last_attention"].float(), k))
