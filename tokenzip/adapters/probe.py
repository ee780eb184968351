"""Encoder attention signals without eager attention: capture the input of one attention module and recompute,
from that module's own q/k projections, only the attention rows a method needs (:mod:`tokenzip.adapters.attention`).
The model keeps running SDPA."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from .. import timing
from .attention import ATTENTION_SIGNALS, attention_signals, mean_keys


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

    def _keys_hook(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        with torch.no_grad(), timing.span("signals"):
            self.results["keys"] = mean_keys(self.attn, output)


@contextmanager
def probe(attn: torch.nn.Module, needs: frozenset[str], cls_index: int | None) -> Iterator[AttentionProbe]:
    """Record ``needs``' attention signals of ``attn``'s next call. Keys alone are read off the layer's own
    ``k_proj`` output (nothing recomputed); attention rows are recomputed from the module's q/k on its input."""
    p = AttentionProbe(attn, needs, cls_index)
    if frozenset(needs) & ATTENTION_SIGNALS == {"keys"}:
        handle = attn.k_proj.register_forward_hook(p._keys_hook)
    else:
        handle = attn.register_forward_pre_hook(p._hook, with_kwargs=True)
    try:
        yield p
    finally:
        handle.remove()


@contextmanager
def capture_input(attn: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """``box["x"]``: the input of ``attn``'s last call while open, and ``box["k"]`` its ``k_proj`` output, for
    signals computed afterwards on parts of them (e.g. per row of a padded batch, where the padding must not
    count)."""
    box: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        box["x"] = args[0] if args else kwargs["hidden_states"]

    def keys(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        box["k"] = output

    handles = [attn.register_forward_pre_hook(hook, with_kwargs=True), attn.k_proj.register_forward_hook(keys)]
    try:
        yield box
    finally:
        for h in handles:
            h.remove()
