"""Input-level resolution reduction: each image is given to the model at a smaller size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..base import InputCompressor, MethodInfo


@dataclass
class Resize(InputCompressor):
    """Fewer tokens before the encoder: every image is resized so that the LLM gets about its budget of tokens.

    Native-resolution models tie the token count to the input size: Qwen2-VL's "Naive Dynamic Resolution" gives an
    ``H x W`` image ``(H/28) * (W/28)`` tokens, and its processor's ``min_pixels``/``max_pixels`` bound that count
    by resizing the image with its aspect ratio kept ("Qwen2-VL: Enhancing Vision-Language Model's Perception of the
    World at Any Resolution", arXiv:2409.12191). VisionThink ("VisionThink: Smart and Efficient Vision Language Model
    via Reinforcement Learning", arXiv:2507.13348) observes that most general VQA still works at 1/4 of the
    resolution and reduces visual tokens by giving the model a downsampled image. This method does that reduction
    training-free, to a budget: for an image of ``N`` tokens the LLM gets the largest count at or under
    ``budget.count(N)`` that a grid of the model's units with the image's aspect ratio allows (exactly the budget
    whenever such a factorisation exists; the rule and the resampling are in tokenzip/adapters/resample.py).

    Departures: the processor's ``max_pixels`` is a pixel cap shared by all images, here each image gets its own
    token budget (``retain`` of its own count, or ``tokens``); the image is resampled from the call's processed
    pixels (a second resize, with the processor's bicubic filter), not re-read from the original file; VisionThink's
    learned decision to request the full resolution again is not part of it (that needs its RL-trained model).
    Supported where the adapter can resize inputs (``input_reductions`` holds ``"resolution"``: Qwen2-VL and
    Qwen2.5-VL). ``last_stats``: ``source``/``index`` are the geometric correspondence between the original and the
    resized token grids, not kept tokens.
    """

    info: ClassVar[MethodInfo] = MethodInfo(
        name="resize", family="input", modalities=("image",), stage="input", query_aware=False,
        reference="Qwen2-VL min/max_pixels, arXiv:2409.12191; VisionThink (downsampled input), arXiv:2507.13348")
    reduces: ClassVar[str] = "resolution"
