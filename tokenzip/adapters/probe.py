"""Encoder attention signals without eager attention: capture the input of one attention module and recompute,
from that module's own q/k projections, only the attention rows a method needs. The model keeps running SDPA."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from .. import timing


class AttentionProbe:
    def __init__(self, attn: torch.nn.Module, needs: frozenset[str], cls_index: int | None):
        self.attn = attn
        self.needs = needs
        self.cls_index = cls_index
        self.results: dict[str, torch.Tensor] = {}

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            self.results.update(attention_signals(module, x, self.needs, self.cls_index))


def _heads(module: torch.nn.Module) -> tuple[int, int, float]:
    head_dim = int(module.head_dim)
    n_heads = module.q_proj.out_features // head_dim
    scale = getattr(module, "scale", None) or getattr(module, "scaling", None) or head_dim ** -0.5
    return n_heads, head_dim, float(scale)


def attention_signals(module: torch.nn.Module, x: torch.Tensor, needs: frozenset[str],
                      cls_index: int | None, chunk: int = 1024) -> dict[str, torch.Tensor]:
    with timing.span("signals"):
        return _attention_signals(module, x, needs, cls_index, chunk)


def _attention_signals(module: torch.nn.Module, x: torch.Tensor, needs: frozenset[str],
                       cls_index: int | None, chunk: int) -> dict[str, torch.Tensor]:
    """``cls_attention`` [B, N] and ``keys`` [B, N, head_dim] of a q_proj/k_proj attention module on input ``x``.

    With a CLS token, ``cls_attention`` is the CLS row of the softmax attention (mean over heads). Without one it is
    the attention each token receives, averaged over all queries and heads (our CLS substitute).
    """
    out: dict[str, torch.Tensor] = {}
    if not ({"cls_attention", "keys"} & needs):
        return out
    b, n, _ = x.shape
    h, d, scale = _heads(module)
    k = module.k_proj(x).view(b, n, h, d).transpose(1, 2).float()  # [B, H, N, d]
    if "keys" in needs:
        out["keys"] = k.mean(dim=1)
    if "cls_attention" in needs:
        q_all = module.q_proj(x).view(b, n, h, d).transpose(1, 2).float()
        if cls_index is not None:
            q = q_all[:, :, cls_index: cls_index + 1]
            out["cls_attention"] = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1).mean(dim=(1, 2))
        else:
            received = torch.zeros(b, n, dtype=torch.float32, device=x.device)
            for s in range(0, n, chunk):  # bound memory to [B, H, chunk, N]
                att = torch.softmax(q_all[:, :, s: s + chunk] @ k.transpose(-1, -2) * scale, dim=-1)
                received += att.sum(dim=(1, 2))
            out["cls_attention"] = received / (h * n)
    return out


@contextmanager
def probe(attn: torch.nn.Module, needs: frozenset[str], cls_index: int | None) -> Iterator[AttentionProbe]:
    p = AttentionProbe(attn, needs, cls_index)
    handle = attn.register_forward_pre_hook(p._hook, with_kwargs=True)
    try:
        yield p
    finally:
        handle.remove()
