"""DyCoke's temporal token merging (TTM): in groups of four frames, drop the tokens a reference frame repeats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput
from .evs import anchors_only, frame_references


@dataclass
class DyCoke(Compressor):
    """DyCoke's pre-LLM stage, temporal token merging ("DyCoke: Dynamic Compression of Tokens for Fast Video Large
    Language Models", Tao et al., arXiv:2411.15024).

    Frames are taken in consecutive groups of four ``(f1, f2, f3, f4)``. The first frame of a group is kept whole;
    ``f2`` is compared with ``f1`` and ``f4`` with ``f3`` (adjacent pairs), and ``f3`` with ``f1`` (the group's
    first): each compared frame keeps the tokens *least* similar (cosine) to the token at the same position of its
    reference frame, and drops the rest, which the reference already shows. Similarities are taken between the
    frames' full token sets, before any pruning. Though the paper calls the stage merging, it drops: a dropped
    token's content is left to its counterpart in the reference frame. ``window`` (default 4, the paper's) sets the
    group length; in longer groups odd offsets compare with the frame before them, even ones with the first.

    Budget: the paper prunes a fixed share ``p`` of every compared frame. Here the first frames of the groups are
    kept whole and the rest of ``k`` is shared by the compared frames in proportion to their size
    (:func:`tokenzip.ops.split_budget`; for equal frames an equal count, ``p = 1 - (k - A) / (C * S)`` with ``A``
    the first frames' tokens, ``C`` compared frames of ``S`` tokens). Below ``A`` (beyond the paper's range) only
    the groups' first frames are kept, at evenly spaced positions. A last group of fewer than four frames is
    handled by the same rule (its ``f2``/``f3``/``f4`` as far as present); a frame whose grid differs from the
    previous frame's starts a new group. LLaVA-OneVision's trailing newline token is kept while ``k`` leaves a
    token for the frames. Uses no signals; ties go to the earlier token.

    Departures of the authors' code (``dycole_ttm`` in ``llava/model/llava_arch.py``) from the paper, not
    reproduced: it ranks each pair's second frame with the similarities of the previous pair (off by one; the first
    pair uses the last pair's), leaves the third frame of the last group of four unpruned against the first, and
    returns a frame's kept tokens in score order instead of their spatial order. The decode-time KV-cache pruning
    (the paper's second stage) is not part of this pre-LLM method.
    """

    window: int = 4
    info: ClassVar[MethodInfo] = MethodInfo(
        name="dycoke", family="similarity", modalities=("video",), stage="pre_llm", query_aware=False,
        reference="DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models, arXiv:2411.15024 "
                  "(temporal token merging)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2:
            raise ValueError(f"window must be an int >= 2 (frames per group; the paper uses 4), got {self.window!r}")

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        markers, kv = ops.reserve_markers(layout, k)
        frames = ops.visual_frames(layout)
        refs = frame_references(frames, self.window)
        anchors = [i for i, r in enumerate(refs) if r is None]
        anchor_pos = [frames[a][0] + p for a in anchors for p in range(frames[a][1] * frames[a][2])]
        b, dev = tokens.shape[0], tokens.device
        if kv <= len(anchor_pos):
            keep = markers + (anchor_pos if kv == len(anchor_pos) else anchors_only(frames, anchors, kv))
            return ops.select(tokens, torch.tensor(keep, dtype=torch.long, device=dev).expand(b, -1))
        compared = [i for i, r in enumerate(refs) if r is not None]
        alloc = ops.split_budget([frames[i][1] * frames[i][2] for i in compared], kv - len(anchor_pos))
        kept = [torch.tensor(markers + anchor_pos, dtype=torch.long, device=dev).expand(b, -1)]
        for i, kk in zip(compared, alloc):
            if kk == 0:
                continue
            start, h, w = frames[i]
            sim = ops.same_position_similarity(tokens, start, frames[refs[i]][0], h * w)
            kept.append(start + ops.stable_topk(-sim, kk))  # least similar first; ties: the earlier position
        return ops.select(tokens, torch.cat(kept, dim=1))
