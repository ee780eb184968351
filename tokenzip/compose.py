"""``tz.compose(input, encoder | pre_llm, llm)``: methods of different stages run one after the other on the same
call, installed as one patch."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .base import Compressor, JointCompressor, JointItem, MethodInfo
from .budget import nearest_achievable
from .llm.slots import compose_source
from .output import CompressOutput, ItemStats, ModalityStats, summarize

# pipeline order; "encoder" and "pre_llm" share a slot (see Composed)
_ORDER = {"input": 0, "encoder": 1, "pre_llm": 1, "llm": 2}
_SLOT_NAMES = ("input", "encoder/pre_llm", "llm")


class ByModality(JointCompressor):
    """Pre-LLM methods for disjoint modalities run side by side in one stage (``tz.compose(audio_method,
    video_method)``): each item goes to the part that names its modality, with that part's budget and signals; a
    joint part (OmniZip) gets its items of a sample together. Built by :func:`compose`, not by hand."""

    def __init__(self, *parts: Compressor):
        owner: dict[str, Compressor] = {}
        for p in parts:
            if p.info.stage != "pre_llm":
                raise ValueError(f"compose runs methods side by side only at stage 'pre_llm' (one per modality); "
                                 f"{p.info.name} works at stage {p.info.stage!r}")
            for m in p.info.modalities:
                if m in owner:
                    raise ValueError(f"compose takes at most one pre-LLM method per modality; {owner[m].info.name} "
                                     f"and {p.info.name} both compress {m!r}")
                owner[m] = p
        self.parts = tuple(parts)
        self.owner = owner
        self.retain = self.tokens = None
        self.budget = None  # each part keeps its own budget (item_count)
        self.budgets = {}
        self.last_stats = []
        self.info = MethodInfo(
            name="+".join(p.info.name for p in parts), family=parts[-1].info.family, modalities=tuple(owner),
            stage="pre_llm", query_aware=any(p.info.query_aware for p in parts),
            reference="; ".join(p.info.reference for p in parts))

    @property
    def requires(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(dict.fromkeys(s for p in self.parts for s in p.requires))

    def signals_needed(self) -> frozenset[str]:
        return frozenset().union(*(p.signals_needed() for p in self.parts))

    def item_count(self, modality: str, n: int) -> int:
        part = self.owner[modality]
        return part.item_count(modality, n) if isinstance(part, JointCompressor) else part.budget.count(n)

    def compress_sample(self, items: list[JointItem]) -> list[CompressOutput]:
        outs: list[CompressOutput | None] = [None] * len(items)
        for part in self.parts:
            mine = [i for i, it in enumerate(items) if self.owner.get(it.modality) is part]
            if not mine:
                continue
            needs = part.signals_needed()
            if isinstance(part, JointCompressor):
                sub = [JointItem(it.modality, it.tokens, it.grid, it.k,
                                 {s: v for s, v in it.signals.items() if s in needs}, it.seconds)
                       for it in (items[i] for i in mine)]
                for i, out in zip(mine, part.compress_sample(sub)):
                    outs[i] = out
                continue
            for i in mine:
                it = items[i]
                outs[i] = part.compress(it.tokens, grid=it.grid, k=it.k,
                                        **{s: v for s, v in it.signals.items() if s in needs})
        for it, out in zip(items, outs):
            if out is None:
                raise ValueError(f"no part of {self.info.name} compresses {it.modality!r}")
        return outs  # type: ignore[return-value]

    def __repr__(self) -> str:
        return " | ".join(repr(p) for p in self.parts)


class Composed:
    """Compressors of different stages run one after the other on the same call, in pipeline order: an input-stage
    method (smaller inputs before the encoder), then an encoder-stage (``tz.InEncoder``) OR a pre-LLM method, then
    an LLM-stage method; any subset of at least two, each stage at most once.

    Budget (explicit, never multiplied by accident): each part keeps ITS OWN budget of the tokens IT receives. The
    input stage gives an item of ``N`` tokens ``N0`` = the nearest achievable count at or under its budget of ``N``
    (the adapter's counts for that item); the encoder/pre-LLM method keeps its budget of those ``N0`` tokens
    (``N1``); the LLM method then keeps its final count of ``N1``. ``effective(n)`` gives the exact result for an
    item of ``n`` tokens; ``retain`` the nominal product of the parts' ``retain``. ``last_stats`` chains the parts:
    ``tokens_in`` is the uncompressed count, ``tokens_out`` the count after the last part, ``source``/``index``
    refer to the first part's input tokens (for an input stage that resampled an item, through its geometric
    correspondence, tokenzip/adapters/resample.py).

    Pre-LLM methods for disjoint modalities may share the pre-LLM stage (``tz.compose(tz.get("vad_prune", ...),
    tz.get("dycoke", ...))`` on an omni model: audio and video compressed in the same call): they run side by side
    (:class:`ByModality`), each on the items of its modalities with its own budget, and count as one stage.

    An encoder-stage and a pre-LLM method cannot be in one pipeline: both compress the one encoder pass an adapter
    runs per call (``encode`` -> method -> ``rebuild`` into the precomputed-features path), and after the encoder
    stage's rebuild there are features, not an encoder pass, for the pre-LLM method to work on. Use a schedule of
    cuts (``tz.InEncoder(method, layer=(l1, l2, ...))``) for several compressions inside the encoder.
    """

    def __init__(self, *parts: Compressor):
        if len(parts) < 2:
            raise ValueError(f"compose takes at least two compressors (stages input, encoder or pre-LLM, LLM, in that "
                             f"order), got {len(parts)}")
        for p in parts:
            if not isinstance(p, Compressor):
                raise TypeError(f"compose takes configured compressors (e.g. tz.get('visionzip', retain=0.5)), got "
                                f"{type(p).__name__}")
        pre = [p for p in parts if p.info.stage == "pre_llm"]
        if len(pre) > 1:  # pre-LLM methods for disjoint modalities share the stage, side by side
            first = parts.index(pre[0])
            if any(p.info.stage == "pre_llm" for p in parts[first + len(pre):]):
                raise ValueError(f"compose takes its parts in pipeline order: input, then encoder or pre-LLM, then "
                                 f"LLM; got stages {[p.info.stage for p in parts]}")
            parts = parts[:first] + (ByModality(*pre),) + parts[first + len(pre):]
        stages = [p.info.stage for p in parts]
        slots = [_ORDER[s] for s in stages]
        if "encoder" in stages and "pre_llm" in stages:
            raise ValueError("compose cannot take an encoder-stage and a pre-LLM method together: both compress the "
                             "one encoder pass of a call, and after the encoder stage the LLM gets precomputed "
                             "features, not an encoder output to compress; use tz.InEncoder(method, layer=(l1, l2)) "
                             "for several cuts")
        if len(set(slots)) != len(slots):
            raise ValueError(f"compose takes at most one method per stage (input, encoder or pre-LLM, LLM); got stages "
                             f"{stages}")
        if slots != sorted(slots):
            raise ValueError(f"compose takes its parts in pipeline order: input, then encoder or pre-LLM, then LLM; "
                             f"got stages {stages}")
        self.parts = tuple(parts)
        mods = tuple(m for m in parts[0].info.modalities if all(m in p.info.modalities for p in parts[1:]))
        if not mods:
            raise ValueError(f"{' and '.join(p.info.name for p in parts)} share no modality")
        last = parts[-1].info
        self.info = MethodInfo(
            name="+".join(p.info.name for p in parts), family=last.family, modalities=mods, stage=last.stage,
            query_aware=any(p.info.query_aware for p in parts), reference="; ".join(p.info.reference for p in parts))

    def effective(self, n: int, num_layers: int = 32, achievable: Sequence[int] | None = None,
                  modality: str | None = None) -> int:
        """Tokens an item of ``n`` tokens keeps after every part (an LLM part: at the end of its schedule over
        ``num_layers`` decoder layers). With an input-stage part, ``achievable`` are the counts the model can be
        given for that item (``adapter.input_plan(inputs, part.reduces)[i].achievable``): the input stage takes the
        nearest one at or under its budget, which depends on the item (e.g. its aspect ratio). With pre-LLM parts
        side by side (one per modality) or a joint part with per-modality budgets, ``modality`` names the item's."""
        count = n
        for part in self.parts:
            if isinstance(part, JointCompressor):
                if modality is None:
                    raise ValueError(f"{part.info.name} keeps a per-modality budget: pass modality= (one of "
                                     f"{list(part.info.modalities)})")
                if modality in part.info.modalities:
                    count = part.item_count(modality, count)
                continue
            if part.info.stage == "input":
                if achievable is None:
                    raise ValueError(f"{part.info.name} reduces an item to one of the counts the model allows for it: "
                                     f"pass achievable=adapter.input_plan(inputs, {part.reduces!r})[i].achievable")
                count = nearest_achievable(part.budget.count(count), achievable)
                continue
            final = getattr(part, "final_count", None)
            count = final(count, num_layers) if final is not None else part.budget.count(count)
        return count

    @property
    def retain(self) -> float:
        """Nominal overall fraction: the product of the parts' ``retain`` (``tokens`` budgets: use effective())."""
        if any(p.budget is None for p in self.parts):
            raise ValueError("pre-LLM parts run side by side, one per modality: use effective(n, modality=...)")
        r = [p.budget.retain for p in self.parts]
        if any(v is None for v in r):
            raise ValueError("a part has a tokens= budget; use effective(n) for the overall count")
        out = 1.0
        for v in r:
            out *= float(v)
        return out

    @property
    def last_stats(self) -> list[dict[str, ModalityStats]]:
        chained = self.parts[0].last_stats
        for part in self.parts[1:]:
            chained = _chain(chained, part.last_stats)
        return chained

    def __call__(self, model: torch.nn.Module) -> Any:
        from .patch import Patch

        return Patch(self, model)

    def apply(self, model: torch.nn.Module) -> Any:
        return self(model).install()

    def __repr__(self) -> str:
        return f"compose({', '.join(repr(p) for p in self.parts)})"


