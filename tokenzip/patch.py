"""Installs a compressor on a model instance: wraps forward() and generate(), restores them on exit."""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import warnings
from typing import Any, Iterator

import torch

from . import ops
from .adapters import adapter_for
from .base import Compressor, JointCompressor
from .budget import BudgetFloorWarning, smallest_retain
from .callstate import per_call
from .llm.hooks import LLMRunner
from .output import CompressOutput, ItemStats, summarize


class Patch:
    """Handle returned by ``compressor(model)`` (a context manager) and ``compressor.apply(model)``.

    The patched model may be called from several threads at once: each call gets the result it gets alone (its
    state is per thread, see tokenzip/callstate.py; on models that keep per-call state of their own, calls run one
    at a time). Installing or removing a patch while calls of the model are in flight is a RuntimeError."""

    _depth = per_call(0)  # nesting of patched calls in progress in this thread
    _generate_items = per_call()  # (prompt length, LLM items) found by the patched generate() in progress

    def __init__(self, compressor: Compressor, model: torch.nn.Module):
        self.compressor = compressor
        self.model = model
        self.adapter = adapter_for(model)  # TypeError for unsupported models, before anything is touched
        # a compressor, or a tz.compose pipeline (``parts``, in pipeline order): at most one part per stage of
        # input -> encoder | pre_llm -> llm
        parts = tuple(getattr(compressor, "parts", (compressor,)))
        for part in parts:
            stage = part.info.stage
            if stage == "input":
                if part.reduces not in self.adapter.input_reductions:
                    raise TypeError(f"{part.info.name} works at stage 'input': "
                                    f"{self.adapter._no_input_stage(part.reduces)}")
            elif stage not in self.adapter.stages:
                raise TypeError(
                    f"{part.info.name} works at stage {stage!r}; {type(self.adapter).__name__} supports "
                    f"{list(self.adapter.stages)}")
            mods = set(part.info.modalities) & set(self.adapter.modalities)
            if not mods:
                raise TypeError(f"{part.info.name} compresses {list(part.info.modalities)}; "
                                f"{type(model).__name__} has {list(self.adapter.modalities)}")
            produced = self.adapter.produces(stage)
            missing = sorted(set(part.requires) - produced)
            if missing:
                raise TypeError(f"{part.info.name} requires signals {missing}, which {type(self.adapter).__name__} "
                                f"cannot produce at stage {stage!r} (it produces {sorted(produced)})")
        self.input = next((p for p in parts if p.info.stage == "input"), None)
        self.pre = next((p for p in parts if p.info.stage in ("encoder", "pre_llm")), None)
        if self.input is not None and self.pre is not None \
                and not self.adapter.input_keeps_media_for(self.input.reduces):
            raise ValueError(f"{self.pre.info.name} cannot follow {self.input.info.name} on "
                             f"{type(self.adapter).__name__}: its input stage hands the LLM precomputed features, "
                             f"there is no encoder pass left to compress (an LLM-stage method can follow it)")
        if self.pre is not None and self.pre.info.stage == "encoder":
            # ValueError naming the valid layers; a schedule of cuts also needs the step for the earlier cuts
            layers = self.pre.resolve_layers(self.adapter)
            self.adapter.set_encoder_layer(layers, step=self.pre.step)
            cuts = (layers,) if isinstance(layers, int) else tuple(layers)
            at = self.adapter.encoder_signals_at(cuts)
            missing = sorted(set(self.pre.requires) - at)
            if missing:
                raise TypeError(f"{self.pre.info.name} requires signals {missing}, which "
                                f"{type(self.adapter).__name__} cannot produce at encoder cut(s) {list(cuts)} (there "
                                f"it produces {sorted(at)})")
        self.llm_compressor = next((p for p in parts if p.info.stage == "llm"), None)
        self.llm = None  # the LLM-stage hook runner while installed
        if self.llm_compressor is not None:
            LLMRunner(self.llm_compressor, self.adapter)  # validates (attention implementation ...) before install
        self.installed = False
        self._flight = threading.Lock()  # guards installed / _in_flight
        self._in_flight = 0  # outermost patched calls in progress, all threads
        self._serial = threading.RLock()  # one call at a time, where calls cannot run at once (``_call``)
        self._work = threading.RLock()  # the compression work of one call at a time (``prepare``)

    # ---- install / remove ---------------------------------------------------------------------------------------
    def install(self) -> "Patch":
        if self.installed:
            return self
        other = getattr(self.model, "_tokenzip_patch", None)
        if other is not None:
            busy = f" ({other._in_flight} call(s) of it in flight)" if getattr(other, "_in_flight", 0) else ""
            raise RuntimeError(f"this model is already compressed by tokenzip{busy}; exit that context first "
                               "(use tz.compose(...) to combine methods)")
        model = self.model
        orig_forward, orig_generate = model.forward, model.generate
        fwd_sig = inspect.signature(orig_forward)
        gen_sig = inspect.signature(orig_generate)

        @functools.wraps(orig_forward)
        def forward(*args: Any, **kwargs: Any):
            kwargs = _as_kwargs(fwd_sig, args, kwargs)
            with self._call():
                try:
                    kwargs = self.prepare(kwargs)
                    if self.llm is None:
                        return orig_forward(**kwargs)
                    self.llm.pending = self._llm_items(kwargs)
                    return orig_forward(**kwargs)
                finally:
                    if self.llm is not None:
                        self.llm.pending = None

        @functools.wraps(orig_generate)
        def generate(*args: Any, **kwargs: Any):
            kwargs = _as_kwargs(gen_sig, args, kwargs)
            if kwargs.get("input_ids") is None and isinstance(kwargs.get("inputs"), torch.Tensor):
                kwargs["input_ids"] = kwargs.pop("inputs")
            original_ids = kwargs.get("input_ids")
            if self.llm is not None:
                beams = kwargs.get("num_beams") or getattr(kwargs.get("generation_config"), "num_beams", None) \
                    or getattr(getattr(model, "generation_config", None), "num_beams", 1) or 1
                if int(beams) > 1:
                    raise ValueError(f"LLM-stage compression does not support beam search (num_beams={beams}): "
                                     "the shortened layers' cache cannot be reordered")
            with self._call():
                try:
                    new_kwargs = self.prepare(kwargs)
                    if self.llm is not None:
                        # the LLM items of generate()'s prefill come from the caller's own arguments: its inner
                        # forward() calls may no longer carry what describes the media (e.g. transformers hands
                        # them the encoded features without the clips' grids), so an item's layout is the one the
                        # same call to forward() gets
                        self._generate_items = (_length(new_kwargs), self._llm_items(new_kwargs))
                    out = orig_generate(**new_kwargs)
                finally:
                    self._generate_items = None
            return _restore_prompt(out, original_ids, new_kwargs.get("input_ids"))

        if self.llm_compressor is not None:
            self.llm = LLMRunner(self.llm_compressor, self.adapter)
            self.llm.install()
        self.adapter.install()
        model.forward = forward
        model.generate = generate
        model._tokenzip_patch = self
        self.installed = True
        return self

    def _llm_items(self, kwargs: dict[str, Any]) -> list | None:
        """The LLM-stage items of one forward() call (None: none). The first forward() inside a patched generate()
        (its prefill) takes the items generate() found in its own arguments (see ``generate`` above)."""
        outer = self._generate_items
        if outer is not None and self._depth > 1:
            self._generate_items = None
            length, items = outer
            if length == _length(kwargs):  # the prefill of the prompt generate() was given
                return items
        mods = self.llm_compressor.info.modalities  # e.g. an image-only method leaves a video clip whole
        return [it for it in self.adapter.llm_items(kwargs) if it.modality in mods] or None

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        """One patched call. The outermost one (generate() calls the patched forward() at every step) is counted as
        in flight (removing the patch meanwhile is an error), starts with empty ``last_stats`` (a call without media
        must not leave the previous call's stats behind; generate()'s inner forward() calls keep the prefill's), and
        drops the adapter's per-call state when it returns. State of a call is per thread (tokenzip/callstate.py);
        on a model whose own forward keeps per-call state on its modules (``Adapter.concurrent_calls`` False) calls
        run one at a time."""
        outer = self._depth == 0
        serial = outer and not self.adapter.concurrent_calls
        if outer:
            with self._flight:
                if not self.installed:
                    raise RuntimeError("this tokenzip patch has been removed from the model; call the model inside "
                                       "the `with` block (or after apply()) of an installed patch")
                self._in_flight += 1
        try:
            if serial:
                self._serial.acquire()
            try:
                if outer:
                    for part in (self.input, self.pre, self.llm_compressor):  # a pipeline's stats are its parts'
                        if part is not None:
                            part.last_stats = []
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                    if outer:
                        self.adapter.release()
            finally:
                if serial:
                    self._serial.release()
        finally:
            if outer:
                with self._flight:
                    self._in_flight -= 1

    def remove(self) -> None:
        with self._flight:
            if not self.installed:
                return
            if self._in_flight:
                raise RuntimeError(f"cannot remove the tokenzip patch while {self._in_flight} call(s) of the model "
                                   f"are in flight (in this or other threads); let them return first")
            self.installed = False  # no new call starts from here on
        if self.llm is not None:
            self.llm.remove()
            self.llm = None
        for name in ("forward", "generate", "_tokenzip_patch"):
            self.model.__dict__.pop(name, None)
        self.adapter.close()

    def __enter__(self) -> "Patch":
        return self.install()

    def __exit__(self, *exc: Any) -> bool:
        self.remove()
        return False

    # ---- the work -----------------------------------------------------------------------------------------------
    def prepare(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Compress the media in one call's keyword arguments; returns the arguments for the original method.
        The input stage runs first (once per outermost call: generate()'s own forward() calls get its smaller
        inputs), then the encoder/pre-LLM stage on the new inputs."""
        with self._work:  # encoders run with temporary hooks, methods and adapters may build things lazily
            return self._prepare(kwargs)

    def _prepare(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self._depth <= 1:
            self.adapter.begin_call(kwargs)
        if self.input is not None and self._depth <= 1 and self.adapter.has_media(kwargs):
            kwargs = self.rescale(kwargs)
        c = self.pre
        if c is None or not self.adapter.has_media(kwargs):
            return kwargs
        if self.adapter.windowed(kwargs):
            # the model encodes the media itself, window by window (Whisper's long-form generate()): the adapter
            # calls back for each window as it is encoded; last_stats gathers one entry per window row
            c.last_stats = []
            return self.adapter.encode_windows(kwargs, functools.partial(self.compress_media, accumulate=True))
        return self.compress_media(kwargs)

    def compress_media(self, kwargs: dict[str, Any], accumulate: bool = False) -> dict[str, Any]:
        """Encode the media of ``kwargs``, compress them with the encoder/pre-LLM part and rebuild the call
        (``accumulate``: add this call's stats to ``last_stats`` instead of replacing them)."""
        c = self.pre
        needs = c.signals_needed()
        items = self.adapter.encode(kwargs, needs)
        outputs: list[CompressOutput] = []
        per_sample: list[list[ItemStats]] = [[] for _ in range(self.adapter.batch_size(kwargs))]
        # a joint method (OmniZip, a tz.compose of methods for different modalities) takes a sample's items together
        joint = c.compress_items(items, needs) if isinstance(c, JointCompressor) else None
        for i, item in enumerate(items):
            tokens = item.tokens.unsqueeze(0)
            if joint is not None:
                out = joint[i]
            elif item.modality in c.info.modalities:
                signals = {name: sig.unsqueeze(0) for name, sig in item.signals.items() if name in needs}
                out = c.compress(tokens, grid=item.grid, k=item.extra.get("k"), **signals)  # k: set by a schedule
            else:  # e.g. an audio clip next to images: a method only compresses the modalities it names
                out = ops.select(tokens, torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0))
            outputs.append(out)
            source, index, grid = out.source[0], out.index[0], item.grid
            if item.extra.get("source_in") is not None:  # a schedule of encoder cuts: stats over the original tokens
                source, index = ops.original_assignment(item.extra["source_in"], source, index)
                grid = item.extra.get("grid_in", grid)
            per_sample[item.sample].append(ItemStats(
                modality=item.modality, tokens_in=item.tokens_in, tokens_out=out.tokens.shape[1],
                source=source, index=index, grid=grid))
        c.last_stats = (c.last_stats + summarize(per_sample)) if accumulate else summarize(per_sample)
        return self.adapter.rebuild(kwargs, items, outputs)

    def rescale(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Stage "input": the method picks each item's count from its budget and the counts the adapter can give it;
        the adapter builds the smaller inputs. ``last_stats``: ``tokens_in`` is the item's uncompressed count,
        ``tokens_out`` what reaches the LLM; ``source``/``index`` are the adapter's geometric correspondence (a
        resampled item has no token-to-token map, see tokenzip/adapters/resample.py)."""
        c = self.input
        items = self.adapter.input_plan(kwargs, c.reduces)
        targets = [c.target(it.tokens, it.achievable) if it.modality in c.info.modalities else it.tokens
                   for it in items]
        if all(k == it.tokens for it, k in zip(items, targets)):  # nothing to reduce: the call as it is (exact)
            new, maps = kwargs, [(torch.arange(it.tokens), torch.arange(it.tokens)) for it in items]
        else:
            c.choose(items, targets)  # e.g. which frames of each clip (tokenzip.base.FrameSelector)
            new, maps = self.adapter.rescale_inputs(kwargs, c.reduces, items, targets)
        per_sample: list[list[ItemStats]] = [[] for _ in range(self.adapter.batch_size(kwargs))]
        for it, k, (source, index) in zip(items, targets, maps):
            budget = c.budget.count(it.tokens) if it.modality in c.info.modalities else None
            per_sample[it.sample].append(ItemStats(modality=it.modality, tokens_in=it.tokens, tokens_out=k,
                                                   source=source, index=index, grid=it.grid, budget=budget,
                                                   text_removed=it.text_removed))
        c.last_stats = summarize(per_sample)
        _warn_floor(c, [s for row in per_sample for s in row])
        return new


def _warn_floor(c: Compressor, stats: list[ItemStats]) -> None:
    """An input-stage method's documented floor (tokenzip.base.InputCompressor): never silent."""
    over = [s for s in stats if s.over_budget]
    if not over:
        return
    worst = max(over, key=lambda s: s.tokens_out / s.tokens_in)
    fix = (f"tokens={max(s.tokens_out for s in over)}" if c.budget.tokens is not None else
           f"retain={max(smallest_retain(s.tokens_in, s.tokens_out) for s in over):g}")
    warnings.warn(
        f"{c.info.name} ({c.budget}): {len(over)} {worst.modality} item(s) got more tokens than the budget allows, "
        f"e.g. {worst.tokens_out} of {worst.tokens_in} where it allows {worst.budget}: that is the least the model "
        f"can be given for it (one unit: a frame, or a temporal grid), the floor of this input-stage method. "
        f"{fix} is the smallest budget it meets here; for fewer tokens, follow it by a token-level method, e.g. "
        f"tz.compose(tz.get({c.info.name!r}, {fix}), tz.get('fastv', retain=...)). ItemStats.over_budget marks "
        f"these items.", BudgetFloorWarning, stacklevel=6)  # the caller of generate() / forward()


def _as_kwargs(sig: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    if not args:
        return dict(kwargs)
    bound = sig.bind_partial(*args, **kwargs)
    out = dict(bound.arguments)
    extra = out.pop("kwargs", None) or out.pop("model_kwargs", None)
    if extra:
        out.update(extra)
    return out


def _length(kwargs: dict[str, Any]) -> int | None:
    """The sequence length of a call's prompt (``input_ids`` or ``inputs_embeds``), None without either."""
    ref = kwargs.get("input_ids")
    if not isinstance(ref, torch.Tensor):
        ref = kwargs.get("inputs_embeds")
    return int(ref.shape[1]) if isinstance(ref, torch.Tensor) and ref.dim() >= 2 else None


def _restore_prompt(out: Any, original: torch.Tensor | None, short: torch.Tensor | None) -> Any:
    """generate() ran on the shortened prompt; give the caller back their own prompt in front of the new tokens,
    so ``out[:, inputs.input_ids.shape[1]:]`` still slices off the answer."""
    if original is None or short is None or original is short:
        return out
    seq = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
    if seq is None:
        return out
    reps = seq.shape[0] // original.shape[0]
    full = torch.cat([original.repeat_interleave(reps, dim=0).to(seq.device), seq[:, short.shape[1]:]], dim=1)
    if isinstance(out, torch.Tensor):
        return full
    out.sequences = full
    return out
