"""Encoder attention signals from one attention module's own q/k (:mod:`tokenzip.llm.scores`), no eager attention:
``cls_attention`` (the CLS row, or without a CLS token the attention each token receives) and ``keys`` (mean over
heads). Adapters call these on the input a probe captured (:mod:`tokenzip.adapters.probe`); the work is marked
``timing.span("signals")``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import timing
from ..llm.scores import QK, fused_qkv, received_attention, separate_qk, softmax_rows

ATTENTION_SIGNALS = frozenset({"cls_attention", "keys"})
ATTENTION_SIGNAL_ORDER = ("cls_attention", "keys")  # where signals ride as channels


def attention_signals(module: torch.nn.Module, x: torch.Tensor, needs: frozenset[str],
                      cls_index: int | None, chunk: int = 1024, k_out: torch.Tensor | None = None
                      ) -> dict[str, torch.Tensor]:
    """``cls_attention`` [B, N] and ``keys`` [B, N, head_dim] of a ``q_proj``/``k_proj`` attention module on its
    input ``x`` ``[B, N, D]``.

    With a CLS token, ``cls_attention`` is the CLS row of the softmax attention (mean over heads). Without one it is
    the attention each token receives, averaged over all queries and heads (our CLS substitute). ``k_out``: the
    module's own ``k_proj`` output on ``x`` when the layer already computed it (keys-only requests then cost nothing).
    """
    if not (ATTENTION_SIGNALS & needs):
        return {}
    with timing.span("signals"):
        if "cls_attention" not in needs:  # keys only: no query projection (what separate_qk does for the keys)
            return {"keys": mean_keys(module, module.k_proj(x) if k_out is None else k_out)}
        qk = separate_qk(module, x)
        return _signals(_as_float(qk), needs, cls_index, None, chunk, mean_received=True)


def mean_keys(module: torch.nn.Module, k_out: torch.Tensor) -> torch.Tensor:
    """``keys`` ``[B, N, head_dim]`` from the module's ``k_proj`` output ``[B, N, kv_heads * head_dim]``, as
    :func:`separate_qk` forms them (optional ``k_norm``), averaged over heads."""
    d = int(module.head_dim)
    k = k_out.view(k_out.shape[0], k_out.shape[1], module.k_proj.out_features // d, d)
    if getattr(module, "k_norm", None) is not None:
        k = module.k_norm(k)
    return k.transpose(1, 2).float().mean(dim=1)


def block_signals(module: torch.nn.Module, x: torch.Tensor, needs: frozenset[str],
                  position_embeddings: tuple[torch.Tensor, torch.Tensor] | None, bounds: Sequence[int],
                  chunk: int = 1024) -> dict[str, torch.Tensor]:
    """Signals of a fused-``qkv`` vision block (Qwen2-VL) on its unbatched input ``x`` ``[N, D]``: ``keys`` [N, d]
    (before rotary, mean over heads) and ``cls_attention`` [N], the attention each patch receives summed over the
    queries of its attention segment (``bounds``: the block's ``cu_seqlens``) and averaged over heads."""
    if not (ATTENTION_SIGNALS & needs):
        return {}
    with timing.span("signals"):
        qk = fused_qkv(module, x, position_embeddings if "cls_attention" in needs else None)
        return segment_signals(qk, needs, bounds, chunk)


def segment_signals(qk: QK, needs: frozenset[str], bounds: Sequence[int], chunk: int = 1024
                    ) -> dict[str, torch.Tensor]:
    """:func:`block_signals` from q/k already in hand (a batch of one, ``[1, H, N, d]``): ``keys`` [N, d] (mean over
    heads of ``content_keys``) and ``cls_attention`` [N] (attention received, summed over the queries of its segment
    in ``bounds``, mean over heads). The vLLM integration (tokenzip/vllm) feeds it the q/k vLLM's own vision block
    computed, so both engines score tokens with this one function."""
    out = _signals(qk, needs, None, bounds, chunk, mean_received=False)
    return {name: t[0] for name, t in out.items()}


def _as_float(qk: QK) -> QK:
    return QK(qk.q.float(), qk.k.float(), qk.content_keys.float(), qk.scale)


def _signals(qk: QK, needs: frozenset[str], cls_index: int | None, bounds: Sequence[int] | None, chunk: int,
             mean_received: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if "keys" in needs:
        out["keys"] = qk.content_keys.float().mean(dim=1)
    if "cls_attention" in needs:
        h, n = qk.q.shape[1], qk.k.shape[2]
        if cls_index is not None:
            q = qk.q[:, :, cls_index: cls_index + 1]
            out["cls_attention"] = softmax_rows(q, qk.k, qk.scale).mean(dim=(1, 2))
        else:
            received = received_attention(qk, bounds, chunk)
            out["cls_attention"] = received / (h * n) if mean_received else received / h
    return out
