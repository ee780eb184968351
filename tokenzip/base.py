"""The compressor base class: one small dataclass per method (kvpress style)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from . import ops
from . import signals as signal_table
from .budget import Budget, nearest_achievable
from .output import CompressOutput, ModalityStats

if TYPE_CHECKING:
    from .adapters.base import InputItem
    from .patch import Patch

FAMILIES = ("baseline", "input", "transformation", "similarity", "attention", "query")
STAGES = ("input", "encoder", "pre_llm", "llm")
MODALITIES = ("image", "video", "audio")

# every signal a method may ask for is declared once, in tokenzip/signals.py (name, axes, kind, meaning)
SIGNALS = signal_table.SIGNALS


@dataclass(frozen=True)
class MethodInfo:
    name: str
    family: str
    modalities: tuple[str, ...]
    stage: str
    query_aware: bool
    reference: str


@dataclass
class Compressor:
    """Base of every method. Subclasses set ``info``, ``requires`` and implement ``_compress``.

    Budget: exactly one of ``retain`` (0 < r <= 1: keep ``max(1, round(r * N))`` tokens of each item) or
    ``tokens`` (keep ``min(k, N)``), see :class:`tokenzip.Budget`.
    """

    retain: float | None = None
    tokens: int | None = None

    info: ClassVar[MethodInfo]
    # signals (tokenzip/signals.py) the method cannot run without; a method whose needs depend on its fields
    # declares ``requires`` as a property (FastV), so always read it from a configured instance
    requires: ClassVar[tuple[str, ...]] = ()
    # signals the method can use when present but does not need (it must run without them)
    optional: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        self.budget = Budget(retain=self.retain, tokens=self.tokens)
        self.last_stats: list[dict[str, ModalityStats]] = []

    def signals_needed(self) -> frozenset[str]:
        """The signals to compute for this configured instance: ``requires`` + ``optional``. The one place that
        says it (the patch, the LLM stage, the preview and the bench all ask here). Signals cost time (LLM stage:
        text-row attention is ``[B, H, T, W]``), so a configuration that does not use one must not declare it."""
        return frozenset(self.requires) | frozenset(self.optional)

    # ---- tensor level -------------------------------------------------------------------------------------------
    def compress(self, tokens: torch.Tensor, *, grid: Any = None, k: int | None = None,
                 **signals: torch.Tensor) -> CompressOutput:
        """Compress ``tokens`` ``[B, N, D]`` to ``[B, k, D]``; ``k`` defaults to the budget for ``N``.

        ``grid`` gives the token layout: ``(h, w)`` or a list of such grids tiling the ``N`` tokens in order
        (default: square if ``N`` is a perfect square, else 1-D). ``signals`` are the tensors named in ``requires``.
        """
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
            raise TypeError(f"tokens must be a [B, N, D] tensor, got {getattr(tokens, 'shape', type(tokens))}")
        if not tokens.is_floating_point():
            raise TypeError(f"tokens must be floating point, got {tokens.dtype}")
        b, n, _ = tokens.shape
        if n < 1:
            raise ValueError("tokens has no tokens (N == 0)")
        if k is None:
            k = self.budget.count(n)
        elif not 1 <= k <= n:
            raise ValueError(f"k must be in [1, {n}], got {k}")
        missing = [s for s in self.requires if s not in signals]
        if missing:
            raise ValueError(f"{self.info.name} needs signals {missing}; pass them as keyword arguments")
        unknown = [s for s in signals if s not in SIGNALS]
        if unknown:
            raise ValueError(f"unknown signals {unknown}; known: {list(SIGNALS)}")
        for name, sig in signals.items():
            SIGNALS[name].check(sig, b, n)
        layout = ops.as_layout(grid, n)
        if k >= n:
            idx = torch.arange(n, device=tokens.device).expand(b, -1)
            return ops.select(tokens, idx)
        out = self._compress(tokens, k, layout, signals)
        if out.tokens.shape[:2] != (b, k):
            raise RuntimeError(f"{self.info.name} returned {tuple(out.tokens.shape[:2])}, expected {(b, k)}")
        return out

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        raise NotImplementedError

    # ---- model level --------------------------------------------------------------------------------------------
    def __call__(self, model: torch.nn.Module) -> "Patch":
        """A context manager that compresses ``model``'s forward() and generate() while it is open."""
        from .patch import Patch

        return Patch(self, model)

    def apply(self, model: torch.nn.Module) -> "Patch":
        """Patch ``model`` now; call ``.remove()`` on the returned handle to undo."""
        return self(model).install()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.budget})"


