"""``tz.compose(pre, llm)``: a pre-LLM method followed by an LLM-stage method, installed as one patch."""

from __future__ import annotations

from typing import Any

import torch

from .base import Compressor, MethodInfo
from .llm.slots import compose_source
from .output import ItemStats, ModalityStats, summarize


class Composed:
    """Two compressors run one after the other on the same call.

    Budget (explicit, never multiplied by accident): each part keeps ITS OWN budget of the tokens IT receives. The
    pre-LLM method keeps ``a.budget.count(N)`` of an item's ``N`` encoder tokens; the LLM method then keeps
    ``b``'s final count of those ``N1`` tokens. ``retain`` reports the resulting overall fraction for an item of
    ``n`` tokens (``effective(n)``); with retain budgets it is about the product ``a.retain * b.retain``.
    ``last_stats`` chains both: ``tokens_in`` is the encoder count, ``tokens_out`` the count after the LLM stage,
    ``source``/``index`` refer to the encoder tokens.
    """

    def __init__(self, *parts: Compressor):
        if len(parts) != 2:
            raise ValueError(f"compose takes exactly two compressors (a pre-LLM one, then an LLM one), got "
                             f"{len(parts)}")
        for p in parts:
            if not isinstance(p, Compressor):
                raise TypeError(f"compose takes configured compressors (e.g. tz.get('visionzip', retain=0.5)), got "
                                f"{type(p).__name__}")
        first, second = parts
        if first.info.stage == "llm" or second.info.stage != "llm":
            raise ValueError(f"compose(a, b) needs a pre-LLM/encoder method then an LLM-stage method; got stages "
                             f"{first.info.stage!r} then {second.info.stage!r}")
        self.parts = (first, second)
        mods = tuple(m for m in first.info.modalities if m in second.info.modalities)
        if not mods:
            raise ValueError(f"{first.info.name} and {second.info.name} share no modality")
        self.info = MethodInfo(
            name=f"{first.info.name}+{second.info.name}", family=second.info.family, modalities=mods,
            stage="llm", query_aware=first.info.query_aware or second.info.query_aware,
            reference=f"{first.info.reference}; {second.info.reference}")

    def effective(self, n: int, num_layers: int = 32) -> int:
        """Tokens an item of ``n`` encoder tokens keeps after both parts (at the end of the LLM schedule)."""
        first, second = self.parts
        n1 = first.budget.count(n)
        final = getattr(second, "final_count", None)
        return final(n1, num_layers) if final is not None else second.budget.count(n1)

    @property
    def retain(self) -> float:
        """Nominal overall fraction: the product of the parts' ``retain`` (``tokens`` budgets: use effective())."""
        r = [p.budget.retain for p in self.parts]
        if any(v is None for v in r):
            raise ValueError("a part has a tokens= budget; use effective(n) for the overall count")
        return float(r[0]) * float(r[1])

    @property
    def last_stats(self) -> list[dict[str, ModalityStats]]:
        first, second = self.parts
        per_sample: list[list[ItemStats]] = []
        for pre, post in zip(first.last_stats, second.last_stats):
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
                                           index=a.index.cpu()[b.index.cpu()], grid=a.grid, stages=list(b.stages)))
            per_sample.append(items)
        return summarize(per_sample)

    def __call__(self, model: torch.nn.Module) -> Any:
        from .patch import Patch

        return Patch(self, model)

    def apply(self, model: torch.nn.Module) -> Any:
        return self(model).install()

    def __repr__(self) -> str:
        return f"compose({self.parts[0]!r}, {self.parts[1]!r})"


def compose(first: Compressor, second: Compressor) -> Composed:
    """A pre-LLM method then an LLM-stage method: ``with tz.compose(tz.get("visionzip", retain=0.5),
    tz.get("fastv", retain=0.5))(model): ...`` — each keeps its own share of what it receives (about 25% overall)."""
    return Composed(first, second)
