"""LongVU's cross-modal query: the frames that best match the prompt keep all their tokens, the others are pooled."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput


def frame_relevance(projected: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
                    frames: list[tuple[int, int, int]]) -> torch.Tensor:
    """``[F]`` for one sample: the attention the real text tokens pay to each frame. Every text token attends over
    all the frames' tokens (``softmax(t . v / sqrt(D))``); a frame's score is the mean, over the text tokens and over
    its own tokens, of the attention its tokens receive. Zeros without text."""
    valid = mask.bool()
    if not bool(valid.any()):
        return torch.zeros(len(frames), device=projected.device)
    pos = torch.cat([torch.arange(s, s + h * w, device=projected.device) for s, h, w in frames])
    q = text[valid].float()
    logits = q @ projected[pos].float().T / math.sqrt(q.shape[-1])  # [T', V]
    attn = torch.softmax(logits, dim=-1).mean(dim=0)  # [V]
    sizes = [h * w for _, h, w in frames]
    return torch.stack([part.mean() for part in torch.split(attn, sizes)])


def frame_counts(full: list[int], low: list[int], order: list[int], k: int) -> list[int]:
    """Tokens per frame for a total of ``k`` (``k <= sum(full)``): every frame at its pooled count ``low`` and the
    frames in ``order`` (most relevant first) raised to ``full`` while the budget allows, the next one partly; under
    ``sum(low)``, the pooled counts shrunk in proportion (largest remainder, ties to the more relevant frame)."""
    if k >= sum(low):
        counts = list(low)
        left = k - sum(low)
        for f in order:
            add = min(full[f] - low[f], left)
            counts[f] += add
            left -= add
        return counts
    shares = ops.split_budget([low[f] for f in order], k)  # ties of the remainder go to the earlier (more relevant)
    counts = [0] * len(low)
    for f, c in zip(order, shares):
        counts[f] = c
    return counts


@dataclass
class LongVUQuery(Compressor):
    """LongVU's selective frame feature reduction via cross-modal query: the frames the prompt attends to most keep
    their full token grid, every other frame is reduced by 2x2 spatial pooling, to exactly the budget.

    "LongVU: Spatiotemporal Adaptive Compression for Long Video-Language Understanding" (Shen et al.,
    arXiv:2410.17434), section 3.2: after temporal reduction, the attention between the text query and each frame's
    vision features selects the ``N_h`` frames that keep full resolution; the others are reduced by 2x2 pooling to a
    low-resolution token grid, ``N_h`` being as large as the context length allows. Here, at the pre-LLM stage on a
    video item: a frame's relevance is the attention the prompt's text tokens (``text``, real per ``text_mask``;
    the LLM's input embeddings) pay to its tokens (``projected``: the frame tokens in the same space), each text token
    attending over all frame tokens with scaled dot products, averaged over the text tokens and over the frame's
    tokens; frames are ranked by it (ties: the earlier frame). Every frame is first pooled to ``ceil(h/2) x
    ceil(w/2)`` (averaging ``2 x 2`` cells, adaptive bins for odd sides), then the most relevant frames get their full
    ``h x w`` tokens back while the budget ``k`` allows; the next frame takes the remainder as a pooling of its grid to
    exactly that many cells, so the count is exact. Below the all-pooled count the pooled counts shrink in proportion
    (coarser pooling, ties to the more relevant frames; frames get no token only when ``k`` is under the frame count,
    the least relevant first). Marker tokens (LLaVA-OneVision's newline) are kept while ``k`` leaves room.

    Departures: the paper's frame features for the query are the (DINOv2+SigLIP) features in the LLM's space and the
    text query is the instruction; here the item's own LLM-space tokens and the prompt's embedded text tokens; the
    paper fixes the full/pooled token counts per frame (144 / 64 in LongVU) and fits ``N_h`` to the context, here the
    budget decides (and one frame may be partly pooled). LongVU's other stages: ``frame_dedup_dinov2`` (input stage;
    ``tz.compose(tz.get("frame_dedup_dinov2", ...), tz.get("longvu_query", ...))`` runs both), its spatial token
    compression is not implemented.
    """

    info: ClassVar[MethodInfo] = MethodInfo(
        name="longvu_query", family="query", modalities=("video",), stage="pre_llm", query_aware=True,
        reference="LongVU: Spatiotemporal Adaptive Compression for Long Video-Language Understanding, "
                  "arXiv:2410.17434 (selective frame feature reduction via cross-modal query)")
    requires: ClassVar[tuple[str, ...]] = ("projected", "text")
    optional: ClassVar[tuple[str, ...]] = ("text_mask",)

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        b, n, _ = tokens.shape
        proj, text = signals["projected"], signals["text"]
        if text.dim() != 3 or text.shape[0] != b or text.shape[-1] != proj.shape[-1]:
            raise ValueError(f"text must be [{b}, T, {proj.shape[-1]}] like projected, got {tuple(text.shape)}")
        mask = signals.get("text_mask")
        if mask is None:
            mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        elif tuple(mask.shape) != tuple(text.shape[:2]):
            raise ValueError(f"text_mask must be {tuple(text.shape[:2])} (one flag per text token), "
                             f"got {tuple(mask.shape)}")
        markers, kv = ops.reserve_markers(layout, k)
        frames = ops.visual_frames(layout)
        full = [h * w for _, h, w in frames]
        low = [math.ceil(h / 2) * math.ceil(w / 2) for _, h, w in frames]
        assigns = []
        for i in range(b):
            rel = frame_relevance(proj[i], text[i], mask[i], frames)
            order = torch.sort(-rel, stable=True).indices.tolist()  # most relevant first; ties: the earlier frame
            counts = frame_counts(full, low, order, kv)
            assign = torch.full((n,), -1, dtype=torch.long)
            slot = 0
            for (start, h, w), c in zip(frames, counts):
                if c == 0:
                    continue
                cells = ops.pool_assignment(ops.as_layout([(h, w)], h * w), c)
                assign[start: start + h * w] = slot + cells
                slot += c
            for m in markers:
                assign[m] = slot
                slot += 1
            assigns.append(assign)
        # groups are numbered frame by frame; merge orders them by their first member (markers included)
        return ops.merge(tokens, torch.stack(assigns).to(tokens.device), k)
