"""What every model adapter provides. Adapters know nothing of methods: they find each item's tokens, compute the
signals a method asks for, and hand compressed tokens back to the model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..llm.hooks import PRODUCED_SIGNALS
from ..ops import Layout
from ..output import CompressOutput


@dataclass(frozen=True)
class ModelParts:
    """Where the parts of one model live. The adapter is the one source of model structure: the LLM stage, the
    bench, the CLI and the presets ask ``adapter.parts()`` instead of guessing attribute paths.

    encoder:        the media encoder whose forward is "encoder time" (vision tower, audio encoder)
    encoder_layers: its transformer blocks, in order
    projector:      the module that maps encoder features into the LLM's space (None: none, or inside ``encoder``)
    language_model: the decoder stack that reads the media tokens (has ``decoder_layers`` and ``final_norm``)
    decoder_layers: its blocks, in order
    final_norm:     its last norm (the LLM stage writes the full-length sequence back before it)
    embed:          the input embedding of the token ids
    media_token_ids: modality -> placeholder token id in ``input_ids`` (empty for encoder-decoders like Whisper)
    """

    encoder: torch.nn.Module
    encoder_layers: torch.nn.ModuleList
    projector: torch.nn.Module | None
    language_model: torch.nn.Module
    decoder_layers: torch.nn.ModuleList
    final_norm: torch.nn.Module
    embed: torch.nn.Module
    media_token_ids: dict[str, int] = field(default_factory=dict)


@dataclass
class Item:
    """One image / video / audio clip of one sample, as the method sees it.

    ``extra`` keys the patch reads: ``tokens_in`` (the item's uncompressed count when ``tokens`` are fewer, e.g. at
    the last cut of an encoder schedule), ``k`` (the count a schedule's last cut must reach), ``source_in`` (``[N]``,
    each original token's slot among ``tokens``, -1 dropped: ``last_stats`` then report the original tokens) and
    ``grid_in`` (their layout)."""

    modality: str
    sample: int  # batch row the item belongs to
    tokens: torch.Tensor  # [N, D] in the space the method compresses
    grid: Layout  # how the N tokens tile space and time (tokenzip/layout.py)
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # adapter-private bookkeeping

    @property
    def tokens_in(self) -> int:
        return self.extra.get("tokens_in", self.tokens.shape[0])


@dataclass
class InputItem:
    """One media item as the input stage sees it, before the encoder runs (``Adapter.input_plan``)."""

    modality: str
    sample: int  # batch row the item belongs to
    tokens: int  # N: the tokens the LLM gets for it uncompressed
    achievable: tuple[int, ...]  # ascending token counts the adapter can give the LLM for it (N included)
    grid: Layout | None = None  # the layout of its N tokens
    extra: dict[str, Any] = field(default_factory=dict)  # adapter-private bookkeeping
    # reduction "frames": the ascending indices of the frames to keep, set by the method
    # (``tokenzip.base.FrameSelector.choose``) before ``Adapter.rescale_inputs``; None: keep every frame
    keep: torch.Tensor | None = None
    # set by ``Adapter.rescale_inputs``: prompt tokens other than the item's placeholders that left the sequence with
    # its dropped units (Qwen3-VL, reduction "frames": each dropped temporal grid's timestamp text and markers)
    text_removed: int = 0


class Adapter(ABC):
    """Base adapter. ``model_classes`` are class names, so unsupported models get a clear TypeError."""

    model_classes: ClassVar[tuple[str, ...]] = ()
    modalities: ClassVar[tuple[str, ...]] = ("image",)
    stages: ClassVar[tuple[str, ...]] = ("pre_llm",)
    # the signals (tokenzip/signals.py) ``encode`` can compute for a method before the LLM (and, with stage
    # "encoder", between encoder layers); installing a method that requires another one is a TypeError
    signals: ClassVar[frozenset[str]] = frozenset()
    # what ``encode`` can compute between encoder layers (stage "encoder"), when that differs from ``signals``
    encoder_signals: ClassVar[frozenset[str] | None] = None
    # whether calls of the patched model from several threads may run at once: True only where the stock model's
    # forward()/generate() keep no per-call state on its modules (Qwen-VL and Qwen-Omni keep ``rope_deltas`` between
    # generate()'s steps), and this adapter keeps its own per-call state in ``tokenzip.callstate.per_call``
    # attributes; False: the patch runs one call at a time (tokenzip/patch.py)
    concurrent_calls: ClassVar[bool] = False

    @classmethod
    def produces(cls, stage: str) -> frozenset[str]:
        """The signals a method at ``stage`` can get on this model (stage "llm": the LLM stage's own)."""
        if stage == "llm":
            return PRODUCED_SIGNALS
        if stage == "encoder" and cls.encoder_signals is not None:
            return cls.encoder_signals
        return cls.signals

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @abstractmethod
    def parts(self) -> ModelParts:
        """Where this model keeps its encoder, projector, language model, layers, norm and embedding."""

    @abstractmethod
    def has_media(self, kwargs: dict[str, Any]) -> bool:
        """Whether this call carries media to compress (e.g. ``pixel_values`` at prefill)."""

    @abstractmethod
    def batch_size(self, kwargs: dict[str, Any]) -> int:
        ...

    @abstractmethod
    def encode(self, kwargs: dict[str, Any], needs: frozenset[str]) -> list[Item]:
        """Run the encoder and return the items in sequence order, with the requested signals."""

    def encoder_signals_at(self, cuts: tuple[int, ...]) -> frozenset[str]:
        """The signals ``encode`` can compute at every one of ``cuts`` (stage "encoder"), after
        :meth:`set_encoder_layer` accepted them: ``produces("encoder")`` unless some cut lacks some of them (cut 0,
        before the first layer, has no attention yet)."""
        return self.produces("encoder")

    def set_encoder_layer(self, layer: int | tuple[int, ...], step: Any = None) -> None:
        """Stage "encoder": compress between encoder layers ``layer - 1`` and ``layer``, or after each layer count of
        a tuple using ``step`` (``tokenzip.encoder.CompressStep``) at the earlier cuts (adapters that list the stage
        implement this)."""
        raise TypeError(f"{type(self).__name__} has no encoder stage")

    # ---- lifecycle (the patch calls these; all run also after an exception) ------------------------------------
    # install() once when the patch is installed -> for each outermost patched call: encode()/rebuild(), then
    # release() -> close() once when the patch is removed. An adapter that hooks model modules does it in install()
    # (or lazily in rebuild()) and undoes all of it in close(), so the model is exactly restored.
    def install(self) -> None:
        """The patch is being installed (nothing has run yet)."""

    def begin_call(self, kwargs: dict[str, Any]) -> None:
        """Called with the arguments of every outermost patched forward()/generate() call, before any stage: an
        adapter may note what generate()'s own forward() calls no longer carry (e.g. Qwen3-VL's grids, once the
        media are encoded); ``release()`` drops it."""

    def windowed(self, kwargs: dict[str, Any]) -> bool:
        """Whether the model encodes this call's media itself, one window at a time, inside its own generate()
        (Whisper's long-form transcription: windows whose positions depend on what was decoded so far). Then the
        patch does not compress up front: it hands :meth:`encode_windows` a callback that compresses one window."""
        return False

    def encode_windows(self, kwargs: dict[str, Any], compress: Any) -> dict[str, Any]:
        """A :meth:`windowed` call: arrange that every window the model encodes during the call is compressed by
        ``compress(window_kwargs) -> kwargs`` (the patch's encode -> method -> :meth:`rebuild` pipeline on the
        window's own arguments) before the model reads it, and return the arguments for the original call."""
        raise TypeError(f"{type(self).__name__} does not encode windows")

    def release(self) -> None:
        """Called after every outermost patched forward()/generate() call, also after an exception: drop per-call
        state. Per-call state lives in ``tokenzip.callstate.per_call`` attributes (each thread its own), so that
        calls in several threads at once never share it."""

    def close(self) -> None:
        """The patch is being removed: undo every hook or substitution this adapter made on the model."""

    @abstractmethod
    def rebuild(self, kwargs: dict[str, Any], items: list[Item], outputs: list[CompressOutput]) -> dict[str, Any]:
        """Arguments for the original forward()/generate() that feed the compressed tokens to the LLM."""

    # ---- stage "input": fewer tokens before the encoder (tokenzip.base.InputCompressor) --------------------------
    # The kinds of input reduction this adapter can make ("resolution": resize each image; "crops": fewer AnyRes
    # crops; "frames": fewer frames of each video clip); empty: the adapter has no input stage. ``input_stage_note``
    # says why, in the error a user gets.
    input_reductions: ClassVar[tuple[str, ...]] = ()
    input_stage_note: ClassVar[str] = ""
    # whether the call that leaves the input stage still carries raw media (pixels), so that an encoder-stage or
    # pre-LLM method can follow in a ``tz.compose`` pipeline (False: it carries precomputed features)
    input_keeps_media: ClassVar[bool] = True

    def input_plan(self, kwargs: dict[str, Any], reduction: str) -> list[InputItem]:
        """The media items of a call in sequence order, each with ``N`` and the counts ``reduction`` can give it.

        Reduction ``"frames"`` (``tokenzip.base.FrameSelector``): one item per video clip (other media are not
        items: they pass unchanged), with

        - ``achievable[j]``: the clip's token count when ``j + 1`` of its ``T`` frames are kept (``T`` counts,
          ascending, the last one ``N``). A "frame" is the unit the model tokenises on its own: one picture for
          LLaVA-OneVision; for a model with temporal patches (Qwen2-VL: ``temporal_patch_size = 2``) one temporal
          grid, i.e. a pair of frames, so ``T`` is the number of grids;
        - ``extra["frames"]``: the clip as RGB in ``[0, 1]``, ``float [T, 3, H, W]``, one picture per unit (the
          adapter un-normalises the model's own pixels with the processor's mean/std; for a temporal grid, e.g.
          its first frame), which is all a method sees;
        - ``grid``: the layout of the ``N`` tokens.
        """
        raise TypeError(self._no_input_stage(reduction))

    def rescale_inputs(self, kwargs: dict[str, Any], reduction: str, items: list[InputItem], targets: list[int]
                       ) -> tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor]]]:
        """New call arguments in which item ``i`` reaches the LLM as ``targets[i]`` tokens (an achievable count of
        its plan), and per item the ``(source [N], index [k])`` correspondence reported in ``last_stats``.

        Reduction ``"frames"``: ``items[i].keep`` holds the ascending indices of the frames (units) to keep
        (``len(keep)`` frames give ``targets[i]`` tokens); the new call carries only those frames' pixels and
        each clip's placeholders shortened to its new count, so the model's own encoder runs on the kept frames.
        ``source``/``index`` map the kept frames' tokens to the original ones (frame-level selection: a kept
        frame's tokens are the tokens the uncompressed call gives it, up to numerics) and dropped frames' tokens to
        -1. A model that needs every clip of a call to have the same frame count (one pixel tensor) raises a
        ValueError naming it when the clips keep different counts."""
        raise TypeError(self._no_input_stage(reduction))

    def input_keeps_media_for(self, reduction: str) -> bool:
        """Whether the call that leaves input reduction ``reduction`` still carries raw media (so an encoder-stage
        or pre-LLM method can follow it in a ``tz.compose`` pipeline); default: ``input_keeps_media``."""
        return self.input_keeps_media

    @classmethod
    def _no_input_stage(cls, reduction: str) -> str:
        can = list(cls.input_reductions) or "none"
        note = f" ({cls.input_stage_note})" if cls.input_stage_note else ""
        return (f"{cls.__name__} cannot reduce its inputs by {reduction!r} (stage 'input'; it can: {can}){note}")


def kept_frames_map(frames: int, per_frame: int, keep: torch.Tensor, trailing: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduction ``"frames"``: the ``(source [N], index [k])`` correspondence of an item whose ``N = frames *
    per_frame + trailing`` tokens are ``frames`` consecutive blocks of ``per_frame`` tokens then ``trailing`` marker
    tokens (LLaVA-OneVision: one newline; Qwen-VL: none), when only the frames ``keep`` (ascending) are given to the
    model: each kept frame's tokens and the markers keep their order, every other token maps to -1."""
    keep = torch.as_tensor(keep, dtype=torch.long).cpu()
    n = frames * per_frame + trailing
    cells = torch.arange(per_frame)
    index = torch.cat([(keep[:, None] * per_frame + cells[None]).flatten(), torch.arange(n - trailing, n)])
    source = torch.full((n,), -1, dtype=torch.long)
    source[index] = torch.arange(index.numel())
    return source, index
