"""Pure tensor functions shared by the methods. Nothing here knows about models."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import layout as layout_mod
from .output import CompressOutput

# the item layout (segments with a time axis; iterates as per-frame (h, w) grids): tokenzip/layout.py
Layout = layout_mod.Layout
as_layout = layout_mod.as_layout


def stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[B, k]`` of the ``k`` largest scores; ties go to the lower index (deterministic)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :k]


def select(tokens: torch.Tensor, idx: torch.Tensor) -> CompressOutput:
    """Keep the tokens at ``idx`` ``[B, k]`` in ascending position order."""
    idx = torch.sort(idx, dim=-1).values
    b, n, _ = tokens.shape
    kept = torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    source = torch.full((b, n), -1, dtype=torch.long, device=tokens.device)
    slots = torch.arange(idx.shape[1], device=tokens.device).expand(b, -1)
    source.scatter_(1, idx, slots)
    return CompressOutput(tokens=kept, source=source, index=idx)


def merge(tokens: torch.Tensor, assign: torch.Tensor, k: int, weights: torch.Tensor | None = None) -> CompressOutput:
    """Average tokens into ``k`` groups. ``assign`` ``[B, N]`` gives each token's group in ``[0, k)`` or ``-1``
    (dropped); every group must be non-empty. ``weights`` ``[B, N]`` (e.g. ToMe sizes) weight the mean.

    Output tokens are ordered by their group's first member, which becomes ``index``.
    """
    b, n, d = tokens.shape
    w = torch.ones(b, n, dtype=tokens.dtype, device=tokens.device) if weights is None else weights.to(tokens.dtype)
    valid = assign >= 0
    slot = assign.clamp(min=0)
    w = w * valid
    sums = torch.zeros(b, k, d, dtype=tokens.dtype, device=tokens.device)
    sums.scatter_add_(1, slot.unsqueeze(-1).expand(-1, -1, d), tokens * w.unsqueeze(-1))
    mass = torch.zeros(b, k, dtype=tokens.dtype, device=tokens.device).scatter_add_(1, slot, w)
    if bool((mass <= 0).any()):
        raise RuntimeError("merge: a group received no tokens")  # a method bug, not user input
    means = sums / mass.unsqueeze(-1)
    pos = torch.arange(n, device=tokens.device).expand(b, -1)
    first = torch.full((b, k), n, dtype=torch.long, device=tokens.device)
    first = first.scatter_reduce(1, slot, torch.where(valid, pos, n), reduce="amin")
    order = torch.sort(first, dim=-1, stable=True).indices  # new slot -> old slot
    rank = torch.argsort(order, dim=-1)  # old slot -> new slot
    source = torch.where(valid, torch.gather(rank, 1, slot), torch.full_like(slot, -1))
    out = torch.gather(means, 1, order.unsqueeze(-1).expand(-1, -1, d))
    return CompressOutput(tokens=out, source=source, index=torch.gather(first, 1, order))


def merge_into_kept(tokens: torch.Tensor, keep_idx: torch.Tensor, target: torch.Tensor,
                    weights: torch.Tensor | None = None) -> CompressOutput:
    """Keep ``keep_idx`` ``[B, k]`` and fold every other token into the kept token ``target`` ``[B, N]`` names
    (an input position that is in ``keep_idx``, or ``-1`` to drop it). Kept tokens are their own targets."""
    b, n, _ = tokens.shape
    k = keep_idx.shape[1]
    keep_idx = torch.sort(keep_idx, dim=-1).values
    slot_of_pos = torch.full((b, n), -1, dtype=torch.long, device=tokens.device)
    slot_of_pos.scatter_(1, keep_idx, torch.arange(k, device=tokens.device).expand(b, -1))
    assign = torch.where(target >= 0, torch.gather(slot_of_pos, 1, target.clamp(min=0)), torch.full_like(target, -1))
    assign.scatter_(1, keep_idx, torch.arange(k, device=tokens.device).expand(b, -1))
    return merge(tokens, assign, k, weights)


def split_budget(sizes: Sequence[int], k: int) -> list[int]:
    """Share ``k`` over parts of the given sizes in proportion (largest remainder), each part getting at least one
    token while ``k`` allows and never more than its size."""
    total = sum(sizes)
    if k >= total:
        return list(sizes)
    shares = [k * s / total for s in sizes]
    alloc = [min(s, max(1 if k >= len(sizes) else 0, math.floor(x))) for s, x in zip(sizes, shares)]
    while sum(alloc) > k:  # the at-least-one floor can overshoot
        i = max(range(len(alloc)), key=lambda j: (alloc[j] - shares[j], alloc[j]))
        alloc[i] -= 1
    while sum(alloc) < k:
        i = max((j for j in range(len(alloc)) if alloc[j] < sizes[j]), key=lambda j: (shares[j] - alloc[j], -j))
        alloc[i] += 1
    return alloc


def _bins(n: int, m: int) -> list[tuple[int, int]]:
    """``m`` contiguous bins over ``range(n)`` (adaptive-pooling boundaries)."""
    return [((i * n) // m, ((i + 1) * n) // m) for i in range(m)]


def grid_shape(h: int, w: int, k: int) -> tuple[int, int, int]:
    """Output shape for pooling an ``h x w`` grid to exactly ``k`` cells: ``rows`` bands, ``cols`` cells per band,
    and ``last`` cells in the final band (``(rows - 1) * cols + last == k``), keeping the aspect ratio."""
    rows = max(1, min(h, round(math.sqrt(k * h / w))))
    cols = min(w, math.ceil(k / rows))
    rows = min(h, math.ceil(k / cols))
    last = k - (rows - 1) * cols
    return rows, cols, last


def pool_assignment(layout: Layout, k: int, device: torch.device | None = None) -> torch.Tensor:
    """Assignment ``[N]`` of tokens to ``k`` rectangular regions that tile each grid (ragged adaptive pooling:
    the last band of a grid may have fewer, wider cells so that the count is exact)."""
    sizes = [h * w for h, w in layout]
    alloc = split_budget(sizes, k)
    parts = []
    base = 0
    for (h, w), kk in zip(layout, alloc):
        a = torch.full((h, w), -1, dtype=torch.long)
        if kk > 0:
            rows, cols, last = grid_shape(h, w, kk)
            slot = base
            for r, (r0, r1) in enumerate(_bins(h, rows)):
                ncol = cols if r < rows - 1 else last
                for c0, c1 in _bins(w, ncol):
                    a[r0:r1, c0:c1] = slot
                    slot += 1
            base = slot
        parts.append(a.flatten())
    return torch.cat(parts).to(device)


def cosine_similarity_matrix(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, N, M]`` cosine similarities between the rows of ``x`` ``[B, N, D]`` and ``y`` ``[B, M, D]``."""
    xn = F.normalize(x.float(), dim=-1)
    yn = xn if y is None else F.normalize(y.float(), dim=-1)
    return xn @ yn.transpose(-1, -2)
