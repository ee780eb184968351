"""``tz.InEncoder(method, layer=L)``: run a pre-LLM method inside the encoder, between layers ``L - 1`` and ``L``
(or after each layer of a schedule, ``layer=(l1, l2, ...)``)."""

from __future__ import annotations

from typing import Any

import torch

from . import ops
from .base import Compressor, MethodInfo
from .encoder import CompressStep
from .encoder.runner import SCHEDULES, check_layer_form, layer_token_counts, resolve_layers
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
    ``last_stats`` reports the frames in and the tokens out; its ``source``/``index`` refer to the item's original
    tokens where the adapter tracks them through the cuts (``Item.extra['source_in']``: LLaVA's tower, Whisper), else
    to the last cut's input.

        with tz.InEncoder(tz.ToMe(retain=0.25), layer=(1, 2, 3))(whisper): ...

    Layer forms resolved against the encoder's depth when the patch is created (the depth is the number of layers the
    adapter runs, ``adapter.encoder_depth()``: for LLaVA up to the feature layer the LLM reads):

    - ``layer=-j``: cut before the ``j``-th last layer (``-1``: before the last one);
    - ``layer="every"`` (or ``"all"``): a cut after every layer that leaves one after it, ``(1, ..., depth - 1)``:
      ToMe/AuroraCap merging a few tokens in every block;
    - ``layer=("last", k)``: cuts before each of the last ``k`` layers, ``(depth - k, ..., depth - 1)`` (FOLDER
      merges in the last blocks).

    ``last_stats`` and ``layers`` (the resolved cuts) describe the model the patch was last created for.

    ``schedule`` says how a schedule's counts go from the ``N`` input tokens to the budget: ``"ratio"`` (default,
    a constant keep ratio, :func:`tokenzip.encoder.schedule_counts`) or ``"constant_r"`` (ToMe's schedule: the same
    number ``r = (N - k) / cuts`` removed at every cut, the first cuts taking one more when it does not divide,
    :func:`tokenzip.encoder.runner.constant_r_counts`). Both end exactly on the budget at the last cut.

        with tz.InEncoder(tz.ToMe(retain=0.25), layer="every", schedule="constant_r")(whisper): ...

    ``layer=0`` cuts before the first layer, right after the embedding step (Qwen2-VL/2.5-VL only: there the units are
    still the input patches, and the adapter hands the method their pixels, signal ``unit_pixels``; there is no
    attention yet, so ``cls_attention``/``keys`` are not available at that cut). Every layer then runs on the kept
    units only (PixelPrune, :class:`tokenzip.methods.pixelprune.PixelPrune`).

    Supported by adapters that list stage ``"encoder"`` (Whisper, LLaVA-1.5's CLIP or DINOv2 tower, LLaVA-OneVision's
    SigLIP, the Qwen2-VL/2.5-VL ViT, the audio towers of Qwen2.5-Omni and Qwen3-Omni, ...); every cut must leave at
    least one encoder layer after it (checked when the patch is created, with a ValueError naming the valid range).
    """

    def __init__(self, method: Compressor, layer: int | str | tuple, schedule: str = "ratio"):
        if not isinstance(method, Compressor) or isinstance(method, InEncoder):
            raise TypeError(f"method must be a configured pre-LLM compressor (e.g. tz.AToMe(retain=0.25)), got "
                            f"{type(method).__name__}")
        if method.info.stage != "pre_llm":
            raise ValueError(f"{method.info.name} works at stage {method.info.stage!r}; only pre-LLM methods can "
                             f"run inside the encoder")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
        form = check_layer_form(layer)  # ValueError naming the forms
        self.method = method
        self.layer = form
        self.schedule = schedule
        # the cuts: known now for positive ints, resolved against the encoder's depth by resolve_layers() otherwise
        static = isinstance(form, int) and form >= 0 or isinstance(form, tuple) and all(
            isinstance(c, int) and c >= 0 for c in form)
        self.layers: tuple[int, ...] | None = ((form,) if isinstance(form, int) else form) if static else None
        self._needs_depth = not static
        self.step = CompressStep(self._step, method.budget.count, schedule=schedule,
                                 modalities=tuple(method.info.modalities))
        self.retain, self.tokens = method.retain, method.tokens
        self.budget = method.budget
        self.last_stats = []
        self.requires = method.requires
        self.optional = method.optional
        if "info" not in type(self).__dict__:  # a registered encoder method (tokenzip/methods) keeps its own info
            i = method.info
            self.info = MethodInfo(name=f"{i.name}@encoder{_cut_name(form)}", family=i.family, modalities=i.modalities,
                                   stage="encoder", query_aware=i.query_aware, reference=i.reference)

    def resolve_layers(self, adapter: Any) -> int | tuple[int, ...]:
        """The cuts for ``adapter``'s encoder, as its ``set_encoder_layer`` takes them (an int for one cut): forms
        that need the depth ask ``adapter.encoder_depth()``. Sets :attr:`layers`."""
        if self._needs_depth:
            depth_of = getattr(adapter, "encoder_depth", None)
            if depth_of is None:
                raise ValueError(f"layer={self.layer!r} needs the encoder's depth, which {type(adapter).__name__} "
                                 f"does not report; give the cut as an int >= 1 or an increasing tuple of them")
            self.layers = resolve_layers(self.layer, depth_of())
        return self.layers[0] if len(self.layers) == 1 else self.layers

    def layer_counts(self, n: int, depth: int) -> list[int]:
        """Tokens each of the encoder's ``depth`` layers runs on for an item of ``n`` tokens (after
        :meth:`resolve_layers`, or with static cuts): what an encoder-FLOPs estimate needs."""
        if self.layers is None:
            raise RuntimeError(f"layer={self.layer!r} is resolved when the method is installed on a model")
        return layer_token_counts(n, self.budget.count(n), self.layers, depth, self.schedule)

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        return self.method._compress(tokens, k, layout, signals)

    def _step(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
              signals: dict[str, torch.Tensor]) -> CompressOutput:
        return self.method.compress(tokens, grid=layout, k=k, **signals)

    def __repr__(self) -> str:
        schedule = "" if self.schedule == "ratio" else f", schedule={self.schedule!r}"
        return f"{type(self).__name__}({self.method!r}, layer={self.layer!r}{schedule})"

    def __eq__(self, other: Any) -> bool:
        return type(other) is type(self) and (self.method, self.layer, self.schedule) == \
            (other.method, other.layer, other.schedule)


def _cut_name(form: int | str | tuple) -> str:
    """The cut part of an InEncoder's name: ``2`` and ``1+2+3``; forms resolved by depth in brackets: ``[-1]``,
    ``[every]``, ``[last2]``, ``[1+-1]``."""
    if isinstance(form, tuple) and form[0] == "last":
        return f"[last{form[1]}]"
    name = "+".join(map(str, form)) if isinstance(form, tuple) else str(form)
    return name if name.replace("+", "").isdigit() else f"[{name}]"
