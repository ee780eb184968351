"""Frame de-duplication by pixel difference before the vision encoder: drop the frames that repeat the frame kept
before them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ..base import FrameSelector, MethodInfo


def greedy_dedup(t: int, k: int, distance: Callable[[int, int], float]) -> list[int]:
    """Keep ``k`` of ``t`` frames by dropping, one at a time, the kept frame closest (``distance(i, j)``, ``j`` the
    kept frame before ``i``) to its kept predecessor; a drop makes the next kept frame compare with the dropped
    frame's predecessor. Frame 0 has no predecessor and is never dropped. Ties: the later frame goes first (of
    identical frames the earliest stays)."""
    prev = list(range(-1, t - 1))
    nxt = list(range(1, t + 1))
    alive = [True] * t
    dist = [float("inf")] + [distance(i, i - 1) for i in range(1, t)]
    for _ in range(t - k):
        i = min((j for j in range(1, t) if alive[j]), key=lambda j: (dist[j], -j))
        alive[i] = False
        p, n = prev[i], nxt[i]
        nxt[p] = n
        if n < t:
            prev[n] = p
            dist[n] = distance(n, p)
    return [i for i in range(t) if alive[i]]


@dataclass
class FrameDedupPixel(FrameSelector):
    """Keep ``k`` frames of each clip by removing, before the vision encoder, the frames that differ least in pixels
    from the frame kept before them: near-duplicate frames go, frames where something changes stay.

    VideoLLaMA 3 ("VideoLLaMA 3: Frontier Multimodal Foundation Models for Image and Video Understanding",
    arXiv:2501.13106) reduces video tokens with a Differential Frame Pruner: a patch whose pixels differ little (L1
    distance) from the same patch of the previous frame is pruned before the LLM, as it repeats content the model
    already has. This method makes the same pixel-difference test at frame level, to an exact budget: the distance
    of a frame to its predecessor is the mean absolute difference of their RGB values (``[0, 1]``, at the size the
    model encodes them), and the frame with the smallest distance to its KEPT predecessor is dropped, repeatedly,
    until ``k`` frames remain (``k`` from the budget: ``tokenzip.base.FrameSelector``); after a drop the next frame
    is compared with the dropped frame's predecessor, so a slow drift accumulates until the frame that completes it
    is kept. The first frame is always kept; ties drop the later frame; deterministic.

    Departures: the paper prunes patches (inside frames) with a fixed threshold after the encoder's patchify; here
    whole frames are dropped before the encoder (so the encoder runs on fewer frames) and the threshold is replaced
    by the budget (greedy removal of the most redundant frame), which keeps the prompt layout of whole frames.
    """

    info: ClassVar[MethodInfo] = MethodInfo(
        name="frame_dedup_pixel", family="similarity", modalities=("video",), stage="input", query_aware=False,
        reference="pixel-difference redundancy as in VideoLLaMA 3's Differential Frame Pruner, arXiv:2501.13106 "
                  "(at frame level, to a budget)")

    def _select(self, frames: torch.Tensor, k: int) -> torch.Tensor:
        def distance(i: int, j: int) -> float:  # summed in float64: the order of frames must not change a tie
            return float((frames[i] - frames[j]).abs().double().mean())

        keep = greedy_dedup(int(frames.shape[0]), k, distance)
        return torch.tensor(keep, dtype=torch.long, device=frames.device)
