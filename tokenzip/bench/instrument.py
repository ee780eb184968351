"""Timers around the stages of one generate() call: vision encoder, compression, LLM prefill, decode steps.

Nothing is patched inside transformers: forward hooks on the media encoder, the projector and the language model
(the modules the model's adapter names in ``parts()``), a wrapper on the compressor instance and on the Patch's
``prepare`` (the instance attributes, removed afterwards), a :func:`tokenzip.timing.recording` that receives the
adapters' ``"signals"`` spans (the method's scoring signals are compression cost, not encoder cost), and a
generation streamer that stamps every new token. Time comes from a :class:`Clock`: ``time.perf_counter`` on CPU,
CUDA events on GPU, or any callable (tests inject a fake clock).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import timing


# ---- where the stages live -----------------------------------------------------------------------------------------
@dataclass
class Roles:
    """The modules whose forward passes are the timed stages (None: the model has no such part, or tokenzip has no
    adapter for it)."""

    encoder: torch.nn.Module | None = None
    encoder_layers: torch.nn.ModuleList | None = None
    llm: torch.nn.Module | None = None
    llm_layers: torch.nn.ModuleList | None = None
    projector: torch.nn.Module | None = None


def find_roles(model: torch.nn.Module) -> Roles:
    """The media encoder, the language model and the projector, as the model's adapter names them
    (:meth:`tokenzip.adapters.base.Adapter.parts`); an empty :class:`Roles` for a model without an adapter."""
    from ..adapters import adapter_for

    try:
        parts = adapter_for(model).parts()
    except TypeError:
        return Roles()
    projector = parts.projector
    if projector is not None and any(m is projector for m in parts.encoder.modules()):
        projector = None  # inside the encoder (e.g. Qwen2-VL's patch merger): its time is encoder time
    return Roles(encoder=parts.encoder, encoder_layers=parts.encoder_layers, llm=parts.language_model,
                 llm_layers=parts.decoder_layers, projector=projector)


# ---- clocks --------------------------------------------------------------------------------------------------------
class Clock:
    """Stamps points in time; ``between(a, b)`` is seconds. CPU: ``perf_counter`` (or an injected callable)."""

    def __init__(self, fn: Callable[[], float] | None = None):
        self.fn = fn or time.perf_counter

    def stamp(self) -> Any:
        return self.fn()

    def between(self, a: Any, b: Any) -> float:
        return float(b - a)

    def sync(self) -> None:
        pass


class CudaClock(Clock):
    """CUDA events recorded on the current stream; resolved after a synchronize."""

    def __init__(self) -> None:
        super().__init__()

    def stamp(self) -> Any:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def between(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1000.0

    def sync(self) -> None:
        torch.cuda.synchronize()


def clock_for(device: str | torch.device) -> Clock:
    return CudaClock() if torch.device(device).type == "cuda" else Clock()


# ---- peak memory ---------------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of one call above the memory in use when it started.

    GPU: ``torch.cuda.max_memory_allocated`` after a reset. CPU (Linux): the process's peak resident set (VmHWM),
    reset through ``/proc/self/clear_refs``; elsewhere a psutil sampler thread, else ``ru_maxrss``."""

    def __init__(self, device: str | torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.before = 0
        self.peak = 0

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
            return int(m.group(1)) * 1024 if m else None
        except OSError:
            return None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
            return self
        self._hwm = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._hwm = self._status("VmHWM") is not None
        except OSError:
            pass
        self.before = self._status("VmRSS") or 0
        self._sampler = None
        if not self._hwm:
            self._sampler = _Sampler()
            self._sampler.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = max(0, torch.cuda.max_memory_allocated() - self.before)
        elif self._hwm:
            self.peak = max(0, (self._status("VmHWM") or 0) - self.before)
        else:
            self.peak = max(0, self._sampler.stop() - self.before)


class _Sampler:
    def __init__(self) -> None:
        import threading

        self.stop_ev = threading.Event()
        self.value = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            import psutil

            proc = psutil.Process()
            while not self.stop_ev.is_set():
                self.value = max(self.value, proc.memory_info().rss)
                self.stop_ev.wait(0.005)
        except ImportError:
            import resource

            self.value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> int:
        self.stop_ev.set()
        self.thread.join()
        return self.value


# ---- one instrumented call -----------------------------------------------------------------------------------------
@dataclass
class Trace:
    """Raw stamps of one call, turned into stage durations by :meth:`stages`."""

    clock: Clock
    start: Any = None
    end: Any = None
    token_stamps: list[Any] = field(default_factory=list)
    spans: dict[str, list[tuple[Any, Any]]] = field(default_factory=dict)
    llm_calls: list[dict[str, Any]] = field(default_factory=list)  # per LLM forward: input length
    encoder_passes: list[int] = field(default_factory=list)  # tokens of each sequence entering the encoder
    # encoder-stage runs only: (layer index, tokens of each sequence) of every encoder layer call, in order
    encoder_layer_calls: list[tuple[int, list[int]]] = field(default_factory=list)
    captured: dict[str, Any] | None = None  # the arguments Patch.prepare handed to the stock model
    peak_mem: int = 0

    def add(self, name: str, a: Any, b: Any) -> None:
        self.spans.setdefault(name, []).append((a, b))

    def total(self, name: str) -> float:
        return sum(self.clock.between(a, b) for a, b in self.spans.get(name, []))

    def inside(self, name: str, outer: str) -> float:
        """Total time of the ``name`` spans that lie within an ``outer`` span."""
        c = self.clock
        return sum(c.between(a, b) for a, b in self.spans.get(name, [])
                   if any(c.between(pa, a) >= 0 and c.between(b, pb) >= 0 for pa, pb in self.spans.get(outer, [])))

    def stages(self) -> dict[str, float]:
        """ttft = encoder + compress + prefill + other. ``encoder`` excludes the method's signal probes (they are
        compression cost); ``compress`` is everything the Patch adds before the LLM (signals, scoring, selection,
        merging, rebuilding the prompt) plus, for LLM-stage methods, the method's
        ``compress`` calls inside the prefill (their attention-score recomputation stays in ``prefill``); ``other``
        is what remains (the projector, on either path, and
        embedding merge of the stock path, generate()'s own bookkeeping, the first token's sampling)."""
        c = self.clock
        ttft = c.between(self.start, self.token_stamps[0]) if self.token_stamps else c.between(self.start, self.end)
        tower = self.total("encoder")
        signals = self.total("signals")
        prepare = self.total("prepare")
        llm = self.spans.get("llm", [])
        prefill = c.between(*llm[0]) if llm else 0.0
        encoder = tower - signals
        # the tower time spent inside the Patch's prepare (pre-LLM methods encode there; an input-stage method that
        # hands the stock model smaller pixels leaves the encoder to the model's own forward, after prepare)
        tower_in_prepare = self.inside("encoder", "prepare")
        compress = (prepare - tower_in_prepare + signals) if prepare else 0.0
        if "encoder_layer" in self.spans:
            # stage "encoder": the tower's layers run inside the Patch (before and after the cut), so the split is
            # encoder = the encoder layers' own time (minus the signal probe inside the cut's layer), compress = the
            # method's own calls (every cut) plus its signals; the patch embedding, the bookkeeping between cuts,
            # the projector and the prompt rebuild go to ``other`` (on the method and its replay oracle alike)
            encoder = self.total("encoder_layer") - signals
            compress = self.total("compress_core") + signals
        # stage "llm": the method's own calls inside the prefill are compression; the rest is prefill
        in_llm = self.total("llm_compress")
        compress += in_llm
        prefill -= in_llm
        # the projector is model work on both paths (stock: on every token, in ``other``; compressed: on the kept
        # tokens, inside the Patch): keep it out of the compression cost
        projector = self.total("projector")
        in_prepare = self.inside("projector", "prepare")
        if "encoder_layer" not in self.spans:
            compress -= in_prepare
        n_new = len(self.token_stamps)
        decode = (c.between(self.token_stamps[0], self.token_stamps[-1]) / (n_new - 1)) if n_new > 1 else 0.0
        return {"ttft_s": ttft, "encoder_s": encoder, "compress_s": compress, "prefill_s": prefill,
                "other_s": ttft - encoder - compress - prefill, "projector_s": projector,
                "decode_s_per_token": decode, "total_s": c.between(self.start, self.end)}


class TokenStamps:
    """A generate() streamer: the first ``put`` is the prompt, every later one a new token."""

    def __init__(self, trace: Trace):
        self.trace = trace
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.trace.token_stamps.append(self.trace.clock.stamp())

    def end(self) -> None:
        pass


def _span_hooks(module: torch.nn.Module, trace: Trace, name: str, on_call: Callable | None = None):
    state: list[Any] = []

    def pre(mod, args, kwargs):
        state.append(trace.clock.stamp())
        if on_call is not None:
            on_call(args, kwargs)

    def post(mod, args, kwargs, out):
        trace.add(name, state.pop(), trace.clock.stamp())

    h1 = module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)
    h2 = module.register_forward_hook(post, with_kwargs=True, prepend=True)
    return h1, h2


