"""PixelPrune: before the ViT, drop the merge units a 2-D predictor reproduces from their causal neighbours' pixels."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import Compressor, MethodInfo
from ..encoder_stage import InEncoder
from ..output import CompressOutput

REFERENCE = "PixelPrune: Pixel-Level Adaptive Visual Token Reduction via Predictive Coding, arXiv:2604.00886"


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The largest absolute pixel difference of two stacks of units ``[..., P]`` -> ``[...]``."""
    return (a - b).abs().amax(dim=-1)


def prediction_error(pixels: torch.Tensor, layout: ops.Layout, tau: float = 0.0) -> torch.Tensor:
    """``[B, N]`` float32: how far PixelPrune's 2-D predictor misses each unit of ``pixels`` ``[B, N, ...]`` (the
    largest absolute pixel error; every axis after ``N`` is the unit's pixels), grid by grid of ``layout``.

    In each row-major ``(h, w)`` grid, unit ``X`` at ``(r, c)`` is predicted from its causal neighbours ``A``
    (left), ``B`` (above) and ``C`` (above-left), whole units at a time: ``B`` when ``C`` matches ``A`` but not ``B``
    (within ``tau``: the edge runs between the rows, so the unit continues what is above it), ``A`` otherwise (the
    authors' LOCO-I variant, ``pred_2d``); the first row predicts from the left, the first column from above, and
    the grid's first unit has no prediction (error ``inf``: the anchor, always kept first). An error ``<= tau``
    means the paper would prune the unit (``0``: a pixel-exact duplicate of its prediction).
    """
    b, n = pixels.shape[:2]
    flat = pixels.reshape(b, n, -1).float()
    err = torch.empty(b, n, dtype=torch.float32, device=pixels.device)
    start = 0
    for h, w in layout:
        g = flat[:, start: start + h * w].reshape(b, h, w, -1)
        e = torch.empty(b, h, w, dtype=torch.float32, device=pixels.device)
        e[:, 0, 0] = math.inf
        if w > 1:
            e[:, 0, 1:] = _max_abs(g[:, 0, 1:], g[:, 0, :-1])
        if h > 1:
            e[:, 1:, 0] = _max_abs(g[:, 1:, 0], g[:, :-1, 0])
        if h > 1 and w > 1:
            left, above, diagonal = g[:, 1:, :-1], g[:, :-1, 1:], g[:, :-1, :-1]
            use_above = (_max_abs(diagonal, left) <= tau) & (_max_abs(diagonal, above) > tau)
            e[:, 1:, 1:] = _max_abs(g[:, 1:, 1:], torch.where(use_above.unsqueeze(-1), above, left))
        err[:, start: start + h * w] = e.flatten(1)
        start += h * w
    return err


@dataclass
class PixelPredict(Compressor):
    """The step :class:`PixelPrune` runs before the first encoder layer (not registered on its own): keep the ``k``
    units with the largest :func:`prediction_error` (ties: the earlier unit), in input order. See
    :class:`PixelPrune` for the paper."""

    info: ClassVar[MethodInfo] = MethodInfo(name="pixel_predict", family="similarity", modalities=("image",),
                                            stage="pre_llm", query_aware=False, reference=REFERENCE)
    requires: ClassVar[tuple[str, ...]] = ("unit_pixels",)
    tau: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        t = self.tau
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"tau must be a float >= 0 (the largest absolute pixel error a prediction may make, in "
                             f"the model's pixel_values units; 0: lossless), got {t!r}")

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        error = prediction_error(signals["unit_pixels"], layout, float(self.tau))
        return ops.select(tokens, ops.stable_topk(error, k))


class PixelPrune(InEncoder):
    """PixelPrune ("PixelPrune: Pixel-Level Adaptive Visual Token Reduction via Predictive Coding", Wang et al.,
    arXiv:2604.00886): drop redundant patch groups in pixel space, before the ViT runs.

    Each merge unit (a 2x2 group of patches: one LLM token on Qwen-VL) is predicted from its left, upper and upper-left
    neighbours' pixels with a LOCO-I-style edge test (:func:`prediction_error`); a unit the prediction reproduces
    within ``tau`` (largest absolute pixel error; ``tau = 0``: lossless) is redundant. Here it is
    ``tz.InEncoder(PixelPredict(...), layer=0)``: the cut is before the first vision block, right after the patch
    embedding, where the adapter hands the method each unit's input pixels (signal ``unit_pixels``), so every block
    of the ViT and the LLM run on the kept units only, each at its original rotary and M-RoPE positions. Supported
    where an adapter can cut at 0 (Qwen2-VL and Qwen2.5-VL).

        with tz.PixelPrune(retain=0.5)(model):
            out = model.generate(**inputs)

    Departures:

    - **A budget instead of a threshold.** The paper keeps every unit whose error exceeds ``tau``, a count that
      depends on the image. tokenzip methods return exactly the budget ``k``, so the units are ranked by their
      prediction error and the ``k`` largest are kept: the grid's anchor first, then the worst-predicted units;
      pixel-exact duplicates of their prediction (error 0) go first, later ones before earlier ones. Whenever ``k``
      is at least the number of units the paper keeps at ``tau``, every one of those is kept. The paper's
      threshold mode is NOT offered: the budget machinery fixes ``k`` from ``N`` alone (``Budget.count``) before the
      method sees the pixels, so a data-dependent count cannot be expressed honestly. :func:`prediction_error`
      gives the count the paper would keep (``(error > tau).sum()``) for choosing ``tokens`` per image.
    - **Errors from the original neighbours.** For ``tau > 0`` the authors' default compares each unit with
      neighbours already replaced by their reconstruction (an "anchored", sequential pass); here every error is
      computed from the original neighbours (the authors' vectorised "sliding" mode, identical to the anchored one
      at ``tau = 0``), since a ranking needs an error for every unit, not only a keep/drop decision. ``tau`` only
      decides the edge test.
    - **Pixel units.** The authors un-normalise the first temporal frame of each patch to ``[0, 1]`` (Qwen3-VL's
      mean/std of 0.5); here the pixels are ``pixel_values`` as the model receives them (the processor's
      normalisation, which the model does not record: for Qwen2-VL's CLIP statistics one unit is about 0.27 of the
      ``[0, 1]`` range, a little different per channel), over every temporal frame of the patch (identical frames
      for an image). So ``tau`` is in those units, and channels weigh by ``1 / std``.
    - Models: the paper evaluates Qwen3-VL (and Qwen3.5); tokenzip's Qwen3-VL adapter has no encoder stage, so
      PixelPrune runs on Qwen2-VL/2.5-VL here. Qwen2.5-VL's windowed blocks attend within the kept units of each
      window. Images only (the paper's setting); clips in the same call reach the LLM whole.
    """

    info: ClassVar[MethodInfo] = MethodInfo(name="pixelprune", family="similarity", modalities=("image",),
                                            stage="encoder", query_aware=False, reference=REFERENCE)

    def __init__(self, retain: float | None = None, tokens: int | None = None, tau: float = 0.0):
        super().__init__(PixelPredict(retain=retain, tokens=tokens, tau=tau), layer=0)
        self.tau = self.method.tau

    def __repr__(self) -> str:
        return f"PixelPrune({self.budget}, tau={self.tau!r})"
