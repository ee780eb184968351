"""The replay oracle of an encoder-stage method: the same encoder-stage run, with a compressor that hands back the
method's recorded outputs instead of computing anything.

The pre-LLM oracle (the stock model fed the kept tokens, plus the uncompressed encoder's time) is wrong for a method
that compresses inside the encoder: the layers after its cut run on fewer tokens, so its encoder is cheaper than the
uncompressed one. The replay oracle runs that cheaper encoder for real: :func:`recording` captures every
:class:`~tokenzip.CompressOutput` the method returns during one call (its schedule's earlier cuts, then the last cut
of every item, in call order), and :class:`Replay` is a stage-``"encoder"`` compressor with the method's cut(s) and
budget that returns those outputs, in the same order, without asking for any signal (no attention probe, no text
embedding) and without scoring, selecting or merging. Its time to first token is the reduced encoder + the LLM on the
very tokens the method produced (the same tensors): everything except the method's own cost.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..base import Compressor, MethodInfo
from ..encoder import CompressStep
from ..output import CompressOutput


def is_encoder_stage(compressor: Any) -> bool:
    info = getattr(compressor, "info", None)
    return info is not None and info.stage == "encoder"


class Recorded:
    """The outputs of one encoder-stage call: ``steps`` (a schedule's earlier cuts) and ``final`` (the last cut, one
    per compressed item), each in call order."""

    def __init__(self) -> None:
        self.steps: list[CompressOutput] = []
        self.final: list[CompressOutput] = []


@contextmanager
def recording(compressor: Compressor) -> Iterator[Recorded]:
    """While open (enter it BEFORE ``compressor(model)`` creates its patch: the patch hands the adapter the
    compressor's ``step``), every output of ``compressor.compress`` and of its schedule ``step`` is recorded. The
    instance attributes are restored on exit."""
    if not is_encoder_stage(compressor):
        raise TypeError(f"recording needs an encoder-stage compressor, got {compressor.info.name} "
                        f"(stage {compressor.info.stage!r})")
    rec = Recorded()
    had = {name: name in vars(compressor) for name in ("compress", "step")}
    orig_compress = compressor.compress
    orig_step = getattr(compressor, "step", None)

    def compress(*args: Any, **kwargs: Any) -> CompressOutput:
        out = orig_compress(*args, **kwargs)
        rec.final.append(out)
        return out

    compressor.compress = compress
    if orig_step is not None:
        def step(*args: Any, **kwargs: Any) -> CompressOutput:
            out = orig_step(*args, **kwargs)
            rec.steps.append(out)
            return out

        compressor.step = CompressStep(step, orig_step.count)
    try:
        yield rec
    finally:
        for name, orig in (("compress", orig_compress), ("step", orig_step)):
            if had[name]:
                setattr(compressor, name, orig)
            elif name in vars(compressor):
                delattr(compressor, name)


class Replay(Compressor):
    """Stage ``"encoder"``: the recorded outputs of ``method`` (:func:`recording`), returned in order.

    Same cut(s) (``layer``) and budget as ``method``, no signals. Each call checks that the tokens it is handed have
    the shape the recorded output was computed from (a replay of another call is a RuntimeError)."""

    requires: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()

    def __init__(self, method: Compressor, recorded: Recorded):
        if not is_encoder_stage(method):
            raise TypeError(f"Replay replays an encoder-stage method, got {method.info.name} "
                            f"(stage {method.info.stage!r})")
        self.method = method
        self.recorded = recorded
        self.layer = method.layer
        self.retain, self.tokens = method.retain, method.tokens
        self.budget = method.budget
        self.last_stats = []
        self._final = 0
        self._steps = 0
        step = getattr(method, "step", None)
        self.step = CompressStep(self._next_step, step.count if step is not None else method.budget.count,
                                 schedule=getattr(step, "schedule", "ratio"))
        i = method.info
        self.info = MethodInfo(name=f"replay:{i.name}", family=i.family, modalities=i.modalities, stage="encoder",
                               query_aware=False, reference=f"replay of {i.name} (tokenzip.bench.replay)")

    def resolve_layers(self, adapter: Any) -> int | tuple[int, ...]:
        """The method's own cuts on this model (layer forms such as "every" resolve against its encoder depth)."""
        return self.method.resolve_layers(adapter)

    def rewind(self) -> None:
        """Start over from the first recorded output (before each replayed call)."""
        self._final = self._steps = 0

    @staticmethod
    def _check(out: CompressOutput, tokens: torch.Tensor, what: str) -> CompressOutput:
        if tuple(out.source.shape) != tuple(tokens.shape[:2]):
            raise RuntimeError(f"replay: the {what} was recorded for tokens {tuple(out.source.shape)}, this call "
                               f"hands {tuple(tokens.shape[:2])}")
        return out

    def _next_step(self, tokens: torch.Tensor, k: int, layout: Any, signals: dict[str, torch.Tensor]
                   ) -> CompressOutput:
        if self._steps >= len(self.recorded.steps):
            raise RuntimeError("replay: more schedule steps than the recorded call made")
        out = self.recorded.steps[self._steps]
        self._steps += 1
        return self._check(out, tokens, "schedule step")

    def compress(self, tokens: torch.Tensor, *, grid: Any = None, k: int | None = None,
                 **signals: torch.Tensor) -> CompressOutput:
        if self._final >= len(self.recorded.final):
            raise RuntimeError("replay: more items than the recorded call compressed")
        out = self.recorded.final[self._final]
        self._final += 1
        return self._check(out, tokens, "output")

    def __repr__(self) -> str:
        return f"Replay({self.method!r})"
