"""Installs a compressor on a model instance: wraps forward() and generate(), restores them on exit."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from . import ops
from .adapters import adapter_for
from .base import Compressor, JointCompressor
from .llm.hooks import LLMRunner
from .output import CompressOutput, ItemStats, summarize


class Patch:
    """Handle returned by ``compressor(model)`` (a context manager) and ``compressor.apply(model)``."""

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
            self.adapter.set_encoder_layer(self.pre.resolve_layers(self.adapter), step=self.pre.step)
        self.llm_compressor = next((p for p in parts if p.info.stage == "llm"), None)
        self.llm = None  # the LLM-stage hook runner while installed
        if self.llm_compressor is not None:
            LLMRunner(self.llm_compressor, self.adapter)  # validates (attention implementation ...) before install
        self.installed = False
        self._depth = 0  # nesting of patched calls in progress

    # ---- install / remove ---------------------------------------------------------------------------------------
    def install(self) -> "Patch":
        if self.installed:
            return self
        if getattr(self.model, "_tokenzip_patch", None) is not None:
            raise RuntimeError("this model is already compressed by tokenzip; exit that context first "
                               "(use tz.compose(...) to combine methods)")
        model = self.model
        orig_forward, orig_generate = model.forward, model.generate
        fwd_sig = inspect.signature(orig_forward)
        gen_sig = inspect.signature(orig_generate)

        @functools.wraps(orig_forward)
        def forward(*args: Any, **kwargs: Any):
            kwargs = _as_kwargs(fwd_sig, args, kwargs)
            self._enter()
            try:
                kwargs = self.prepare(kwargs)
                if self.llm is None:
                    return orig_forward(**kwargs)
                mods = self.llm_compressor.info.modalities  # e.g. an image-only method leaves a video clip whole
                self.llm.pending = [it for it in self.adapter.llm_items(kwargs) if it.modality in mods] or None
                return orig_forward(**kwargs)
            finally:
                if self.llm is not None:
                    self.llm.pending = None
                self._leave()

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
            self._enter()
            try:
                new_kwargs = self.prepare(kwargs)
                out = orig_generate(**new_kwargs)
            finally:
                self._leave()
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

    def _enter(self) -> None:
        """Start of a patched call: an outermost call starts with empty ``last_stats`` (a call without media must
        not leave the previous call's stats behind); generate()'s inner forward() calls keep the prefill's."""
        if self._depth == 0:
            for part in (self.input, self.pre, self.llm_compressor):  # a tz.compose pipeline's stats are its parts'
                if part is not None:
                    part.last_stats = []
        self._depth += 1

    def _leave(self) -> None:
        """End of a patched call: per-call adapter state goes once the outermost call (generate() calls the patched
        forward() at every step) returns."""
        self._depth -= 1
        if self._depth == 0:
            self.adapter.release()

    def remove(self) -> None:
        if not self.installed:
            return
        if self.llm is not None:
            self.llm.remove()
            self.llm = None
        for name in ("forward", "generate", "_tokenzip_patch"):
            self.model.__dict__.pop(name, None)
        self.adapter.close()
        self.installed = False

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
            per_sample[item.sample].append(ItemStats(
                modality=item.modality, tokens_in=item.tokens_in, tokens_out=out.tokens.shape[1],
                source=out.source[0], index=out.index[0], grid=item.grid))
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
            per_sample[it.sample].append(ItemStats(modality=it.modality, tokens_in=it.tokens, tokens_out=k,
                                                   source=source, index=index, grid=it.grid))
        c.last_stats = summarize(per_sample)
        return new


def _as_kwargs(sig: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    if not args:
        return dict(kwargs)
    bound = sig.bind_partial(*args, **kwargs)
    out = dict(bound.arguments)
    extra = out.pop("kwargs", None) or out.pop("model_kwargs", None)
    if extra:
        out.update(extra)
    return out


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
