"""Positions of kept tokens: they keep the positions the uncompressed model gives them (gather, never re-derive).

Building blocks for adapters whose models use explicit (e.g. M-RoPE / TMRoPE) position ids: the installed model's
own position function is run once on the full sequence; these functions pick, for every slot of the shortened
sequence, the column of the full sequence it takes its position from, gather those columns, and pack them the way
:func:`tokenzip.adapters.placeholders.shrink_sequences` packs the tokens.
"""

from __future__ import annotations

import torch


def kept_columns(input_ids: torch.Tensor, token_id: int, counts: list[list[tuple[int, int]]],
                 indices: list[list[torch.Tensor]]) -> torch.Tensor:
    """``[B, L]``: the full-sequence column each slot takes its position from. Text keeps its own column; the
    ``j``-th kept placeholder of an item (``n`` placeholders, ``k`` kept, ``counts[b]``) takes the column of the
    item's placeholder at the compressed token's representative index (``indices[b][item][j]``, the output's
    ``index``: the kept token, or the first member of a merged group)."""
    b, length = input_ids.shape
    src = torch.arange(length, device=input_ids.device).expand(b, -1).clone()
    for i in range(b):
        cols = (input_ids[i] == token_id).nonzero().flatten()
        start = 0
        for (n, k), index in zip(counts[i], indices[i]):
            src[i, cols[start: start + k]] = cols[start + index.to(cols.device)]
            start += n
    return src


def gather_columns(positions: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``positions`` ``[P, B, L]`` gathered at ``src`` ``[B, L]`` along the sequence."""
    return torch.gather(positions, 2, src.to(positions.device).unsqueeze(0).expand(positions.shape[0], -1, -1))


def pack(t: torch.Tensor, keep: torch.Tensor, side: str, width: int) -> torch.Tensor:
    """Keep ``t[..., i, keep[i]]`` for each row ``i`` of a ``[P, B, L]`` tensor, padded with 0 to ``width`` on
    ``side`` (the same packing as ``shrink_sequences``)."""
    p, b, _ = t.shape
    out = torch.zeros(p, b, width, dtype=t.dtype, device=t.device)
    for i in range(b):
        row = t[:, i, keep[i].to(t.device)]
        if side == "left":
            out[:, i, width - row.shape[1]:] = row
        else:
            out[:, i, : row.shape[1]] = row
    return out


def text_row(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Contiguous 1-D positions over the real tokens of ``mask`` ``[B, L]`` (0 at padding): the row Qwen-VL's
    4-row position ids use to build the causal mask."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0).to(dtype)


def rope_deltas(rope_rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, 1]`` ``max position + 1 - real length`` per sample (the Qwen-VL models' ``rope_deltas``): where
    decoding continues when the caller passes no position ids."""
    top = rope_rows.masked_fill(mask.to(rope_rows.device).unsqueeze(0) == 0, 0).amax(dim=(0, 2))
    return (top + 1 - mask.sum(-1).to(top.device)).unsqueeze(1)


def caller_positions(kwargs: dict, input_ids: torch.Tensor) -> torch.Tensor | None:
    """The caller's own ``position_ids`` as ``[P, B, L]`` (P = 1 for 2-D ids, 3 or 4 for M-RoPE / TMRoPE ids), or
    ``None`` when the call passes none; any other shape is a ValueError."""
    pos = kwargs.get("position_ids")
    if not isinstance(pos, torch.Tensor):
        return None
    if pos.dim() == 2 and pos.shape == input_ids.shape:
        return pos.unsqueeze(0)
    if pos.dim() == 3 and pos.shape[0] in (3, 4) and pos.shape[1:] == input_ids.shape:
        return pos
    raise ValueError(f"position_ids must be [B, L], [3, B, L] or [4, B, L] for input_ids of shape "
                     f"{tuple(input_ids.shape)}, got {tuple(pos.shape)}")
