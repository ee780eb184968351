"""``tz.InEncoder(method, layer=L)``: run a pre-LLM method inside the encoder, between layers ``L - 1`` and ``L``
(or after each layer of a schedule, ``layer=(l1, l2, ...)``)."""

from __future__ import annotations

from typing import Any

import torch

from . import ops
from .base import Compressor, MethodInfo
from .encoder import CompressStep
from .output import CompressOutput


class InEncoder(Compressor):
    """Compress inside the encoder instead of at its output (stage ``"encoder"``).

    The wrapped method sees the hidden states that leave encoder layer ``layer - 1`` (signals such as
    ``cls_attention``/``keys`` come from that layer's attention, ``speech`` is per frame as before) and keeps its own
    budget of them; layers ``layer`` ... last then run on the kept/merged tokens only, so the encoder's remaining
    layers are cheaper and can re-contextualise merged tokens. Merged tokens get ToMe's proportional attention
    (``log`` of their size added to the attention logits) in those encoder layers and in the decoder's
    cross-attention. This is where the audio papers put their merging and pruning (A-ToMe between encoder blocks,
    arXiv:2306.16009; Top-K inside the Whisper encoder, arXiv:2511.14293).

        with tz.InEncoder(tz.AToMe(retain=0.25), layer=2)(whisper):
            ids = whisper.generate(input_features=feats)

    Schedule form: ``layer=(l1, l2, ..., lm)`` (increasing) compresses after each of those layer counts, a little at
    every cut, as ToMe and AuroraCap merge a few tokens in every block. The counts shrink with a constant keep ratio
    from the ``N`` input frames to the method's budget for ``N``, which is met exactly at the last cut
    (:func:`tokenzip.encoder.schedule_counts`); each cut's method call sees the tokens and signals of that point.
    Tokens carry their size (input frames) from cut to cut: a merged group whose members already stand for several
    frames is re-averaged by size (ToMe's ``merge_wavg``), and the layers after a merge use proportional attention.
    ``last_stats`` reports the frames in and the tokens out; its ``source``/``index`` refer to the last cut's input.

        with tz.InEncoder(tz.ToMe(retain=0.25), layer=(1, 2, 3))(whisper): ...

    Supported by adapters that list stage ``"encoder"`` (Whisper); every cut must leave at least one encoder layer
    after it (the adapter checks the range when the patch is created).
    """

    def __init__(self, method: Compressor, layer: int | tuple[int, ...]):
        if not isinstance(method, Compressor) or isinstance(method, InEncoder):
            raise TypeError(f"method must be a configured pre-LLM compressor (e.g. tz.AToMe(retain=0.25)), got "
                            f"{type(method).__name__}")
        if method.info.stage != "pre_llm":
            raise ValueError(f"{method.info.name} works at stage {method.info.stage!r}; only pre-LLM methods can "
                             f"run inside the encoder")
        cuts = tuple(layer) if isinstance(layer, (tuple, list)) else (layer,)
        if not cuts or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in cuts) or \
                list(cuts) != sorted(set(cuts)):
            raise ValueError(f"layer must be an int >= 1 (the number of encoder layers run before the cut) or an "
                             f"increasing sequence of such ints (a schedule), got {layer!r}")
        self.method = method
        self.layer = layer if isinstance(layer, int) else cuts
        self.layers = cuts
        self.step = CompressStep(self._step, method.budget.count)
        self.retain, self.tokens = method.retain, method.tokens
        self.budget = method.budget
        self.last_stats = []
        self.requires = method.requires
        self.optional = method.optional
        i = method.info
        where = "+".join(map(str, cuts))
        self.info = MethodInfo(name=f"{i.name}@encoder{where}", family=i.family, modalities=i.modalities,
                               stage="encoder", query_aware=i.query_aware, reference=i.reference)

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        return self.method._compress(tokens, k, layout, signals)

    def _step(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
              signals: dict[str, torch.Tensor]) -> CompressOutput:
        return self.method.compress(tokens, grid=layout, k=k, **signals)

    def __repr__(self) -> str:
        return f"InEncoder({self.method!r}, layer={self.layer})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, InEncoder) and (self.method, self.layer) == (other.method, other.layer)
