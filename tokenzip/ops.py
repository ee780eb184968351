"""Pure tensor functions shared by the methods. Nothing here knows about models."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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


# ---- ToMe-shaped merging primitives (Bolya et al., "Token Merging: Your ViT But Faster", arXiv:2210.09461) -------
MergeFn = Callable[..., torch.Tensor]


def bipartite_soft_matching(metric: torch.Tensor, r: int, protect_first: bool = False) -> tuple[MergeFn, MergeFn]:
    """One round of ToMe's bipartite soft matching on ``metric`` ``[B, N, C]``: ``(merge, unmerge)`` closures.

    Tokens alternate into sets A (even positions) and B (odd); each A token links to its most similar B token
    (cosine similarity; ties: the earliest B token) and the ``r`` strongest links merge (ties: the earliest A token).
    ``protect_first`` never merges token 0 (a CLS token). ``r`` is clipped to what A can give.

    ``merge(x, mode="sum")`` maps ``x`` ``[B, N, ...]`` to ``[B, N - r, ...]``: the survivors (unmerged A tokens and
    all B tokens) in their input order, each B token combined with the A tokens merged into it by ``mode`` ``"sum"``
    or ``"mean"`` (unweighted; see :func:`merge_wavg` for ToMe's size-weighted average). ``unmerge(y)`` maps
    ``[B, N - r, ...]`` back to ``[B, N, ...]``: every input position gets its survivor's row (exactly its own row
    for tokens that were not merged).
    """
    b, n, _ = metric.shape
    dev = metric.device
    a_pos = torch.arange(0, n, 2, device=dev)
    b_pos = torch.arange(1, n, 2, device=dev)
    r = max(0, min(int(r), a_pos.shape[0] - (1 if protect_first else 0))) if b_pos.shape[0] else 0
    if r == 0:  # nothing to merge (also N < 2): identity closures
        return (lambda x, mode="sum": x), (lambda y: y)
    m = F.normalize(metric.float(), dim=-1)
    # [B, |A|, |B|], one 2-D product per row (a batched matmul rounds differently, which moves exact ties)
    scores = torch.stack([row[a_pos] @ row[b_pos].T for row in m])
    if protect_first:
        scores[:, 0, :] = -math.inf
    best, partner = scores.max(dim=-1)  # ties: the earliest B token
    merged = torch.sort(best, dim=-1, descending=True, stable=True).indices[:, :r]  # ties: the earliest A token
    dest = torch.arange(n, device=dev).expand(b, -1).clone()  # input position -> surviving position
    dest.scatter_(1, a_pos[merged], b_pos[torch.gather(partner, 1, merged)])
    alive = torch.ones(b, n, dtype=torch.bool, device=dev)
    alive.scatter_(1, a_pos[merged], False)
    keep = torch.sort(torch.where(alive, torch.arange(n, device=dev), n), dim=-1).values[:, : n - r]  # [B, N - r]
    slot_of = torch.full((b, n + 1), -1, dtype=torch.long, device=dev)
    slot_of.scatter_(1, keep, torch.arange(n - r, device=dev).expand(b, -1))
    slot = torch.gather(slot_of, 1, dest)  # [B, N] input position -> output slot

    def _expand(index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}")
        out = torch.zeros(b, n - r, *x.shape[2:], dtype=x.dtype, device=x.device)
        out.scatter_add_(1, _expand(slot, x), x)
        if mode == "mean":
            count = torch.zeros(b, n - r, dtype=x.dtype, device=x.device).scatter_add_(
                1, slot, torch.ones(b, n, dtype=x.dtype, device=x.device))
            out = out / count.view(*count.shape, *([1] * (x.dim() - 2)))
        return out

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        return torch.gather(y, 1, _expand(slot, y))

    return merge, unmerge


def merge_wavg(merge: MergeFn, x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's size-weighted merge: ``x`` ``[B, N, C]`` and ``size`` ``[B, N]`` (input tokens per token, default 1)
    -> the merged tokens (size-weighted means) and their sizes."""
    if size is None:
        size = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
    total = merge(x * size.unsqueeze(-1).to(x.dtype), "sum")
    size = merge(size, "sum")
    return total / size.unsqueeze(-1).to(total.dtype), size


