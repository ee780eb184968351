"""The compressor base class: one small dataclass per method (kvpress style)."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from . import ops
from . import signals as signal_table
from .budget import Budget, nearest_achievable
from .callstate import per_call
from .output import CompressOutput, ModalityStats

if TYPE_CHECKING:
    from .adapters.base import InputItem
    from .patch import Patch

FAMILIES = ("baseline", "input", "transformation", "similarity", "attention", "query")
STAGES = ("input", "encoder", "pre_llm", "llm")
MODALITIES = ("image", "video", "audio")

# every signal a method may ask for is declared once, in tokenzip/signals.py (name, axes, kind, meaning)
SIGNALS = signal_table.SIGNALS


def check_tokens(tokens: Any) -> tuple[int, int]:
    """``(B, N)`` of a method's input, or a clear error: a floating-point ``[B, N, D]`` tensor with ``N, D >= 1`` and
    only finite values (fuzzing found NaN/inf going through silently, e.g. into a NaN-poisoned top-k)."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        raise TypeError(f"tokens must be a [B, N, D] tensor, got {getattr(tokens, 'shape', type(tokens))}")
    if not tokens.is_floating_point():
        raise TypeError(f"tokens must be floating point, got {tokens.dtype}")
    b, n, d = tokens.shape
    if n < 1 or d < 1 or b < 1:
        raise ValueError(f"tokens must have B, N, D >= 1, got shape {tuple(tokens.shape)}")
    if not bool(torch.isfinite(tokens).all()):
        raise ValueError("tokens must be finite: they contain NaN or infinite values")
    return b, n


def check_k(k: Any, n: int) -> int:
    """``k`` as given to ``compress``: an int (not a bool) in ``[1, n]``."""
    try:
        if isinstance(k, bool):
            raise TypeError
        k = operator.index(k)  # an int, numpy or torch integer; not a float or a bool
    except TypeError:
        raise TypeError(f"k must be an int in [1, {n}], got {type(k).__name__} {k!r}") from None
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    return k


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
    # what the last patched call recorded (tokenzip.output.summarize); per thread: a call reads its own even while
    # another thread calls the same model; a thread that made no call reads the latest one (tokenzip/callstate.py)
    last_stats = per_call(factory=list, published=True)

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
        b, n = check_tokens(tokens)
        k = self.budget.count(n) if k is None else check_k(k, n)
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
    achievable one when every count is over it). That smallest count is the method's floor: one unit the model
    tokenises alone (one frame; one temporal grid of two frames on Qwen-VL; the smallest grid of a resize), which an
    item gets even when its budget is smaller. It is never silent: the call warns (:class:`tokenzip.budget.
    BudgetFloorWarning`, naming the smallest budget that is met and suggesting a token-level method after it with
    ``tz.compose``), the item's stats record ``budget`` and ``over_budget``, and the bench flags the row ("floor").
    The adapter says which counts are achievable and builds the
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


@dataclass
class JointItem:
    """One media item of one sample as a :class:`JointCompressor` sees it, beside the sample's other items.

    ``tokens`` ``[1, N, D]``; ``grid`` its :class:`~tokenzip.layout.Layout` (a video's frames, an audio stream's
    1-D frames); ``k`` the tokens it must end with (its modality's budget of ``N``, or a schedule's count);
    ``signals`` its per-item signals, batched ``[1, ...]``; ``seconds`` ``[N]`` the start time of each token in
    seconds when the adapter knows it (``None``: the method falls back to its own rate, see its docstring);
    ``partner`` the index (in the same ``compress_sample`` list) of the item the adapter paired it with (a video and
    its own soundtrack, Qwen2.5-Omni's ``use_audio_in_video``), ``None`` when it gave no pairing.
    """

    modality: str
    tokens: torch.Tensor
    grid: Any
    k: int
    signals: dict[str, torch.Tensor]
    seconds: torch.Tensor | None = None
    partner: int | None = None

    @property
    def n(self) -> int:
        return int(self.tokens.shape[1])


def modality_of(layout: Any) -> str:
    """The modality a layout tiles: ``"audio"`` (only audio segments), ``"video"`` (frames) or ``"image"``."""
    kinds = {s.kind for s in layout.segments}
    if kinds == {"audio"}:
        return "audio"
    return "video" if "frames" in kinds else "image"


