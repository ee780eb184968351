"""FastV over audio and video together: one pool per sample, ranked by the attention the text pays inside the LLM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import MethodInfo
from .fastv import FastV


@dataclass
class FastVAudioVideo(FastV):
    """Query-guided pruning inside the LLM that ranks a sample's audio and video tokens in ONE pool (stage ``"llm"``).

    The rule is FastV's ("An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
    Vision-Language Models", Chen et al., arXiv:2403.06764): layers ``< layer`` (default 2, the paper's K) run on the
    full sequence; before decoder layer ``layer`` the media tokens are ranked by the attention they receive in layer
    ``layer - 1`` (recomputed rows, the model keeps SDPA) and the rest of the LLM runs on the kept ones. What is new
    here is the pool, following OmniDrop ("OmniDrop: Layer-wise Token Pruning for Omni-modal LLMs via
    Query-Guidance", Park et al., arXiv:2605.14458): the text query decides between the modalities, so the audio and
    video tokens of one sample (e.g. Qwen2.5-Omni's interleaved video and soundtrack) compete for one total budget
    instead of each item keeping a fixed share.

    Score: ``score="text"`` (default here) the mean, over the text tokens after the item and over heads, of the
    attention each token receives (FastV's last-token row when no text follows the item); ``score="last"`` the last
    token's row. With the question after the media (the usual prompt) every item is scored by the same rows, so the
    scores are comparable across items.

    Budget: ``retain``/``tokens`` is taken per item as usual and the counts are summed into the sample's total
    ``K = sum_i budget(N_i)``; the ``K`` best tokens of the pool are kept, however they fall between the items
    (:meth:`sample_final_count` is the documented total; one item may keep all its tokens and another none). Ties
    go to the earlier token of the sequence-ordered pool; kept tokens keep their original positions.

    Departures from OmniDrop: one pruning stage (FastV's), not its layer-wise progressive schedule, and no temporal
    diversity score (the ranking is the attention alone).
    """

    score: str = "text"
    # the LLM stage hands a joint method all items of a sample at once (tokenzip/llm/hooks.py)
    joint: ClassVar[bool] = True

    info: ClassVar[MethodInfo] = MethodInfo(
        name="fastv_av", family="query", modalities=("audio", "video"), stage="llm", query_aware=True,
        reference="FastV, Chen et al., arXiv:2403.06764, ranking audio and video in one pool as OmniDrop, Park et "
                  "al., arXiv:2605.14458")

    def sample_final_count(self, ns: list[int], num_layers: int) -> int:
        """Media tokens a sample whose items have ``ns`` tokens keeps in all after the stage."""
        return sum(self.final_count(n, num_layers) for n in ns)

    def select_sample(self, scores: list[torch.Tensor], total: int) -> list[torch.Tensor]:
        """The kept positions of each item (ascending) when the ``total`` best of all items' ``scores`` (each
        ``[m_i]``, in sequence order) are kept together."""
        sizes = [int(s.numel()) for s in scores]
        if not 0 <= total <= sum(sizes):
            raise ValueError(f"total must be in [0, {sum(sizes)}], got {total}")
        pool = torch.cat([s.float().flatten() for s in scores]).unsqueeze(0)
        best = torch.sort(ops.stable_topk(pool, total)[0]).values
        out, start = [], 0
        for size in sizes:
            mine = best[(best >= start) & (best < start + size)]
            out.append(mine - start)
            start += size
        return out
