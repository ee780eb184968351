"""Pure functions for shortening a padded batch inside the LLM. Nothing here knows about models.

A :class:`Slots` describes the sequence a group of decoder layers runs on (not to be confused with an item's
`tokenzip.layout.Layout`, how one item's tokens tile space and time): ``pos`` ``[B, W]`` the original sequence
position each slot holds (ascending along a row), ``valid`` ``[B, W]`` whether the slot is a real key (not padding
and not a filler slot), and ``filler`` ``[B, W]`` slots that exist only to pad ragged rows to a common width (they
sit at the left of a row, like left padding). Text positions stay; visual positions stay only while they are kept;
the batch's own padding (masked positions of the caller's ``attention_mask``) is dropped at the first shortening, so
after a stage the batch is as wide as its longest row's kept tokens (ragged batches are re-packed, not carried
with their original left padding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Slots:
    pos: torch.Tensor  # [B, W] long, original positions (fillers: 0)
    valid: torch.Tensor  # [B, W] bool, real keys
    filler: torch.Tensor  # [B, W] bool

    @property
    def width(self) -> int:
        return self.pos.shape[1]


def full_slots(attention_mask: torch.Tensor) -> Slots:
    b, length = attention_mask.shape
    pos = torch.arange(length, device=attention_mask.device).expand(b, -1).clone()
    return Slots(pos, attention_mask.bool().clone(), torch.zeros(b, length, dtype=torch.bool,
                                                                  device=attention_mask.device))


def shorten(slots: Slots, drop: torch.Tensor) -> tuple[Slots, torch.Tensor]:
    """Remove the slots where ``drop`` ``[B, W]`` is True and every slot that is not a real key (padding and old
    fillers: no query ever attends to them, so no row needs them). Rows are re-packed to the longest row's count
    with filler slots on the left. Returns the new slots and ``gather`` ``[B, W']``: the old slot of each new slot
    (fillers point at slot 0)."""
    b = drop.shape[0]
    keep = ~drop & slots.valid
    counts = keep.sum(dim=1)
    width = int(counts.max())
    gather = torch.zeros(b, width, dtype=torch.long, device=drop.device)
    filler = torch.ones(b, width, dtype=torch.bool, device=drop.device)
    for i in range(b):
        idx = keep[i].nonzero().flatten()
        gather[i, width - idx.numel():] = idx
        filler[i, width - idx.numel():] = False
    pos = torch.gather(slots.pos, 1, gather).masked_fill(filler, 0)
    valid = torch.gather(slots.valid, 1, gather) & ~filler
    return Slots(pos, valid, filler), gather


def gather_seq(x: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    """``x[b, gather[b, j]]`` along dim 1 for ``x`` ``[B or 1, L, ...]``."""
    x = x.expand(gather.shape[0], *x.shape[1:])
    idx = gather.view(*gather.shape, *([1] * (x.dim() - 2))).expand(*gather.shape, *x.shape[2:])
    return torch.gather(x, 1, idx)


def prefill_mask(valid: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, 1, W, W]`` (True = attend): causal in slot order over valid keys. A query row with no valid
    key (padding / filler) attends to itself only, so no row is empty (no NaN) and real rows never see it."""
    w = valid.shape[1]
    ar = torch.arange(w, device=valid.device)
    allowed = valid[:, None, :] & (ar[None, None, :] <= ar[None, :, None])
    allowed |= torch.eye(w, dtype=torch.bool, device=valid.device)[None] & ~valid[:, :, None]
    return allowed[:, None]


def block_overlay(slots: Slots, blocks: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, 1, W, W]``: True where query and key slot hold real tokens of the same bidirectional block
    (``blocks`` ``[B, L]``: the block id of each ORIGINAL position, ``-1`` outside any block; Gemma 3's image
    blocks), so a block attends to itself in both directions whatever the slots kept of it."""
    ids = torch.gather(blocks.to(slots.pos.device), 1, slots.pos).masked_fill(~slots.valid, -1)
    same = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0)
    return same[:, None]


def window_limit(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor | None:
    """Boolean ``[B, 1, Q, K]``: a sliding-window layer's reach, measured in ORIGINAL positions (``query_pos`` ``[B,
    Q]``, ``key_pos`` ``[B, K]``): a key at most ``window - 1`` positions before the query (later keys pass: the
    causal or block part decides them), as transformers' ``sliding_window_overlay``. ``None`` for full attention."""
    if window is None:
        return None
    return ((query_pos[:, :, None] - key_pos[:, None, :]) < window)[:, None]


def step_mask(key_valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """Boolean ``[B, 1, T, K]`` for ``T = q_len`` new tokens appended after ``K - T`` cached slots."""
    kv = key_valid.shape[1]
    ar = torch.arange(kv, device=key_valid.device)
    qpos = (kv - q_len) + torch.arange(q_len, device=key_valid.device)
    allowed = key_valid[:, None, :] & (ar[None, None, :] <= qpos[None, :, None])
    own = ar[None, None, :] == qpos[None, :, None]
    allowed |= own & ~key_valid[:, kv - q_len:][:, :, None]
    return allowed[:, None]


def to_implementation(mask: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask in the format the attention implementation expects (eager: additive float)."""
    if implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def as_allowed(mask: Any) -> torch.Tensor | None:
    """A layer's 4-D attention mask as boolean "may attend" (eager's additive float: 0 where allowed); None when
    the layer got none (SDPA's plain causal case) or something else (e.g. a flex-attention block mask)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return None
    return mask if mask.dtype == torch.bool else mask == 0


def compose_source(src1: torch.Tensor, src2: torch.Tensor) -> torch.Tensor:
    """Chain two ``source`` maps: ``[N] -> slot in [0, M)`` then ``[M] -> slot in [0, K)`` (``-1`` = dropped)."""
    return torch.where(src1 >= 0, src2[src1.clamp(min=0)], torch.full_like(src1, -1))


@dataclass
class StageContext:
    """What the runner knows about an item at a stage, besides its remaining hidden states: the item's ORIGINAL
    layout (``grid``, ``None`` when unknown, e.g. after a pre-LLM method) and token count ``n``, the original token
    that represents each remaining one (``index`` ``[m]``, ascending), and ``memo``, a dict private to this item for
    the whole prefill (a method's state between its stages)."""

    grid: Any
    n: int
    index: torch.Tensor
    memo: dict = field(default_factory=dict)