@dataclass
class JointCompressor(Compressor):
    """Base of the methods that compress all media items of one sample together (stage ``"pre_llm"``): e.g.
    OmniZip, where a clip's audio decides how hard each time window of its video is pruned.

    Subclasses implement ``_compress_sample(items) -> list[CompressOutput]`` (one output of exactly ``item.k``
    tokens per :class:`JointItem`, in order) and know nothing of models: the patch hands them every item of one
    sample whose modality they name (``Patch.prepare``), with its budget in ``item.k``.

    Budget, per modality: ``retain``/``tokens`` is every modality's budget of each of its items, and
    ``budgets[modality]`` (a :class:`tokenzip.Budget`, set by subclasses from fields such as ``audio_retain``)
    overrides it for one modality. Every item ends with exactly its modality's count (:meth:`item_count`); how a
    method spends that count inside the item (e.g. across time windows) is its own. ``requires`` holds for every
    item, as for any method (the adapter computes the signals for every item it hands over).

    At tensor level, ``compress(tokens, grid=...)`` compresses one item alone (its modality read off its layout:
    audio segments -> ``"audio"``; anything else -> ``"video"`` when the method names video, its grids taken as
    frames as the frame-wise video methods do, else ``"image"``); ``compress_sample`` takes several.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.budgets: dict[str, Budget] = {}

    def modality_of(self, layout: Any) -> str:
        modality = modality_of(layout)
        return "video" if modality == "image" and "video" in self.info.modalities else modality

    def item_count(self, modality: str, n: int) -> int:
        """Tokens an item of ``modality`` with ``n`` tokens keeps."""
        return self.budgets.get(modality, self.budget).count(n)

    def compress_sample(self, items: list[JointItem]) -> list[CompressOutput]:
        """Compress the items of one sample together; one output per item, each of exactly ``item.k`` tokens."""
        for it in items:
            if it.modality not in self.info.modalities:
                raise ValueError(f"{self.info.name} compresses {list(self.info.modalities)}, got a {it.modality!r} "
                                 f"item")
            if not isinstance(it.tokens, torch.Tensor) or it.tokens.dim() != 3 or it.tokens.shape[0] != 1:
                raise TypeError(f"a JointItem's tokens must be a [1, N, D] tensor, got "
                                f"{getattr(it.tokens, 'shape', type(it.tokens))}")
            check_tokens(it.tokens)
            try:
                check_k(it.k, it.n)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{exc} (a {it.modality} item of {it.n} tokens)") from None
            missing = [s for s in self.requires if s not in it.signals]
            if missing:
                raise ValueError(f"{self.info.name} needs signals {missing}; pass them as keyword arguments")
            for name, sig in it.signals.items():
                if name not in SIGNALS:
                    raise ValueError(f"unknown signals {[name]}; known: {list(SIGNALS)}")
                SIGNALS[name].check(sig, 1, it.n)
            if it.seconds is not None and tuple(it.seconds.shape) != (it.n,):
                raise ValueError(f"seconds must be [N] = [{it.n}] (one start time per token), got "
                                 f"{tuple(it.seconds.shape)}")
        outs = self._compress_sample(items)
        for it, out in zip(items, outs, strict=True):
            if out.tokens.shape[:2] != (1, it.k):
                raise RuntimeError(f"{self.info.name} returned {tuple(out.tokens.shape[:2])} for a {it.modality} "
                                   f"item, expected {(1, it.k)}")
        return outs

    def _compress_sample(self, items: list[JointItem]) -> list[CompressOutput]:
        raise NotImplementedError

    def compress_items(self, items: list[Any], needs: frozenset[str]) -> list[CompressOutput]:
        """The patch's path: adapter items (``modality``, ``sample``, ``tokens`` ``[N, D]``, ``grid``, ``signals``,
        ``extra``) of a whole batch, grouped per sample; items of modalities the method does not name pass whole.
        A schedule's count (``extra["k"]``) wins over the budget; ``extra["seconds"]`` gives token times and
        ``extra["partner"]`` (an index into ``items``) the item an adapter paired this one with."""
        outs: list[CompressOutput | None] = [None] * len(items)
        by_sample: dict[int, list[int]] = {}
        for i, it in enumerate(items):
            if it.modality in self.info.modalities:
                by_sample.setdefault(it.sample, []).append(i)
            else:
                outs[i] = ops.select(it.tokens.unsqueeze(0), torch.arange(it.tokens.shape[0],
                                                                          device=it.tokens.device).unsqueeze(0))
        for idx in by_sample.values():
            local = {i: j for j, i in enumerate(idx)}
            joint = []
            for i in idx:
                it = items[i]
                n = int(it.tokens.shape[0])
                k = it.extra.get("k")
                joint.append(JointItem(
                    modality=it.modality, tokens=it.tokens.unsqueeze(0), grid=ops.as_layout(it.grid, n),
                    k=self.item_count(it.modality, n) if k is None else int(k),
                    signals={s: v.unsqueeze(0) for s, v in it.signals.items() if s in needs},
                    seconds=it.extra.get("seconds"), partner=local.get(it.extra.get("partner"))))
            for i, out in zip(idx, self.compress_sample(joint)):
                outs[i] = out
        return outs  # type: ignore[return-value]

    def compress(self, tokens: torch.Tensor, *, grid: Any = None, k: int | None = None,
                 **signals: torch.Tensor) -> CompressOutput:
        """One item alone (each batch row on its own); its modality is read off its layout."""
        b, n = check_tokens(tokens)
        layout = ops.as_layout(grid, n)
        modality = self.modality_of(layout)
        k = self.item_count(modality, n) if k is None else check_k(k, n)
        for name, sig in signals.items():
            if name not in SIGNALS:
                raise ValueError(f"unknown signals {[name]}; known: {list(SIGNALS)}")
            SIGNALS[name].check(sig, b, n)
        return self._compress(tokens, k, layout, signals)

    def _compress(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                  signals: dict[str, torch.Tensor]) -> CompressOutput:
        # also the entry of tz.InEncoder's runner: each row is one item alone
        modality = self.modality_of(layout)
        rows = [self.compress_sample([JointItem(modality, tokens[i: i + 1], layout, k,
                                                {s: v[i: i + 1] for s, v in signals.items()})])[0]
                for i in range(tokens.shape[0])]
        return CompressOutput(tokens=torch.cat([r.tokens for r in rows]), source=torch.cat([r.source for r in rows]),
                              index=torch.cat([r.index for r in rows]))
