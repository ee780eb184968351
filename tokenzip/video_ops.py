"""Pure tensor helpers shared by the video methods (tokenzip/methods/{fastvid,holitom,prunevid,llava_scissor,
dpc_knn_events}.py): the item's frames, temporal segmentation, same-position similarity across time, single-linkage
clustering, and the one driver that turns per-token group labels into a :class:`CompressOutput` of exactly ``k``
tokens. Nothing here knows about models.

Conventions. An item's **frames** are the spatial grids of :meth:`Layout.frames` except standalone ``"newline"``
segments (LLaVA-OneVision appends one ``image_newline`` token after a clip). Those **markers** carry no pixels: they
are kept as they are while the budget leaves at least one token for the frames (``k > markers``) and dropped
otherwise, so ``k`` is met exactly either way. A method labels every frame token with a group (``-1``: dropped);
each group becomes one output token, the plain mean of its input tokens (merged tokens are size-weighted means of
the tokens they stand for), represented by its first member.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from . import ops
from .output import CompressOutput

Frame = tuple[int, int, int]  # (start, h, w) of one spatial grid in the item's tokens


def frames_and_markers(layout: ops.Layout) -> tuple[list[Frame], list[int]]:
    """The item's frames ``(start, h, w)`` in token order and the positions of its marker tokens (standalone
    ``"newline"`` segments)."""
    frames: list[Frame] = []
    markers: list[int] = []
    start = 0
    for seg in layout.segments:
        for _ in range(seg.t):
            if seg.kind == "newline":
                markers.extend(range(start, start + seg.h * seg.w))
            else:
                frames.append((start, seg.h, seg.w))
            start += seg.h * seg.w
    if not frames:  # an item made of markers only: treat them as content
        return [(s, 1, 1) for s in markers], []
    return frames, markers


def frame_positions(frame: Frame, device: torch.device | None = None) -> torch.Tensor:
    start, h, w = frame
    return torch.arange(start, start + h * w, device=device)


def frame_means(x: torch.Tensor, frames: Sequence[Frame]) -> torch.Tensor:
    """``[T, D]`` mean token of every frame of one item's tokens ``x`` ``[N, D]`` (the frame-level feature)."""
    return torch.stack([x[s: s + h * w].float().mean(dim=0) for s, h, w in frames])


def adjacent_similarity(feats: torch.Tensor) -> torch.Tensor:
    """``[T - 1]`` cosine similarity of each frame feature ``[T, D]`` to the next one."""
    f = F.normalize(feats.float(), dim=-1)
    return (f[:-1] * f[1:]).sum(dim=-1)


def segments_from_cuts(cuts: Sequence[int], num_frames: int) -> list[tuple[int, int]]:
    """Frame ranges ``[start, end)`` when the video is cut after each transition index in ``cuts`` (``i`` cuts
    between frames ``i`` and ``i + 1``)."""
    bounds = [0] + sorted({int(c) + 1 for c in cuts if 0 <= int(c) < num_frames - 1}) + [num_frames]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def same_position_similarity(x: torch.Tensor, frames: Sequence[Frame]) -> list[torch.Tensor | None]:
    """For each pair of consecutive frames, ``[h * w]`` cosine similarity of every token to the token at the same
    position in the next frame; ``None`` where the two frames have different grids (no correspondence)."""
    xn = F.normalize(x.float(), dim=-1)
    out: list[torch.Tensor | None] = []
    for (s0, h0, w0), (s1, h1, w1) in zip(frames[:-1], frames[1:]):
        if (h0, w0) != (h1, w1):
            out.append(None)
        else:
            out.append((xn[s0: s0 + h0 * w0] * xn[s1: s1 + h1 * w1]).sum(dim=-1))
    return out


