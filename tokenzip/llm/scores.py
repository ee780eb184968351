"""Attention rows recomputed from a layer's own q/k projections, while the model keeps running SDPA. The one
implementation tokenzip uses for attention signals, in encoders (CLS attention, attention received, keys) and in
the LLM (the rows a method scores with).

Two parts: a per-architecture **q/k extractor** that reproduces what the layer's eager attention computes before its
softmax — :func:`separate_qk` for ``q_proj``/``k_proj`` modules (CLIP, SigLIP, Whisper, LLM decoders: optional
per-head q/k norms as in Qwen3, the model's own ``apply_rotary_pos_emb`` on the cos/sin the layer receives, so M-RoPE
and kept positions come for free), :func:`fused_qkv` for one fused ``qkv`` projection (Qwen2-VL's vision blocks, with
their own vision rotary function) — and the **rows** themselves: :func:`softmax_rows` (GQA head mapping, the layer's
scaling, a boolean mask for causality / key padding, softmax in float32 like ``eager_attention_forward``) and
:func:`received_attention` (the attention each key receives, summed over queries and heads, within attention
segments such as Qwen2.5-VL's windows given by ``cu_seqlens``, chunked over queries to bound memory).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..compat import layer_function


@dataclass
class QK:
    """Queries ``[B, H, R, d]`` and keys ``[B, H_kv, W, d]`` of one attention layer (rotary applied when the layer
    uses it), the keys before rotary (``content_keys``, for key-similarity signals) and the logit ``scale``."""

    q: torch.Tensor
    k: torch.Tensor
    content_keys: torch.Tensor
    scale: float


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _standard_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope_function(attn: torch.nn.Module, name: str = "apply_rotary_pos_emb") -> Callable:
    """The rotary function ``name`` as the layer's forward calls it: the layer's own kernel wrapper when hub kernels
    may swap it (:func:`tokenzip.compat.layer_function`), else the function of the module that defines ``attn``'s
    class (the layer's own RoPE)."""
    fn = layer_function(attn, name) or getattr(sys.modules.get(type(attn).__module__), name, None)
    return fn if callable(fn) else _standard_rope


def _scale(attn: torch.nn.Module, head_dim: int) -> float:
    return float(getattr(attn, "scaling", None) or getattr(attn, "scale", None) or head_dim ** -0.5)


def separate_qk(attn: torch.nn.Module, x: torch.Tensor, rows: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None) -> QK:
    """q/k of a ``q_proj``/``k_proj`` attention module on its input ``x`` ``[B, W, D]``: queries of the slots
    ``rows`` ``[B, R]`` (``-1`` = unused, computed on slot 0) or of every slot, keys of every slot."""
    b, w, _ = x.shape
    d = int(attn.head_dim)
    n_heads = attn.q_proj.out_features // d
    n_kv = attn.k_proj.out_features // d
    # gated attention (Qwen3.5, Qwen3-Next): q_proj gives each head's query and its output gate side by side
    heads = getattr(getattr(attn, "config", None), "num_attention_heads", None)
    gated = isinstance(heads, int) and attn.q_proj.out_features == 2 * heads * d
    if rows is None:
        xr, safe = x, None
    else:
        safe = rows.clamp(min=0).unsqueeze(-1)
        xr = torch.gather(x, 1, safe.expand(-1, -1, x.shape[-1]))
    if gated:
        q = attn.q_proj(xr).view(b, xr.shape[1], heads, 2 * d)[..., :d]
    else:
        q = attn.q_proj(xr).view(b, xr.shape[1], n_heads, d)
    k = attn.k_proj(x).view(b, w, n_kv, d)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    content = k
    if position_embeddings is not None:
        rope = rope_function(attn)
        cos, sin = position_embeddings
        cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
        cr, sr = cos, sin
        if safe is not None:
            cr = torch.gather(cos, 1, safe.expand(-1, -1, cos.shape[-1]))
            sr = torch.gather(sin, 1, safe.expand(-1, -1, sin.shape[-1]))
        q = rope(q, q, cr, sr)[0]
        k = rope(k, k, cos, sin)[0]
    return QK(q, k, content, _scale(attn, d))


def fused_qkv(attn: torch.nn.Module, x: torch.Tensor,
              position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
              rope_name: str = "apply_rotary_pos_emb_vision") -> QK:
    """q/k of a fused ``qkv`` attention module (Qwen2-VL's vision blocks; or separate ``q`` / ``k`` projections, as
    Qwen2.5-Omni's) on its unbatched input ``x`` ``[N, D]``, rotary by the model's own ``rope_name`` function;
    returned with a batch of one."""
    n = x.shape[0]
    h = int(attn.num_heads)
    if hasattr(attn, "qkv"):
        q, k, _ = attn.qkv(x).reshape(n, 3, h, -1).permute(1, 0, 2, 3).unbind(0)  # [N, H, d]
    else:
        q, k = attn.q(x).reshape(n, h, -1), attn.k(x).reshape(n, h, -1)
    content = k
    if position_embeddings is not None:
        cos, sin = position_embeddings
        q, k = rope_function(attn, rope_name)(q, k, cos, sin)
    return QK(q.transpose(0, 1)[None], k.transpose(0, 1)[None], content.transpose(0, 1)[None],
              _scale(attn, q.shape[-1]))


def softmax_rows(q: torch.Tensor, k: torch.Tensor, scale: float,
                 allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention ``[B, H, R, W]`` (float32) of queries ``q`` ``[B, H, R, d]`` over keys ``k``
    ``[B, H_kv, W, d]`` (query head ``h`` reads key head ``h // (H / H_kv)``, transformers' ``repeat_kv``);
    ``allowed`` (bool, broadcastable to ``[B, 1, R, W]``) masks keys out."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if allowed is not None:
        logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    return torch.softmax(logits, dim=-1, dtype=torch.float32)


def received_attention(qk: QK, bounds: Sequence[int] | None = None, chunk: int = 1024) -> torch.Tensor:
    """``[B, W]`` attention each key receives, summed over all queries and heads, in float32. ``bounds`` (e.g.
    ``cu_seqlens``) splits the sequence into attention segments that only see themselves (default: one segment)."""
    q, k = qk.q.float(), qk.k.float()
    b, _, w, _ = k.shape
    edges = [0, w] if bounds is None else [int(e) for e in bounds]
    received = torch.zeros(b, w, dtype=torch.float32, device=k.device)
    for s, e in zip(edges[:-1], edges[1:]):
        ks = k[:, :, s:e]
        for c in range(s, e, chunk):  # bound memory to [B, H, chunk, segment]
            received[:, s:e] += softmax_rows(q[:, :, c: min(c + chunk, e)], ks, qk.scale).sum(dim=(1, 2))
    return received


def attention_rows(attn: torch.nn.Module, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                   key_valid: torch.Tensor, rows: torch.Tensor, layer_mask: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Softmax attention probabilities ``[B, H, R, W]`` (float32) of query rows ``rows`` ``[B, R]`` (slot indices,
    ``-1`` = unused row, returned as zeros) over the ``W`` keys of a self-attention layer.

    ``x`` ``[B, W, D]`` is the attention module's input (after the layer's input norm), ``position_embeddings``
    the ``(cos, sin)`` the layer receives, ``key_valid`` ``[B, W]`` bool (False: padding / filler slots). Slots are
    in sequence order, so causality is ``key slot <= query slot``; ``layer_mask`` (bool ``[B or 1, 1, W, W]``, True:
    may attend), when given, is the layer's own mask and replaces causality (e.g. Gemma 3's bidirectional image
    blocks, a sliding window).
    """
    w = x.shape[1]
    qk = separate_qk(attn, x, rows, position_embeddings)
    safe = rows.clamp(min=0)
    if layer_mask is None:
        allowed = key_valid.bool()[:, None, :] & (torch.arange(w, device=x.device)[None, None, :] <= safe[:, :, None])
    else:
        own = layer_mask[:, 0].expand(x.shape[0], -1, -1).to(x.device)
        allowed = key_valid.bool()[:, None, :] & torch.gather(own, 1, safe[:, :, None].expand(-1, -1, own.shape[-1]))
    probs = softmax_rows(qk.q, qk.k, qk.scale, allowed[:, None])
    return probs * (rows >= 0)[:, None, :, None]
