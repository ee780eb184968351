"""Input-level crop reduction for AnyRes models: the base view only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..base import InputCompressor, MethodInfo


@dataclass
class Crops(InputCompressor):
    """Fewer tokens before the encoder on AnyRes models: when an image's budget is under its tiled count, the crops
    are not encoded at all and the LLM gets the image's base view only.

    LLaVA-OneVision ("LLaVA-OneVision: Easy Visual Task Transfer", arXiv:2408.03326) encodes an image as a base view
    (the whole image at the tower's input size) plus a grid of high-resolution crops (AnyRes, from LLaVA-NeXT), and
    its token strategy already feeds images of multi-image and video samples as the base view alone (one newline
    marker after it), trading resolution for count; the paper's AnyRes-Max also caps the crop grid. This method
    makes that choice per image from a budget: an image of ``N`` tokens keeps its tiling when ``budget.count(N) >=
    N`` and is otherwise given as its base view (``side*side + 1`` tokens: the base view and one newline marker, as
    the model gives untiled images). That is the nearest achievable count at or under the budget, or, when the
    budget is below even the base view, the base view (the fewest tokens the model can be given for an image).

    Departures: the paper decides tiling per sample type (single image vs. multi-image/video), here per image and
    budget; intermediate counts (a coarser pinpoint grid with fewer crops) are not offered, so a budget between the
    base view and the tiled count gets the base view. Supported where the adapter lists ``"crops"`` in
    ``input_reductions``: LLaVA-OneVision, where the base view's features go to the LLM through the model's
    precomputed-features path (tokenzip/adapters/resample.py), and InternVL, whose base view is the thumbnail the
    processor appends after an image's tiles (256 tokens, no marker; the call keeps the thumbnail's pixels,
    tokenzip/adapters/internvl.py). ``last_stats``: the base-view tokens keep their own slots, the newline marker (if
    any) maps to the crop grid's first row marker, crop tokens are dropped.
    """

    info: ClassVar[MethodInfo] = MethodInfo(
        name="crops", family="input", modalities=("image",), stage="input", query_aware=False,
        reference="LLaVA-OneVision AnyRes (base view for multi-image), arXiv:2408.03326")
    reduces: ClassVar[str] = "crops"
