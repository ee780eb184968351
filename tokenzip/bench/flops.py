"""Analytic FLOPs of the vision encoder and the LLM for given token counts (one multiply-add = 2 FLOPs).

Per transformer layer with ``P`` weights in its linear layers (attention q/k/v/o or fused qkv, MLP), attention width
``d`` (heads x head_dim) and ``n`` tokens:

- matmuls with the weights: ``2 * P * n``
- attention scores and weighted sum: ``4 * n^2 * d`` for the bidirectional encoder (QK^T and AV, 2 n^2 d each);
  ``2 * n * (n + 1) * d`` for the causal LLM prefill (only the n(n+1)/2 visible pairs)

Encoder FLOPs = sum over encoder passes (one per image / crop) of ``L_enc * (2 P_enc n + 4 n^2 d_enc)``; for
methods that compress inside the encoder (stage ``"encoder"``) each layer call counts with its own token count (the
full count before the cut, the kept/merged count after it; layers the stage skips count zero).
LLM prefill FLOPs = ``L_llm * (2 P_llm n + 2 n (n+1) d_llm) + 2 * d_model * V`` (the LM head, for the one position
``generate`` computes logits for). For methods that prune inside the LLM, each layer uses its own sequence length
from the method's schedule (the full prompt before the pruning layer, the kept tokens after it). Left out (each well
under 1% at these sizes): norms, activations, softmax, rotary embeddings, the patch embedding and the projector. ``P``
is counted from the built model's own first layer, so the formula follows whatever architecture is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StackShape:
    layers: int
    linear_params: int  # weights of the nn.Linear modules of one layer
    attn_width: int  # heads x head_dim


def stack_shape(layers: torch.nn.ModuleList | None) -> StackShape | None:
    """FLOP formula inputs of a stack of identical layers (the encoder's or the LLM's, from the adapter's parts)."""
    if layers is None or len(layers) == 0:
        return None
    first = layers[0]
    lin = sum(m.weight.numel() for m in first.modules() if isinstance(m, torch.nn.Linear))
    width = 0
    for m in first.modules():
        q = getattr(m, "q_proj", None)
        if isinstance(q, torch.nn.Linear):
            width = q.out_features
            break
        qkv = getattr(m, "qkv", None)
        if isinstance(qkv, torch.nn.Linear):
            width = qkv.out_features // 3
            break
    if not width:
        width = next((m.in_features for m in first.modules() if isinstance(m, torch.nn.Linear)), 0)
    return StackShape(len(layers), lin, width)


def encoder_flops(shape: StackShape | None, passes: list[int], layers: int | None = None) -> float:
    """FLOPs of the encoder over passes of ``passes[i]`` tokens each (bidirectional attention)."""
    if shape is None:
        return 0.0
    L = shape.layers if layers is None else layers
    return float(sum(L * (2 * shape.linear_params * n + 4 * n * n * shape.attn_width) for n in passes))


def encoder_flops_per_layer(shape: StackShape | None, calls: list[tuple[int, list[int]]],
                            layers: int | None = None) -> float:
    """FLOPs of an encoder whose layers ran on different token counts (stage ``"encoder"``: the layers after a cut
    see the kept/merged tokens only). ``calls``: ``(layer index, tokens of each sequence)`` of every layer call.

    ``layers`` (the published depth of an encoder built with fewer layers): the cut stays where it is and the
    missing layers run on the tokens of the last layer call of each pass (a full-depth model compressed at the
    same layer)."""
    if shape is None:
        return 0.0

    def one(n: int) -> float:
        return 2 * shape.linear_params * n + 4 * n * n * shape.attn_width

    total = float(sum(one(n) for _, ns in calls for n in ns))
    if layers is not None and layers > shape.layers and calls:
        last = max(i for i, _ in calls)
        total += (layers - shape.layers) * sum(one(n) for i, ns in calls if i == last for n in ns)
    return total


def layer_tokens(calls: list[tuple[int, list[int]]]) -> list[list[int]]:
    """Tokens per sequence entering each encoder layer, in layer order (``[[layer 0 counts], [layer 1 ...]]``): the
    token-count profile of an encoder-stage run for the report."""
    by_layer: dict[int, list[int]] = {}
    for i, ns in calls:
        by_layer.setdefault(i, []).extend(ns)
    return [by_layer[i] for i in sorted(by_layer)]


def llm_prefill_flops(shape: StackShape | None, n: int, d_model: int, vocab: int, layers: int | None = None,
                      batch: int = 1) -> float:
    """FLOPs of a causal LLM prefill over ``n`` tokens, plus the LM head for one position."""
    if shape is None:
        return 0.0
    L = shape.layers if layers is None else layers
    per_row = L * (2 * shape.linear_params * n + 2 * n * (n + 1) * shape.attn_width) + 2 * d_model * vocab
    return float(batch * per_row)


def llm_prefill_flops_per_layer(shape: StackShape | None, lengths: list[int], d_model: int, vocab: int) -> float:
    """Like :func:`llm_prefill_flops` when layer ``l`` sees ``lengths[l]`` tokens (LLM-stage pruning); the
    attention term uses each layer's own length."""
    if shape is None:
        return 0.0
    return float(sum(2 * shape.linear_params * n + 2 * n * (n + 1) * shape.attn_width for n in lengths)
                 + 2 * d_model * vocab)


def scheduled_lengths(n_total: int, items: list[int], schedule_of, layers: int) -> list[int]:
    """Per-layer sequence lengths of a prefill of ``n_total`` tokens whose media items (``items``: token counts)
    shrink as ``schedule_of(n, layers) -> [(layer, count), ...]`` says (a stage applies before its layer)."""
    out = []
    for layer in range(layers):
        removed = 0
        for n in items:
            count = n
            for at, c in schedule_of(n, layers):
                if at <= layer:
                    count = c
            removed += n - count
        out.append(n_total - removed)
    return out
