"""Base class of the methods that compress visual tokens inside the LLM (stage ``"llm"``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..base import Compressor
from ..output import CompressOutput
from ..scorer import ScorerCompressor
from .slots import StageContext  # what the runner hands a stage (lives with the slots it describes)


def geometric_counts(n: int, k: int, stages: int) -> list[int]:
    """Counts after each of ``stages`` stages going from ``n`` to exactly ``k`` with a constant keep ratio
    ``lambda = (k / n) ** (1 / stages)`` (rounded half up, non-increasing, last == k)."""
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if k >= n:
        return [n] * stages
    if k <= 0:
        lam = 0.5
        out = [max(1, math.floor(n * lam ** (s + 1) + 0.5)) for s in range(stages - 1)]
        return out + [0]
    lam = (k / n) ** (1.0 / stages)
    out, prev = [], n
    for s in range(1, stages):
        c = min(prev, max(k, math.floor(n * lam ** s + 0.5)))
        out.append(c)
        prev = c
    return out + [k]


def stage_layers(fractions: tuple[float, ...], num_layers: int) -> list[int]:
    """Decoder-layer indices for stages placed at the given fractions of the depth, distinct, in [1, L - 1]."""
    out: list[int] = []
    for f in fractions:
        layer = min(num_layers - 1, max(1, math.floor(f * num_layers + 0.5)))
        if layer not in out:
            out.append(layer)
    return sorted(out)


@dataclass
class LLMCompressor(Compressor):
    """A method that prunes/merges an item's visual hidden states between decoder layers.

    ``schedule(n, num_layers)`` lists the stages as ``(layer, count)``: *before* decoder layer ``layer`` (0-based;
    layers ``< layer`` have run on the longer sequence) the item keeps ``count`` of the tokens it still has. Counts
    are non-increasing; the last one is what the budget gives (``budget.count(n)`` unless a method documents
    otherwise). At each stage ``_compress`` receives the item's remaining hidden states ``[1, m, D]`` (input of
    ``layer``) and the signals it asks for, computed from the attention of layer ``layer - 1``:

    - ``last_attention`` ``[1, m]``: attention the last real token pays each remaining token, mean over heads;
    - ``text_attention`` ``[1, T, m]``: the same for every real text token after the item (``T`` rows);
    - ``text`` ``[1, T, D]`` / ``text_mask`` ``[1, T]``: those text tokens' hidden states (input of ``layer``).
    """

    def schedule(self, n: int, num_layers: int) -> list[tuple[int, int]]:
        raise NotImplementedError

    def adapt(self, k: int, m: int, final: int, signals: dict) -> int:
        """The count for a non-final stage, given the planned ``k``, the ``m`` tokens left and the ``final`` count;
        methods with input-dependent (adaptive) ratios override it. The result is clamped to ``[final, m]``."""
        return k

    def stage(self, tokens: torch.Tensor, k: int, *, final: int, last: bool, signals: dict,
              context: StageContext) -> CompressOutput | None:
        """One stage of one item: ``tokens`` ``[1, m, D]`` are its remaining hidden states, ``k`` the planned count,
        ``final`` the item's final count, ``last`` whether this is its last planned stage. Returns the compressed
        item (``None``: this stage changes nothing). The default adapts ``k`` (non-final stages, :meth:`adapt`) and
        calls :meth:`compress`; methods whose stages depend on more than the count override it."""
        m = tokens.shape[1]
        if not last:
            k = max(final, min(m, int(self.adapt(k, m, final, signals))))
            if k >= m:
                return None
        return self.compress(tokens, k=k, grid=context.grid if m == context.n else None, **signals)

    def decode_layer(self, num_layers: int) -> int | None:
        """Decode-time KV pruning (``None``: none, the default): the first decoder layer whose cached visual
        entries are pruned during decoding, by the attention the current token pays them in the layer before."""
        return None

    def decode_keep(self, scores: torch.Tensor, n: int) -> torch.Tensor | None:
        """Decode-time KV pruning: given ``scores`` ``[m]`` (the current token's attention to the item's ``m``
        remaining cached entries, mean over heads) of an item of ``n`` tokens, the indices (ascending) of the
        entries to keep, or ``None`` to keep all. Entries not kept are freed for good."""
        return None

    def final_count(self, n: int, num_layers: int) -> int:
        """Tokens the item keeps after the last stage (what the budget promises)."""
        return self.budget.count(n)

    def check_layer(self, layer: int, num_layers: int, name: str = "layer") -> int:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"{name} must be an int, got {type(layer).__name__}")
        if not 1 <= layer <= num_layers - 1:
            raise ValueError(f"{name} must be in [1, {num_layers - 1}] for a {num_layers}-layer LLM, got {layer}")
        return layer


@dataclass
class LLMScorer(ScorerCompressor, LLMCompressor):
    """An LLM-stage method that ranks an item's remaining visual tokens and keeps the top ``count`` at each stage:
    it implements ``score_tokens`` (and ``schedule``); the stable top-k and the selection are the base's."""
