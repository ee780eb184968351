"""EVS: drop the tokens that did not change since the previous frame."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput


def frame_references(frames: list[tuple[int, int, int]], window: int | None = None) -> list[int | None]:
    """For each frame, the index of the frame it is compared with, or ``None`` for a frame kept as a temporal
    anchor. ``window=None``: the previous frame (EVS). Groups of ``window`` frames (DyCoke, ``window=4``): the first
    is the anchor, odd offsets compare with the frame just before them (adjacent pairs), even offsets with the
    group's first frame. A frame whose grid differs from the previous frame's starts anew as an anchor."""
    refs: list[int | None] = []
    group_start = 0
    for i, (_, h, w) in enumerate(frames):
        new_grid = i == 0 or frames[i - 1][1:] != (h, w)
        if new_grid or (window is not None and i - group_start >= window):
            group_start = i
            refs.append(None)
        elif window is None or (i - group_start) % 2 == 1:
            refs.append(i - 1)
        else:
            refs.append(group_start)
    return refs


def anchors_only(frames: list[tuple[int, int, int]], anchors: list[int], k: int) -> list[int]:
    """Positions kept when ``k`` is below the anchor frames' tokens: the anchors share ``k`` in proportion to their
    size and each keeps evenly spaced positions (the papers never prune an anchor; this is the degenerate case)."""
    alloc = ops.split_budget([frames[a][1] * frames[a][2] for a in anchors], k)
    out = []
    for a, kk in zip(anchors, alloc):
        start, h, w = frames[a]
        out += [start + p for p in ops.evenly_spaced(h * w, kk)] if kk else []
    return out


@dataclass
class EVS(Compressor):
    """Efficient Video Sampling ("Efficient Video Sampling: Pruning Temporally Redundant Tokens for Faster VLM
    Inference", Bagrov et al., arXiv:2510.14624): drop the tokens that stayed static since the previous frame.

    Every token of frame ``t >= 1`` scores its dissimilarity to the token at the same position of frame ``t - 1``,
    ``1 - cos``; all tokens of the first frame are kept (the paper's temporal anchor) and the rest of the budget
    goes to the most dissimilar tokens of the whole clip (one global ranking, ties to the earlier token). The kept
    tokens stay at their own positions. Departures: the paper measures change on raw RGB patches (L1 distance) and
    keeps patches above a percentile threshold ``q``; a pre-LLM method sees only tokens, so we use the cosine
    dissimilarity of the tokens, as the authors' vLLM implementation does on the video embeddings, and the budget
    ``k`` replaces ``q`` (the threshold is the ``k - S``-th largest dissimilarity, ``S`` the first frame's tokens).
    When ``k < S`` (the paper never goes below one frame) only the first frame is kept, at ``k`` evenly spaced
    positions. A frame whose grid differs from the previous frame's (another view of an image) is an anchor too.
    LLaVA-OneVision's trailing newline token is kept while ``k`` leaves a token for the frames. Uses no signals. On
    short clips an event that appears and stays still can lose its later frames (only its onset differs).
    """

    info: ClassVar[MethodInfo] = MethodInfo(
        name="evs", family="similarity", modalities=("video",), stage="pre_llm", query_aware=False,
        reference="EVS: Efficient Video Sampling, Pruning Temporally Redundant Tokens for Faster VLM Inference, "
                  "arXiv:2510.14624")

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        markers, kv = ops.reserve_markers(layout, k)
        frames = ops.visual_frames(layout)
        refs = frame_references(frames)
        anchors = [i for i, r in enumerate(refs) if r is None]
        anchor_pos = [frames[a][0] + p for a in anchors for p in range(frames[a][1] * frames[a][2])]
        b = tokens.shape[0]
        if kv < len(anchor_pos):
            keep = torch.tensor(markers + anchors_only(frames, anchors, kv), device=tokens.device)
            return ops.select(tokens, keep.expand(b, -1))
        positions, scores = [], []
        for i, ref in enumerate(refs):
            start, h, w = frames[i]
            if ref is None:
                continue
            positions.append(torch.arange(start, start + h * w, device=tokens.device))
            scores.append(1 - ops.same_position_similarity(tokens, start, frames[ref][0], h * w))
        fixed = torch.tensor(markers + anchor_pos, dtype=torch.long, device=tokens.device).expand(b, -1)
        if kv == len(anchor_pos):
            return ops.select(tokens, fixed)
        pos = torch.cat(positions)
        best = ops.stable_topk(torch.cat(scores, dim=1), kv - len(anchor_pos))
        return ops.select(tokens, torch.cat([fixed, pos[best]], dim=1))
