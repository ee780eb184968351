"""VidCom2: per-frame budgets from frame uniqueness, then each frame keeps its most distinctive tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput

# bandwidths of the multi-scale Gaussian similarity (the authors' code: 2^-3 ... 2^1)
BANDWIDTHS = tuple(2.0 ** e for e in range(-3, 2))


def gaussian_similarity(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``[n]`` multi-scale Gaussian-kernel similarity of the rows of ``x`` ``[n, d]`` to ``centre`` ``[d]``."""
    dist = ((x - centre) ** 2).sum(dim=-1)
    return sum(torch.exp(-dist / (2 * a)) for a in BANDWIDTHS)


@dataclass
class VidCom2(Compressor):
    """Video Compression Commander ("Video Compression Commander: Plug-and-Play Inference Acceleration for Video
    Large Language Models", Liu et al., arXiv:2505.14454): frame-wise budgets from frame uniqueness (Frame
    Compression Adjustment), then token selection inside each frame (Adaptive Token Compression).

    Tokens are compared on their ``low_variance_channels`` share of channels with the least variance over the clip,
    L2-normalised. Each token's similarity to the video centre (mean of all tokens) and to its frame's centre is a
    sum of Gaussian kernels over five bandwidths ``2^-3 .. 2^1``. A frame's uniqueness is minus its tokens' mean
    similarity to the video centre; ``sigma = softmax(uniqueness / temperature)`` over frames and frame ``t`` is
    given the retention ``r * (1 + sigma_t - mean(sigma))`` of the clip-wide ratio ``r`` (capped at the whole
    frame), so unusual frames keep more. Inside a frame the tokens with the lowest summed similarity (video centre
    + frame centre) are kept: the ones least like the clip and least like the rest of their frame.

    Budget: the per-frame retentions are turned into counts that sum exactly to the budget by water-filling with
    largest remainders (:func:`tokenzip.ops.split_weighted`; every frame keeps at least one token while ``k``
    allows, as in the authors' code). Departures/choices: the channel selection, the Gaussian bandwidths and the
    temperature ``0.01`` follow the authors' code (``llava/model/vidcom2.py``), which states the scores more
    concretely than the paper's text; the code rounds each frame's count on its own, so its total drifts from the
    budget, ours does not. Ties (channels, tokens) go to the earlier index. LLaVA-OneVision's trailing newline
    token is kept while ``k`` leaves a token for the frames (the authors' code compresses the frames before that
    token is appended, so it keeps it too). Uses no signals.
    """

    temperature: float = 0.01
    low_variance_channels: float = 0.5
    info: ClassVar[MethodInfo] = MethodInfo(
        name="vidcom2", family="similarity", modalities=("video",), stage="pre_llm", query_aware=False,
        reference="VidCom2: Video Compression Commander, Plug-and-Play Inference Acceleration for Video Large "
                  "Language Models, arXiv:2505.14454")

    def __post_init__(self) -> None:
        super().__post_init__()
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"temperature must be a number > 0, got {t!r}")
        c = self.low_variance_channels
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
            raise ValueError(f"low_variance_channels must be a fraction in (0, 1], got {c!r}")

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        markers, kv = ops.reserve_markers(layout, k)
        frames = ops.visual_frames(layout)
        rows = [torch.tensor(markers + self._keep(x, frames, kv), dtype=torch.long, device=tokens.device)
                for x in tokens]
        return ops.select(tokens, torch.stack(rows))

    def _keep(self, x: torch.Tensor, frames: list[tuple[int, int, int]], k: int) -> list[int]:
        """Kept positions for one item's tokens ``x`` ``[N, D]``."""
        pos = torch.cat([torch.arange(s, s + h * w) for s, h, w in frames]).to(x.device)
        feats = x[pos].float()
        width = max(1, int(feats.shape[1] * self.low_variance_channels))
        channels = torch.sort(feats.var(dim=0, unbiased=False), stable=True).indices[:width]
        feats = F.normalize(feats[:, channels], dim=-1)
        video_sim = gaussian_similarity(feats, feats.mean(dim=0))
        sizes = [h * w for _, h, w in frames]
        parts = list(torch.split(feats, sizes))
        to_video = list(torch.split(video_sim, sizes))
        uniqueness = torch.stack([-v.mean() for v in to_video])
        sigma = torch.softmax(uniqueness / self.temperature, dim=0)
        ratio = 1 + sigma - sigma.mean()
        alloc = ops.split_weighted(sizes, [s * float(r) for s, r in zip(sizes, ratio)], k)
        out: list[int] = []
        for (start, _, _), part, v, kk in zip(frames, parts, to_video, alloc):
            if kk:
                score = v + gaussian_similarity(part, part.mean(dim=0))
                out += (start + ops.stable_topk(-score, kk)).tolist()
        return out
