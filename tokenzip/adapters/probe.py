"""Encoder attention signals without eager attention: capture the input of one attention module and recompute,
from that module's own q/k projections, only the attention rows a method needs (:mod:`tokenzip.adapters.attention`).
The model keeps running SDPA."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from .. import timing
from .attention import ATTENTION_SIGNALS, attention_signals, block_signals, mean_keys


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


class VisionBlockProbe:
    """Forward pre-hook on the last vision block's attention: captures its input, segments and rotary embedding and
    computes per-patch ``cls_attention`` (attention received, summed over the queries of its segment, mean over
    heads) and pre-rotary ``keys`` (mean over heads), in the order the block sees the patches
    (:func:`tokenzip.adapters.attention.block_signals`)."""

    def __init__(self, attn: torch.nn.Module, needs: frozenset[str], chunk: int = 1024):
        self.attn = attn
        self.needs = needs
        self.chunk = chunk
        self.calls = 0
        self.received: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls += 1
        x = args[0] if args else kwargs["hidden_states"]
        cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
        pe = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)
        with torch.no_grad():
            out = block_signals(module, x, self.needs, pe, cu.tolist(), self.chunk)
        self.keys = out.get("keys")
        self.received = out.get("cls_attention")

    def run(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` (one ViT pass) with this probe on its block when an attention signal is needed (removed after,
        also after an exception); a RuntimeError unless the block ran exactly once."""
        handle = self.attn.register_forward_pre_hook(self.hook, with_kwargs=True) \
            if ATTENTION_SIGNALS & self.needs else None
        try:
            out = fn()
        finally:
            if handle is not None:
                handle.remove()
        if handle is not None and self.calls != 1:
            raise RuntimeError(f"expected one call of the last vision block, saw {self.calls}")
        return out