@dataclass
class InputCompressor(Compressor):
    """Base of stage ``"input"`` methods: fewer tokens BEFORE the encoder, by giving the model smaller inputs.

    The method decides, per media item, how many tokens the LLM gets: its budget of the item's ``N`` (the tokens the
    LLM would get uncompressed), taken to the nearest count the model can actually be given
    (:func:`tokenzip.budget.nearest_achievable`: the largest achievable count at or under the budget, the smallest
    achievable one when every count is over it). The adapter says which counts are achievable and builds the
    smaller inputs (``Adapter.input_plan`` / ``Adapter.rescale_inputs``); the method knows nothing of models.
    ``reduces`` names the kind of reduction the method asks for; an adapter lists those it can make in
    ``input_reductions``. There is no tensor-level ``compress``: the tokens are recomputed by the model's encoder
    from the new inputs.
    """

    reduces: ClassVar[str] = "resolution"

    def target(self, n: int, achievable: "tuple[int, ...] | list[int]") -> int:
        """Tokens the LLM gets for an item of ``n`` tokens that can be given any count in ``achievable``."""
        return nearest_achievable(self.budget.count(n), achievable)

    def choose(self, items: "list[InputItem]", targets: list[int]) -> None:
        """Record on ``items`` (the adapter's ``input_plan``) any choice besides the count that the adapter needs to
        build the smaller inputs, once ``targets`` (each item's count, from :meth:`target`) are fixed. The patch
        calls it just before ``Adapter.rescale_inputs``. A resize or a crop reduction needs only the count (this
        default does nothing); a :class:`FrameSelector` records which frames of each clip to keep."""

    def compress(self, tokens: torch.Tensor, *, grid: Any = None, k: int | None = None,
                 **signals: torch.Tensor) -> CompressOutput:
        raise TypeError(f"{self.info.name} works at stage 'input': it changes the model's inputs (use it on a model: "
                        f"`with tz.get({self.info.name!r}, retain=0.5)(model): ...`), there are no tokens to compress "
                        f"at tensor level")


@dataclass
class FrameSelector(InputCompressor):
    """Base of stage ``"input"`` methods that choose WHICH frames of each video clip the encoder sees
    (``reduces = "frames"``): frame sampling and frame de-duplication before the vision encoder.

    Contract with the adapter (``Adapter.input_plan(kwargs, "frames")``): one :class:`~tokenzip.adapters.base.
    InputItem` per clip whose ``achievable[j]`` is the clip's token count with ``j + 1`` of its ``T`` frames kept
    (``len(achievable) == T``, ascending; ``achievable[-1] == N``) and whose ``extra["frames"]`` is the clip as RGB
    in ``[0, 1]``, ``float [T, 3, H, W]`` (the adapter un-normalises the model's pixels). The count is the
    :class:`InputCompressor` rule: the method's budget of the clip's ``N`` tokens taken to the nearest achievable
    count, i.e. ``k`` frames. :meth:`choose` then calls :meth:`select` for the clip and stores the ascending kept
    frame indices on ``InputItem.keep``; the adapter's ``rescale_inputs`` builds the call with only those frames.
    A method implements ``_select(frames, k) -> LongTensor [k]`` (ascending, distinct, in ``[0, T)``); it knows
    nothing of models.
    """

    reduces: ClassVar[str] = "frames"

    def select(self, frames: torch.Tensor, k: int) -> torch.Tensor:
        """The ``k`` frames of ``frames`` (RGB in ``[0, 1]``, ``[T, 3, H, W]``) to keep: ascending indices ``[k]``."""
        if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[1] != 3 \
                or not frames.is_floating_point() or frames.shape[0] < 1:
            raise TypeError(f"frames must be a float [T, 3, H, W] tensor of RGB values in [0, 1], got "
                            f"{getattr(frames, 'dtype', type(frames))} {tuple(getattr(frames, 'shape', ()))}")
        t = int(frames.shape[0])
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= t:
            raise ValueError(f"k must be an int in [1, {t}] (frames to keep of a {t}-frame clip), got {k!r}")
        if k == t:
            return torch.arange(t, device=frames.device)
        keep = self._select(frames, k)
        if keep.dim() != 1 or keep.shape[0] != k or keep.dtype != torch.long or bool((keep[1:] <= keep[:-1]).any()) \
                or int(keep.min()) < 0 or int(keep.max()) >= t:  # a method bug, not user input
            raise RuntimeError(f"{self.info.name} must return {k} ascending distinct frame indices in [0, {t}), got "
                               f"{keep.tolist()}")
        return keep

    def _select(self, frames: torch.Tensor, k: int) -> torch.Tensor:
        raise NotImplementedError

    def choose(self, items: "list[InputItem]", targets: list[int]) -> None:
        """Each clip of this method's modalities gets ``keep``: the frames :meth:`select` picks for its count."""
        for item, count in zip(items, targets):
            if item.modality not in self.info.modalities:
                continue
            frames = item.extra.get("frames")
            if not isinstance(frames, torch.Tensor) or len(item.achievable) != frames.shape[0]:  # adapter bug
                raise RuntimeError(f"a 'frames' input item needs extra['frames'] [T, 3, H, W] and one achievable "
                                   f"count per kept-frame number, got {len(item.achievable)} counts for "
                                   f"{tuple(getattr(frames, 'shape', ()))}")
            item.keep = self.select(frames, list(item.achievable).index(count) + 1)
