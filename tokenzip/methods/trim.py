"""TRIM: keep the image tokens most similar to the prompt, plus one token aggregating the rest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import Compressor, MethodInfo
from ..output import CompressOutput


def text_relevance(projected: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRIM's score ``[N]`` for one sample: cosine similarity of each image token to each real text token,
    softmax over the image tokens, mean over the text tokens (zeros when there is no text)."""
    valid = mask.bool()
    if not bool(valid.any()):
        return torch.zeros(projected.shape[0], device=projected.device)
    sim = ops.cosine_similarity_matrix(projected.unsqueeze(0), text[valid].unsqueeze(0))[0]  # [N, T']
    return torch.softmax(sim, dim=0).mean(dim=1)


@dataclass
class Trim(Compressor):
    """Keep the ``k - 1`` image tokens most relevant to the prompt text and average all others into one token.

    TRIM, "Less is More: A Simple yet Effective Token Reduction Method for Efficient Multi-modal LLMs" (Song et al.,
    arXiv:2409.10994). The score of an image token is its cosine similarity to each text token, softmaxed over the
    image tokens and averaged over the text tokens. Departures: TRIM compares CLIP text-encoder embeddings with
    CLIP image tokens; we compare the prompt's token embeddings in the LLM input space (``text``, real tokens per
    ``text_mask``) with the image tokens mapped into that space (``projected``), which needs no second text encoder.
    TRIM keeps the IQR outliers of the score (an adaptive count); for an exact budget we keep the top ``k - 1`` and,
    as TRIM does, append one token that is the mean of all unselected tokens (so ``k = 1`` keeps just that mean).
    The mean is taken over the tokens being compressed (for LLaVA-1.5, before the projector). Without any text
    token every score is equal and the earliest tokens are kept. Ties go to the earliest token.
    """

    info: ClassVar[MethodInfo] = MethodInfo(
        name="trim", family="query", modalities=("image",), stage="pre_llm", query_aware=True,
        reference="TRIM: Less is More: A Simple yet Effective Token Reduction Method for Efficient Multi-modal "
                  "LLMs, arXiv:2409.10994")
    requires: ClassVar[tuple[str, ...]] = ("projected", "text", "text_mask")

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        b, n, _ = tokens.shape
        proj, text, mask = signals["projected"], signals["text"], signals["text_mask"]
        if text.dim() != 3 or text.shape[-1] != proj.shape[-1]:
            raise ValueError(f"text must be [B, T, {proj.shape[-1]}] like projected, got {tuple(text.shape)}")
        if tuple(mask.shape) != tuple(text.shape[:2]):
            raise ValueError(f"text_mask must be {tuple(text.shape[:2])} (one flag per text token), "
                             f"got {tuple(mask.shape)}")
        assigns = []
        for i in range(b):
            score = text_relevance(proj[i], text[i], mask[i])
            assign = torch.full((n,), k - 1, dtype=torch.long, device=tokens.device)
            top = ops.stable_topk(score, k - 1)
            assign[top] = torch.arange(k - 1, device=tokens.device)
            assigns.append(assign)
        return ops.merge(tokens, torch.stack(assigns), k)
