"""Base class of the methods that compress visual tokens inside the LLM (stage ``"llm"``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import ops
from ..base import Compressor
from ..budget import Budget
from ..output import CompressOutput, chain_stats
from ..scorer import ScorerCompressor
from ..signals import SIGNALS
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


@dataclass(frozen=True)
class ShareBudget(Budget):
    """The first part's budget in a multi-stage method with a ``tokens=k`` budget: of ``n`` tokens keep
    ``min(n, max(k, round(n ** (1 - share) * k ** share)))``, i.e. ``share`` of the way from ``n`` to ``k`` on a log
    scale (the later part then keeps ``k``)."""

    share: float = 1.0

    def count(self, n: int) -> int:
        if n <= 0:
            return 0
        k = min(int(self.tokens), n)
        return min(n, max(k, math.floor(n ** (1.0 - self.share) * k ** self.share + 0.5)))


def split_budget(budget: Budget, share: float) -> tuple[Budget, Budget]:
    """A method's budget split between two parts run one after the other: the first does ``share`` of the reduction
    on a log scale, the second the rest. ``retain=r``: ``retain=r ** share`` then ``retain=r ** (1 - share)`` of
    what the first kept (about ``r`` overall, each part rounding its own count); ``tokens=k``: the first keeps
    ``round(n ** (1 - share) * k ** share)`` (at least ``k``), the second exactly ``k``."""
    if budget.retain is not None:
        r = float(budget.retain)
        return Budget(retain=r ** share), Budget(retain=r ** (1.0 - share))
    return ShareBudget(tokens=budget.tokens, share=share), Budget(tokens=budget.tokens)


class MultiStageLLM(LLMCompressor):
    """A registered method whose parts run at different stages of one call, under one name: a part before the LLM
    (stage ``"pre_llm"``, on the vision encoder's output) then an LLM-stage part (prefill stages, and decode-time KV
    pruning when it has one). Subclasses build the parts from their own fields (:meth:`build_parts`); the patch
    installs ``parts`` as a ``tz.compose`` pipeline, each part keeping its own budget of what it receives.
    ``last_stats`` hold the items of the method's modalities.

    The method's schedule, final count and decode-time pruning are its LLM part's for the ``llm_count(n)`` tokens
    an item of ``n`` tokens brings to the LLM; ``last_stats`` chain the parts (``tokens_in``: the uncompressed count,
    ``stages``: the LLM part's). Declared signals: ``requires`` is the LLM part's (what the LLM stage must produce);
    ``optional`` adds the first part's (the adapter computes them before the LLM; a patch refuses an adapter that
    cannot produce one the first part requires). At tensor level (``compress``) the parts run one after the other to
    exactly ``k``: the first to ``mid_count(n, k)``, then the LLM part, its per-token signals summed over each group
    the first part merged."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.parts = tuple(self.build_parts())
        if len(self.parts) != 2 or self.parts[0].info.stage != "pre_llm" or self.parts[1].info.stage != "llm":
            raise RuntimeError(f"{self.info.name}: build_parts() must return (pre-LLM part, LLM part)")

    def build_parts(self) -> tuple[Compressor, "LLMCompressor"]:
        raise NotImplementedError

    @property
    def last_stats(self) -> list:  # type: ignore[override]
        first, second = self.parts
        mods = self.info.modalities  # the items the LLM stage works on (e.g. not a video's soundtrack)
        return [{m: ms for m, ms in sample.items() if m in mods}
                for sample in chain_stats(first.last_stats, second.last_stats)]

    @last_stats.setter
    def last_stats(self, value: list) -> None:
        for part in getattr(self, "parts", ()):
            part.last_stats = list(value)

    @property
    def requires(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self.parts[1].requires)

    @property
    def optional(self) -> tuple[str, ...]:  # type: ignore[override]
        first, second = self.parts
        names = (*first.requires, *first.optional, *second.optional)
        return tuple(dict.fromkeys(s for s in names if s not in self.requires))

    def llm_count(self, n: int) -> int:
        """Tokens an item of ``n`` tokens brings to the LLM (the first part's count)."""
        return self.parts[0].budget.count(n)

    def mid_count(self, n: int, k: int) -> int:
        """Tensor level: the first part's count when the two parts together go from ``n`` to ``k``."""
        return ShareBudget(tokens=max(k, 1), share=self.share).count(n) if k > 0 else 0

    def schedule(self, n: int, num_layers: int) -> list[tuple[int, int]]:
        return self.parts[1].schedule(self.llm_count(n), num_layers)

    def final_count(self, n: int, num_layers: int) -> int:
        return self.parts[1].final_count(self.llm_count(n), num_layers)

    def decode_layer(self, num_layers: int) -> int | None:
        return self.parts[1].decode_layer(num_layers)

    def decode_keep(self, scores: torch.Tensor, n: int) -> torch.Tensor | None:
        return self.parts[1].decode_keep(scores, n)

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        first, second = self.parts
        n = tokens.shape[1]
        mid = max(k, min(n, self.mid_count(n, k)))
        a = first.compress(tokens, grid=layout, k=mid, **{s: v for s, v in signals.items()
                                                         if s in first.signals_needed()})
        later = {}
        for name, sig in signals.items():
            if name not in second.signals_needed():
                continue
            dims = SIGNALS[name].dims
            if "N" in dims:  # per-token: a merged token gets the sum over its group
                axis = dims.index("N")
                moved = sig.movedim(axis, -1)
                out = moved.new_zeros(*moved.shape[:-1], mid)
                for b in range(tokens.shape[0]):
                    src = a.source[b]
                    keep = src >= 0
                    out[b].index_add_(out[b].dim() - 1, src[keep], moved[b][..., keep])
                sig = out.movedim(-1, axis)
            later[name] = sig
        b_out = second.compress(a.tokens, k=k, **later)
        # chain the two maps: an input token -> the first part's slot -> the second part's
        source = torch.where(a.source >= 0, torch.gather(b_out.source, 1, a.source.clamp(min=0)),
                             torch.full_like(a.source, -1))
        return CompressOutput(tokens=b_out.tokens, source=source, index=torch.gather(a.index, 1, b_out.index))
