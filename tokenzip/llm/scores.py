"""Attention rows of one decoder layer, recomputed from that layer's own projections (the model keeps running SDPA).

``attention_rows`` reproduces exactly what the layer's eager attention computes for the requested query rows:
q/k projections, the optional per-head q/k norms (Qwen3-style), the model's own ``apply_rotary_pos_emb`` on the
cos/sin the layer receives (so M-RoPE and original/kept positions come for free), the GQA head mapping, the
layer's scaling, and the causal + padding mask; softmax in float32 like ``eager_attention_forward``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _standard_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope_function(attn: torch.nn.Module) -> Callable:
    """The ``apply_rotary_pos_emb`` of the module that defines ``attn``'s class (the layer's own RoPE)."""
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    return fn if callable(fn) else _standard_rope


def _rope(fn: Callable, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return fn(x, x, cos, sin)[0]


def attention_rows(attn: torch.nn.Module, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                   key_valid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Softmax attention probabilities ``[B, H, R, W]`` (float32) of query rows ``rows`` ``[B, R]`` (slot indices,
    ``-1`` = unused row, returned as zeros) over the ``W`` keys of a causal self-attention layer.

    ``x`` ``[B, W, D]`` is the attention module's input (after the layer's input norm), ``position_embeddings``
    the ``(cos, sin)`` the layer receives, ``key_valid`` ``[B, W]`` bool (False: padding / filler slots). Slots are
    in sequence order, so causality is ``key slot <= query slot``.
    """
    b, w, _ = x.shape
    d = int(attn.head_dim)
    n_heads = attn.q_proj.out_features // d
    n_kv = attn.k_proj.out_features // d
    scale = float(getattr(attn, "scaling", d ** -0.5))
    rope = rope_function(attn)
    cos, sin = position_embeddings
    cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
    safe = rows.clamp(min=0)
    gather = safe.unsqueeze(-1)
    xr = torch.gather(x, 1, gather.expand(-1, -1, x.shape[-1]))
    q = attn.q_proj(xr).view(b, rows.shape[1], n_heads, d)
    k = attn.k_proj(x).view(b, w, n_kv, d)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cr = torch.gather(cos, 1, gather.expand(-1, -1, cos.shape[-1]))
    sr = torch.gather(sin, 1, gather.expand(-1, -1, sin.shape[-1]))
    q = _rope(rope, q, cr, sr)
    k = _rope(rope, k, cos, sin)
    k = k.repeat_interleave(n_heads // n_kv, dim=1)  # q head h reads kv head h // n_rep (transformers' repeat_kv)
    logits = torch.matmul(q, k.transpose(2, 3)) * scale  # [B, H, R, W]
    allowed = key_valid.bool()[:, None, :] & (torch.arange(w, device=x.device)[None, None, :] <= safe[:, :, None])
    logits = logits.masked_fill(~allowed[:, None], torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return probs * (rows >= 0)[:, None, :, None]
