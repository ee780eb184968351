"""Encoder attention signals without eager attention: capture the input of one attention module and recompute,
from that module's own q/k projections, only the attention rows a method needs (:mod:`tokenzip.adapters.attention`).
The model keeps running SDPA."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from .attention import attention_signals


class AttentionProbe:
    def __init__(self, attn: torch.nn.Module, needs: frozenset[str], cls_index: int | None):
        self.attn = attn
        self.needs = needs
        self.cls_index = cls_index
        self.results: dict[str, torch.Tensor] = {}

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():  # attention_signals marks its work with timing.span("signals")
            self.results.update(attention_signals(module, x, self.needs, self.cls_index))


@contextmanager
def probe(attn: torch.nn.Module, needs: frozenset[str], cls_index: int | None) -> Iterator[AttentionProbe]:
    p = AttentionProbe(attn, needs, cls_index)
    handle = attn.register_forward_pre_hook(p._hook, with_kwargs=True)
    try:
        yield p
    finally:
        handle.remove()


@contextmanager
def capture_input(attn: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """``box["x"]``: the input of ``attn``'s last call while open, for signals computed afterwards on parts of it
    (e.g. per row of a padded batch, where the padding must not count)."""
    box: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        box["x"] = args[0] if args else kwargs["hidden_states"]

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield box
    finally:
        handle.remove()
