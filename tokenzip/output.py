"""What a compressor returns, and the per-call statistics it records."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layout import Layout


@dataclass
class CompressOutput:
    """Result of compressing ``[B, N, D]`` tokens to ``[B, k, D]``.

    tokens: ``[B, k, D]`` compressed tokens, ordered by ``index`` (so spatial/temporal order is kept).
    source: ``[B, N]`` long, the output slot each input token went to (``-1``: dropped). A pure selection maps each
        kept token to its own slot; a merge maps every member of a group to the group's slot.
    index:  ``[B, k]`` long, ascending: the input position that represents each output token (the kept token, or
        the group's first member). Used for ordering and, inside the LLM, for position ids.
    """

    tokens: torch.Tensor
    source: torch.Tensor
    index: torch.Tensor

    @property
    def kept(self) -> torch.Tensor:
        """Alias of ``index``: the source position of each output token."""
        return self.index

    def groups(self, b: int = 0) -> list[list[int]]:
        """Members of each output token of sample ``b`` (a one-element list for a plain selection)."""
        k = self.tokens.shape[1]
        members: list[list[int]] = [[] for _ in range(k)]
        for pos, slot in enumerate(self.source[b].tolist()):
            if slot >= 0:
                members[slot].append(pos)
        return members


@dataclass
class ItemStats:
    """One compressed item (an image, a video, an audio clip)."""

    modality: str
    tokens_in: int
    tokens_out: int
    source: torch.Tensor  # [N] output slot of each input token, -1 dropped
    index: torch.Tensor  # [k] representative input position of each output token
    grid: Layout | None = None  # the item's layout (tokenzip/layout.py)
    # LLM stage: ``(layer, count)`` per stage that shortened this item (count kept from that decoder layer on), and
    # for each stage its own ``source`` over the tokens that entered it (output slot, -1 dropped; merges share one)
    stages: list[tuple[int, int]] = field(default_factory=list)
    stage_sources: list[torch.Tensor] = field(default_factory=list)
    # the count the method's budget allows the item (stage "input": its budget of ``tokens_in``); None where the
    # method always meets its budget exactly. Above ``tokens_out`` only at an input stage's floor: see ``over_budget``
    budget: int | None = None
    # prompt tokens other than its placeholders that left the sequence with the item's dropped units (stage "input":
    # Qwen3-VL's dropped temporal grids take their timestamp text and markers along); what the LLM reads is the
    # prompt's real tokens less, per item, ``tokens_in - tokens_out + text_removed``
    text_removed: int = 0

    @property
    def over_budget(self) -> bool:
        """Whether the item reached the LLM with more tokens than its budget allows: an input-stage method's floor
        (the least the model can be given, e.g. one temporal grid of a Qwen-VL clip) was above the budget
        (:class:`tokenzip.budget.BudgetFloorWarning`)."""
        return self.budget is not None and self.tokens_out > self.budget


@dataclass
class ModalityStats:
    tokens_in: int = 0
    tokens_out: int = 0
    items: list[ItemStats] = field(default_factory=list)

    @property
    def kept(self) -> list[torch.Tensor]:
        return [it.index for it in self.items]


def summarize(items_per_sample: list[list[ItemStats]]) -> list[dict[str, ModalityStats]]:
    """Group item stats into ``[sample][modality] -> ModalityStats``."""
    out: list[dict[str, ModalityStats]] = []
    for items in items_per_sample:
        per_mod: dict[str, ModalityStats] = {}
        for it in items:
            ms = per_mod.setdefault(it.modality, ModalityStats())
            ms.tokens_in += it.tokens_in
            ms.tokens_out += it.tokens_out
            ms.items.append(it)
        out.append(per_mod)
    return out


def chain_stats(first: list[dict[str, ModalityStats]], second: list[dict[str, ModalityStats]]
                ) -> list[dict[str, ModalityStats]]:
    """One pipeline part's stats followed by the next part's (which saw the first one's output), item by item:
    ``tokens_in`` and ``grid`` from the first, ``tokens_out`` and ``stages`` from the second, ``source``/``index``
    composed (tz.compose and the multi-stage methods); an item of a modality the first part left alone is the second
    part's."""
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
                src_a, src_b = a.source.cpu(), b.source.cpu()
                source = torch.where(src_a >= 0, src_b[src_a.clamp(min=0)], torch.full_like(src_a, -1))
                items.append(ItemStats(modality=mod, tokens_in=a.tokens_in, tokens_out=b.tokens_out, source=source,
                                       index=a.index.cpu()[b.index.cpu()], grid=a.grid, stages=list(b.stages),
                                       text_removed=a.text_removed + b.text_removed))
        # a modality only the later part compresses (a frame selection, then a method for audio and video)
        for mod, ms in post.items():
            if mod not in pre:
                items.extend(ms.items)
        per_sample.append(items)
    return summarize(per_sample)