def join_nearest(dist: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index into ``centres`` of the nearest centre of every point (``dist`` ``[n, n]``, ties: the earliest
    centre in ``centres``' order); each centre joins itself."""
    slot = torch.argmin(dist[:, centres], dim=1)
    slot[centres] = torch.arange(centres.shape[0], device=dist.device)
    return slot


def maximum_spanning_tree(sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prim's algorithm on a dense similarity matrix ``[m, m]``: the ``m - 1`` edges ``(u, v, weight)`` of a
    maximum spanning tree, in the order they were added (ties: the lowest index). Runs on NumPy: ``m`` sequential
    steps of ``O(m)`` work, where per-call overhead dominates."""
    m = sim.shape[0]
    s = sim.detach().float().cpu().numpy()
    in_tree = np.zeros(m, dtype=bool)
    in_tree[0] = True
    best = s[0].copy()  # best similarity of every node to the tree
    best[0] = -np.inf
    parent = np.zeros(m, dtype=np.int64)
    us, vs, ws = np.zeros(m - 1, dtype=np.int64), np.zeros(m - 1, dtype=np.int64), np.zeros(m - 1, dtype=s.dtype)
    for step in range(m - 1):
        v = int(np.argmax(best))  # first maximum: the lowest index
        us[step], vs[step], ws[step] = parent[v], v, best[v]
        in_tree[v] = True
        best[v] = -np.inf
        closer = (s[v] > best) & ~in_tree
        best[closer] = s[v][closer]
        parent[closer] = v
    dev = sim.device
    return (torch.from_numpy(us).to(dev), torch.from_numpy(vs).to(dev), torch.from_numpy(ws).float().to(dev))


def single_linkage(x: torch.Tensor, *, count: int | None = None, threshold: float | None = None) -> torch.Tensor:
    """Component label ``[m]`` (``0..c-1``, numbered by first member) of every row of ``x`` ``[m, D]`` in the graph
    that links rows whose cosine similarity exceeds ``threshold`` (its connected components), or, given ``count``,
    the graph cut so that exactly ``count`` components remain: the threshold just below the ``m - count``
    strongest edges of a maximum spanning tree (single-linkage clustering). Ties: the earlier edge is kept."""
    m = x.shape[0]
    if m == 1:
        return torch.zeros(1, dtype=torch.long, device=x.device)
    xn = F.normalize(x.float(), dim=-1)
    us, vs, ws = maximum_spanning_tree(xn @ xn.T)
    if count is not None:
        order = torch.sort(ws, descending=True, stable=True).indices[: max(0, m - count)]
    else:
        order = torch.nonzero(ws > threshold).flatten()
    parent = list(range(m))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for e in order.tolist():
        a, b = root(int(us[e])), root(int(vs[e]))
        if a != b:
            parent[max(a, b)] = min(a, b)
    roots = torch.tensor([root(i) for i in range(m)], device=x.device)
    return torch.unique(roots, return_inverse=True)[1]  # roots are each component's smallest member


class Part(NamedTuple):
    """A set of units that share one budget: the static units of a temporal window (``kind == "static"``, one unit
    per static position, ``members`` ``[u, L]`` its tokens in the window's ``L`` frames) or the remaining tokens of
    one frame (``kind == "dynamic"``, ``members`` ``[u, 1]``). ``frame`` is the (first) frame's index."""

    kind: str
    frame: int
    members: torch.Tensor


def temporal_parts(frames: Sequence[Frame], windows: Sequence[tuple[int, int]], static: Sequence[torch.Tensor | None],
                   staticness: Sequence[torch.Tensor | None], k_frames: int) -> list[Part]:
    """Split an item into static and dynamic parts.

    ``windows`` are frame ranges ``[start, end)``; ``static[j]`` is a bool mask ``[h * w]`` of the positions that are
    static across window ``j`` (``None``: none are) and ``staticness[j]`` ``[h * w]`` how static each is (higher =
    more). When merging every static position would leave fewer than ``k_frames`` units, the least static positions
    are released (their tokens stay per frame) until at least ``k_frames`` units remain, so any budget is met."""
    device = None
    masks = [None if m is None else m.clone() for m in static]
    units = sum(h * w for _, h, w in frames)
    units -= sum(int(m.sum()) * (end - start - 1) for m, (start, end) in zip(masks, windows) if m is not None)
    if units < k_frames:
        candidates = []
        for j, m in enumerate(masks):
            if m is not None:
                for pos in torch.nonzero(m).flatten().tolist():
                    candidates.append((float(staticness[j][pos]), j, pos))
        candidates.sort(key=lambda c: c[0])  # stable: ties release the earlier window / position first
        for _, j, pos in candidates:
            if units >= k_frames:
                break
            masks[j][pos] = False
            units += windows[j][1] - windows[j][0] - 1
    parts = []
    for (start, end), m in zip(windows, masks):
        s0, h, w = frames[start]
        device = m.device if m is not None else None
        if m is not None and bool(m.any()):
            offsets = torch.tensor([frames[t][0] for t in range(start, end)], device=device)
            parts.append(Part("static", start, torch.nonzero(m).flatten()[:, None] + offsets[None, :]))
        for t in range(start, end):
            pos = frame_positions(frames[t], device)
            if m is not None:
                pos = pos[~m]
            if pos.numel():
                parts.append(Part("dynamic", t, pos[:, None]))
    return parts


def label_parts(n: int, parts: Sequence[Part], k_frames: int,
                reduce_part: Callable[[Part, int], torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """Share ``k_frames`` over the parts in proportion to their units (:func:`ops.split_budget`) and let
    ``reduce_part(part, q)`` label the part's units with ``q`` groups (``[u]`` in ``[0, q)``, ``-1``: dropped; every
    group non-empty). Returns the token labels ``[n]`` (``-1``: dropped)."""
    budgets = ops.split_budget([p.members.shape[0] for p in parts], k_frames)
    labels = torch.full((n,), -1, dtype=torch.long, device=device)
    base = 0
    for part, q in zip(parts, budgets):
        if q == 0:
            continue
        unit_labels = reduce_part(part, q).to(device)
        token_labels = torch.where(unit_labels >= 0, unit_labels + base, -1)
        labels[part.members.to(device)] = token_labels[:, None].expand_as(part.members)
        base += q
    return labels


def compress_by_attention(tokens: torch.Tensor, k: int, layout: ops.Layout, signals: dict[str, torch.Tensor],
                          labels: Callable[[torch.Tensor, torch.Tensor, list[Frame], int], torch.Tensor]
                          ) -> CompressOutput:
    """:func:`compress_items` for methods whose per-item labeller ``labels(x [N, D], attention [N], frames,
    k_frames)`` reads each token's ``cls_attention`` (FastVID, FlashVID, HoliTom)."""
    attention = signals["cls_attention"].float()
    return compress_items(tokens, k, layout,
                          lambda i, frames, kf: labels(tokens[i].float(), attention[i], frames, kf))


def compress_items(tokens: torch.Tensor, k: int, layout: ops.Layout,
                   label_fn: Callable[[int, list[Frame], int], torch.Tensor]) -> CompressOutput:
    """Run a video method on every item of the batch and build the output.

    ``label_fn(i, frames, k_frames)`` returns a long tensor ``[N]`` of group labels for sample ``i``'s frame tokens
    (any non-negative ids; ``-1``: dropped; marker positions are ignored) with exactly ``k_frames`` distinct
    groups. Markers are kept as their own groups when ``k > len(markers)``."""
    b, n, _ = tokens.shape
    frames, markers = frames_and_markers(layout)
    keep_markers = k > len(markers)
    k_frames = k - len(markers) if keep_markers else k
    is_marker = torch.zeros(n, dtype=torch.bool, device=tokens.device)
    is_marker[markers] = True
    assigns = []
    for i in range(b):
        labels = label_fn(i, frames, k_frames).to(tokens.device).clone()
        labels[is_marker] = -1
        valid = labels >= 0
        ids, inverse = torch.unique(labels[valid], return_inverse=True)
        if ids.shape[0] != k_frames:
            raise RuntimeError(f"video method produced {ids.shape[0]} groups, expected {k_frames}")  # a method bug
        assign = torch.full((n,), -1, dtype=torch.long, device=tokens.device)
        assign[valid] = inverse
        if keep_markers and markers:
            assign[markers] = torch.arange(k_frames, k, device=tokens.device)
        assigns.append(assign)
    return ops.merge(tokens, torch.stack(assigns), k)


def check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def check_float(name: str, value: object, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value == value
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be a float in {lo}{low:g}, {high:g}{hi}, got {value!r}")