def _chain(first: list[dict[str, ModalityStats]], second: list[dict[str, ModalityStats]]
           ) -> list[dict[str, ModalityStats]]:
    """One part's stats followed by the next part's (which saw the first one's output), item by item."""
    per_sample: list[list[ItemStats]] = []
    for pre, post in zip(first, second):
        items: list[ItemStats] = []
        for mod, ms in pre.items():
            later = post.get(mod, ModalityStats()).items
            for j, a in enumerate(ms.items):
                b = later[j] if j < len(later) else None
                if b is None:
                    items.append(a)
                    continue
                items.append(ItemStats(modality=mod, tokens_in=a.tokens_in, tokens_out=b.tokens_out,
                                       source=compose_source(a.source.cpu(), b.source.cpu()),
                                       index=a.index.cpu()[b.index.cpu()], grid=a.grid, stages=list(b.stages),
                                       text_removed=a.text_removed + b.text_removed))
        per_sample.append(items)
    return summarize(per_sample)


def compose(*parts: Compressor) -> Composed:
    """Methods of different stages in pipeline order (input, then encoder or pre-LLM, then LLM):
    ``with tz.compose(tz.get("visionzip", retain=0.5), tz.get("fastv", retain=0.5))(model): ...`` — each keeps its
    own share of what it receives (about 25% overall)."""
    return Composed(*parts)