def merge_source(unmerge: MergeFn, source: torch.Tensor, count: int) -> torch.Tensor:
    """Source tracking across one merge: ``source`` ``[B, N0]`` (each original token's current slot, -1: dropped)
    -> its slot after the merge that has ``count`` outputs and the given ``unmerge``."""
    slots = torch.arange(count, device=source.device).expand(source.shape[0], -1)
    return compose_source(source, unmerge(slots))


def group_mean(rows: torch.Tensor, source: torch.Tensor, k: int, weight: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output slot ``j < k`` the mean of the ``rows`` (``[N]`` or ``[N, D]``, one per input token) whose
    ``source`` (``[N]``, output slot, -1 dropped) is ``j``, weighted by ``weight`` (``[N]``, None: 1 each), and the
    slot's total weight ``[k]``; a slot no input reaches has weight 0 and mean 0. One group's rows ToMe-style: what a
    merged token stands for, a per-input signal carried to the tokens, a kept set read in another feature space."""
    valid = source >= 0
    shape = (-1,) + (1,) * (rows.dim() - 1)
    w = torch.ones(int(valid.sum()), dtype=rows.dtype, device=rows.device) if weight is None \
        else weight.to(device=rows.device, dtype=rows.dtype)[valid]
    sums = rows.new_zeros((k, *rows.shape[1:])).index_add_(
        0, source[valid], rows[valid] if weight is None else rows[valid] * w.view(shape))
    count = torch.zeros(k, dtype=rows.dtype, device=rows.device).index_add_(0, source[valid], w)
    return sums / count.clamp(min=1e-12).view(shape), count


def compose_source(source: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Chain two assignments: ``source`` ``[B, N0]`` (original token -> slot, -1 dropped) and ``step`` ``[B, N1]``
    (slot -> next slot, -1 dropped) -> original token -> next slot."""
    nxt = torch.gather(step, 1, source.clamp(min=0))
    return torch.where(source >= 0, nxt, torch.full_like(nxt, -1))


def original_assignment(source_in: torch.Tensor, source: torch.Tensor, index: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """One item's assignment over its ORIGINAL tokens after several compression steps: ``source_in`` ``[N]`` (each
    original token's slot before the last step, -1 dropped), the last step's ``source`` ``[n]`` (slot -> output slot)
    and ``index`` ``[k]`` (each output token's representative among the ``n``) -> each original token's output slot
    ``[N]`` and each output token's representative original token ``[k]`` (the first original member of its
    representative slot)."""
    out_source = compose_source(source_in.unsqueeze(0), source.unsqueeze(0))[0]
    n, big = source.shape[0], source_in.shape[0]
    kept = source_in >= 0
    first = torch.full((n,), big, dtype=torch.long, device=source_in.device).scatter_reduce(
        0, source_in[kept], torch.arange(big, device=source_in.device)[kept], reduce="amin")
    return out_source, first[index.to(first.device)]


def merged_size(source: torch.Tensor, count: int, size: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, count]`` sizes after an assignment ``source`` ``[B, N]`` (slot of each token, -1: dropped) of tokens of
    ``size`` ``[B, N]`` (default 1 each): how many input tokens each output stands for."""
    valid = (source >= 0).float()
    weights = valid if size is None else size.float() * valid
    out = torch.zeros(source.shape[0], count, device=source.device)
    return out.scatter_add_(1, source.clamp(min=0), weights)


def size_bias(size: torch.Tensor) -> torch.Tensor:
    """ToMe's proportional attention as an additive attention mask: ``log(size)`` ``[B, n]`` -> ``[B, 1, 1, n]``,
    added to every query's logits over the keys (SDPA takes it as ``attn_mask``). Sizes below 1 count as 1."""
    return size.float().clamp(min=1).log()[:, None, None, :]


# ---- video: frames, markers and budgets shared by the frame-wise methods ------------------------------------------
def visual_frames(layout: Layout) -> list[tuple[int, int, int]]:
    """``(start, h, w)`` of every frame (spatial grid) that carries pixels, in token order: every frame of
    :meth:`Layout.frames` except the standalone ``newline`` marker tokens."""
    out, start = [], 0
    for s in layout.segments:
        for _ in range(s.t):
            if s.kind != "newline":
                out.append((start, s.h, s.w))
            start += s.h * s.w
    return out


def marker_positions(layout: Layout) -> list[int]:
    """Positions of the standalone ``newline`` marker tokens (LLaVA-OneVision's one newline after a video)."""
    out, start = [], 0
    for s in layout.segments:
        if s.kind == "newline":
            out += range(start, start + s.size)
        start += s.size
    return out


def reserve_markers(layout: Layout, k: int) -> tuple[list[int], int]:
    """The marker tokens a frame-wise method keeps as they are, and the budget left for the frames: markers carry
    no pixels but the model was trained to see them, so they are kept while the budget leaves at least one token
    for the frames (``k > #markers``); at smaller ``k`` every token goes to the frames."""
    markers = marker_positions(layout)
    if k > len(markers) and len(markers) < layout.n:
        return markers, k - len(markers)
    return [], k


def split_weighted(sizes: Sequence[int], weights: Sequence[float], k: int) -> list[int]:
    """Share ``k`` over parts of the given ``sizes`` in proportion to ``weights`` (``>= 0``): part ``i`` gets
    ``min(size_i, c * weight_i)`` for the ``c`` that makes the shares sum to ``k`` (water-filling, so what a full
    part cannot take goes to the others), rounded by largest remainder (ties: the earlier part). Every part gets at
    least one token while ``k`` allows. All-zero weights fall back to the sizes."""
    n = len(sizes)
    total = sum(sizes)
    if k >= total:
        return list(sizes)
    w = [max(0.0, float(x)) for x in weights]
    if not any(w):
        w = [float(s) for s in sizes]
    low = [1 if k >= n else 0 for _ in sizes]

    def shares(c: float) -> list[float]:
        return [min(float(s), max(float(lo), c * x)) for s, lo, x in zip(sizes, low, w)]

    lo_c, hi_c = 0.0, max(s / x for s, x in zip(sizes, w) if x > 0) + 1.0
    for _ in range(100):  # bisection on c: the summed shares grow monotonically with c
        mid = (lo_c + hi_c) / 2
        if sum(shares(mid)) < k:
            lo_c = mid
        else:
            hi_c = mid
    target = shares(hi_c)
    alloc = [min(s, max(lo, math.floor(x))) for s, lo, x in zip(sizes, low, target)]
    while sum(alloc) < k:
        i = max((j for j in range(n) if alloc[j] < sizes[j]), key=lambda j: (target[j] - alloc[j], -j))
        alloc[i] += 1
    while sum(alloc) > k:
        i = max((j for j in range(n) if alloc[j] > low[j]), key=lambda j: (alloc[j] - target[j], j))
        alloc[i] -= 1
    return alloc


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` of ``range(n)`` spread evenly (the centres of ``k`` equal bins): a content-free, deterministic pick."""
    return [((2 * i + 1) * n) // (2 * k) for i in range(k)]


def same_position_similarity(tokens: torch.Tensor, start: int, ref: int, size: int) -> torch.Tensor:
    """``[B, size]`` cosine similarity of each token of the frame at ``start`` to the token at the same position of
    the frame at ``ref`` (both ``size`` tokens, same grid)."""
    cur = tokens[:, start: start + size].float()
    prev = tokens[:, ref: ref + size].float()
    return F.cosine_similarity(cur, prev, dim=-1)
