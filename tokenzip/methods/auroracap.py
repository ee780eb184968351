"""AuroraCap: ToMe in every block of the vision encoder, a constant number of tokens per block, down to the budget."""

from __future__ import annotations

from typing import ClassVar

from ..base import MethodInfo
from ..encoder_stage import InEncoder
from .tome import ToMe


class AuroraCap(InEncoder):
    """Token merging inside every encoder block, as AuroraCap does ("AuroraCap: Efficient, Performant Video Detailed
    Captioning and a New Benchmark", Chai et al., arXiv:2410.03051).

    AuroraCap applies ToMe ("Token Merging: Your ViT But Faster", arXiv:2210.09461) in each layer of its ViT: bipartite
    soft matching on the attention keys, the same number ``r`` of tokens merged in every layer (ToMe's constant
    schedule), size-weighted averages and proportional attention (``log`` size added to the attention logits) in the
    layers after a merge. Its budget is the "visual token kept ratio" (0.1 in the paper's main setting) of the tokens
    that reach the LLM; here that is ``retain`` (or ``tokens``), counted as usual on the tokens the LLM would see.

    Here it is ``tz.InEncoder(tz.ToMe(...), layer="every", schedule="constant_r")``: a cut after every encoder layer
    that leaves one after it, each removing ``(N - k) / cuts`` tokens (the first cuts one more when that does not
    divide), so the encoder's output has exactly the budget. ``layer`` and ``schedule`` can be overridden like
    :class:`tokenzip.InEncoder`'s. Departures: the authors compute ``r = int(N * (1 - ratio) / layers)`` and merge
    inside each block (after its attention, before its MLP), in all of the ViT's layers, so the count that reaches
    the LLM is only approximately the ratio; here the merges go between blocks (the next block's attention sees the
    merged tokens), in the layers the adapter runs up to the feature layer the LLM reads, and the budget is met
    exactly. The merge per cut is tokenzip's ToMe (rounds of matching if a cut must remove more than half). Audio
    (Whisper's encoder) is an extension the paper does not cover.
    """

    info: ClassVar[MethodInfo] = MethodInfo(
        name="auroracap", family="similarity", modalities=("image", "audio"), stage="encoder", query_aware=False,
        reference="AuroraCap: Efficient, Performant Video Detailed Captioning and a New Benchmark, arXiv:2410.03051")

    def __init__(self, retain: float | None = None, tokens: int | None = None, layer: int | str | tuple = "every",
                 schedule: str = "constant_r"):
        super().__init__(ToMe(retain=retain, tokens=tokens), layer=layer, schedule=schedule)

    def __repr__(self) -> str:
        return f"AuroraCap({self.budget}, layer={self.layer!r}, schedule={self.schedule!r})"