@contextmanager
def _timed_attr(obj: Any, attr: str, trace: Trace, name: str, capture: bool = False) -> Iterator[None]:
    """Time every call of ``obj.attr`` (an instance attribute shadowing the method, removed on exit)."""
    orig = getattr(obj, attr)
    had = attr in vars(obj)

    def wrapped(*args: Any, **kwargs: Any):
        a = trace.clock.stamp()
        out = orig(*args, **kwargs)
        b = trace.clock.stamp()
        if capture and args and out is args[0]:
            return out  # Patch.prepare on a call without media (a decode step): nothing was compressed
        trace.add(name, a, b)
        if capture and trace.captured is None:
            trace.captured = out
        return out

    setattr(obj, attr, wrapped)
    try:
        yield
    finally:
        if had:
            setattr(obj, attr, orig)
        else:
            delattr(obj, attr)


def _signal_recorder(trace: Trace) -> Callable[[str], Callable[[], None]]:
    """A :func:`tokenzip.timing.recording` callback that adds every span (the adapters' signal probes mark theirs
    ``"signals"``) to ``trace``."""
    def start(kind: str) -> Callable[[], None]:
        a = trace.clock.stamp()
        return lambda: trace.add(kind, a, trace.clock.stamp())

    return start


@contextmanager
def instrument(model: torch.nn.Module, trace: Trace, patch: Any = None, capture: bool = False,
               record_llm_inputs: bool = False) -> Iterator[Trace]:
    """Install every timer for one call; ``patch`` is the tokenzip Patch (already installed) when compressing."""
    roles = find_roles(model)
    handles = []

    def llm_call(args, kwargs):
        emb = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids")
        ref = emb if emb is not None else ids
        info: dict[str, Any] = {"length": int(ref.shape[1]) if ref is not None else None}
        if record_llm_inputs:
            info["inputs_embeds"] = None if emb is None else emb.detach().clone()
            mask = kwargs.get("attention_mask")
            info["attention_mask"] = mask.clone() if isinstance(mask, torch.Tensor) else mask
        trace.llm_calls.append(info)

    def tokens_of(args, kwargs) -> list[int]:
        x = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(x, torch.Tensor):
            return []
        return [int(x.shape[-2])] * (int(x.shape[0]) if x.dim() == 3 else 1)

    def first_layer(mod, args, kwargs):
        trace.encoder_passes += tokens_of(args, kwargs)

    encoder_stage = patch is not None and getattr(getattr(patch, "pre", None), "info", None) is not None \
        and patch.pre.info.stage == "encoder"
    with ExitStack() as stack:
        if roles.encoder is not None:
            handles += _span_hooks(roles.encoder, trace, "encoder")
            if roles.encoder_layers is not None and len(roles.encoder_layers):
                handles.append(roles.encoder_layers[0].register_forward_pre_hook(first_layer, with_kwargs=True))
        if encoder_stage and roles.encoder_layers is not None:
            # the layers run inside the Patch, on fewer tokens after the cut: time each and count its tokens
            for i, layer in enumerate(roles.encoder_layers):
                def count(args, kwargs, i=i):
                    trace.encoder_layer_calls.append((i, tokens_of(args, kwargs)))

                handles += _span_hooks(layer, trace, "encoder_layer", count)
        if roles.llm is not None:
            handles += _span_hooks(roles.llm, trace, "llm", llm_call)
        if roles.projector is not None:
            handles += _span_hooks(roles.projector, trace, "projector")
        if patch is not None:
            stack.enter_context(_timed_attr(patch, "prepare", trace, "prepare", capture=capture))
            pre = getattr(patch, "pre", patch.compressor)
            if pre is not None:
                stack.enter_context(_timed_attr(pre, "compress", trace, "compress_core"))
            llm_c = getattr(patch, "llm_compressor", None)
            if llm_c is not None:  # stage "llm": compression runs inside the LLM's prefill
                stack.enter_context(_timed_attr(llm_c, "compress", trace, "llm_compress"))
            stack.enter_context(timing.recording(_signal_recorder(trace)))
        try:
            yield trace
        finally:
            for h in handles:
                h.remove()
