"""Uniform frame sampling before the vision encoder: the standard video baseline, to a token budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..base import FrameSelector, MethodInfo


def uniform_indices(t: int, k: int) -> list[int]:
    """``k`` of ``range(t)`` evenly spaced from the first frame to the last: ``numpy.linspace(0, t - 1, k)``
    truncated to integers (``k = 1``: frame 0), in exact integer arithmetic."""
    if k == 1:
        return [0]
    return [(i * (t - 1)) // (k - 1) for i in range(k)]


@dataclass
class UniformFrames(FrameSelector):
    """Keep ``k`` frames of each clip, evenly spaced in time, before the vision encoder: the frame sampling every
    video LLM is evaluated with, here as a token-budget baseline for the frame-selection methods.

    LLaVA-OneVision ("LLaVA-OneVision: Easy Visual Task Transfer", arXiv:2408.03326) samples a video's frames
    uniformly (``np.linspace(0, total - 1, n, dtype=int)`` in its released inference code) and feeds each frame as
    ``g x g`` pooled tokens. This method applies that sampler to the frames of the call: a clip of ``T`` frames and
    ``N`` tokens keeps ``k`` frames, ``k`` from the budget (``tokenzip.base.FrameSelector``: the budget of ``N``
    taken to the largest frame count whose tokens fit; LLaVA-OneVision: ``k * g * g + 1 <= budget``, at least one
    frame), at ``floor(i * (T - 1) / (k - 1))``, ``i = 0 .. k - 1`` (the first and the last frame included;
    ``k = 1``: the first frame). Content-free and deterministic.

    Departures: the paper samples the decoded video; here the frames are those already in the call (a second,
    sparser sampling of them), and the frame count comes from a token budget instead of a fixed ``n``.
    """

    info: ClassVar[MethodInfo] = MethodInfo(
        name="uniform_frames", family="input", modalities=("video",), stage="input", query_aware=False,
        reference="uniform frame sampling as in LLaVA-OneVision: Easy Visual Task Transfer, arXiv:2408.03326")

    def _select(self, frames: torch.Tensor, k: int) -> torch.Tensor:
        return torch.tensor(uniform_indices(int(frames.shape[0]), k), dtype=torch.long, device=frames.device)
