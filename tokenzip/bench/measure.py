"""One measured point: timed ``generate()`` calls of the uncompressed model, a method and its oracle, turned into
rows of medians (see :mod:`tokenzip.bench.sweep` for how points are scheduled and :mod:`tokenzip.bench.derive` for
the columns that compare rows)."""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from ..base import Compressor
from ..encoder import CompressStep
from . import flops as F
from .config import BASELINE_FIELDS, BenchConfig
from .instrument import Clock, PeakMemory, TokenStamps, Trace, find_roles, instrument
from .presets import Built
from .replay import Replay, is_encoder_stage, recording

GENERATION_KEYS = ("streamer", "max_new_tokens", "min_new_tokens", "do_sample", "pad_token_id", "eos_token_id",
                   "use_cache", "return_dict_in_generate", "output_scores", "generation_config", "num_beams")


# how each stage's oracle is built: "exact" = the stock model fed the kept tokens (+ the uncompressed encoder time),
# "kept-at-input" = an LLM-stage method's final kept tokens fed from the LLM's input (a bound it cannot reach),
# "replay" = an encoder-stage method's own reduced encoder run, fed its recorded outputs (tokenzip.bench.replay)
# input stage: the stock model on the reduced call the method built (a smaller image, or the base view's features)
ORACLE_KIND = {"input": "reduced-input", "pre_llm": "exact", "llm": "kept-at-input", "encoder": "replay"}


class NothingCompressed(Exception):
    """A method point that compressed nothing (no item of its modalities, or every item kept at its full count):
    reported as skipped with this reason, never as a method row."""


# ---- one call ------------------------------------------------------------------------------------------------------
def _gen_kwargs(model: torch.nn.Module, n: int, streamer: Any) -> dict[str, Any]:
    cfg = getattr(model, "generation_config", None)
    pad = getattr(cfg, "pad_token_id", None)
    if pad is None:
        pad = getattr(cfg, "eos_token_id", None)
        pad = pad[0] if isinstance(pad, list) else pad
    kw = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "streamer": streamer}
    if pad is not None:
        kw["pad_token_id"] = pad
    return kw


def call(model: torch.nn.Module, inputs: dict[str, Any], *, clock: Clock, new_tokens: int,
         compressor: Compressor | None = None, capture: bool = False, record: bool = False,
         device: str = "cpu") -> Trace:
    """One timed ``generate()``: with ``compressor`` installed, or the stock model on ``inputs``."""
    trace = Trace(clock)
    streamer = TokenStamps(trace)
    gen = _gen_kwargs(model, new_tokens, streamer)
    mem = PeakMemory(device)
    steps = timed_steps(compressor, trace) if is_encoder_stage(compressor) else nullcontext()
    with torch.no_grad(), steps, (compressor(model) if compressor is not None else nullcontext()) as patch:
        with instrument(model, trace, patch, capture=capture, record_llm_inputs=record), mem:
            trace.start = clock.stamp()
            model.generate(**inputs, **gen)
            trace.end = clock.stamp()
    clock.sync()
    trace.peak_mem = mem.peak
    if capture and trace.captured is not None:
        trace.captured = oracle_inputs(trace.captured)
    return trace


@contextmanager
def timed_steps(compressor: Compressor, trace: Trace) -> Iterator[None]:
    """Time a schedule's earlier cuts as the method's own work (``compress_core``, like its last cut): the patch
    hands the adapter ``compressor.step`` when it is created, so the timer goes on before that (restored on exit)."""
    orig = getattr(compressor, "step", None)
    if orig is None:
        yield
        return
    had = "step" in vars(compressor)

    def step(*args: Any, **kwargs: Any):
        a = trace.clock.stamp()
        out = orig(*args, **kwargs)
        trace.add("compress_core", a, trace.clock.stamp())
        return out

    compressor.step = CompressStep(step, orig.count)
    try:
        yield
    finally:
        if had:
            compressor.step = orig
        else:
            del compressor.step


def oracle_inputs(captured: dict[str, Any]) -> dict[str, Any]:
    """The model arguments a Patch produced (shortened prompt + precomputed kept tokens), without the generation
    settings of the call they came from."""
    return {k: v for k, v in captured.items() if k not in GENERATION_KEYS}


def kept_inputs(model: torch.nn.Module, inputs: dict[str, Any], compressor: Compressor) -> dict[str, Any]:
    """Oracle inputs for an LLM-stage method: the final kept tokens of each item (``last_stats``) fed from the
    LLM's input, through the adapter's own encode/rebuild. This is a bound the method cannot reach (it drops the
    tokens only after its first layers), so it is marked ``oracle_kind = "kept-at-input"`` in the rows."""
    from .. import ops
    from ..adapters import adapter_for

    adapter = adapter_for(model)
    with torch.no_grad():
        items = adapter.encode(dict(inputs), frozenset())
        stats = [it for sample in compressor.last_stats for ms in sample.values() for it in ms.items]
        if len(stats) != len(items):
            raise RuntimeError(f"{compressor.info.name}: {len(stats)} compressed items for {len(items)} encoded ones")
        outs = [ops.select(item.tokens.unsqueeze(0), st.index.unsqueeze(0).to(item.tokens.device))
                for item, st in zip(items, stats)]
        return oracle_inputs(adapter.rebuild(dict(inputs), items, outs))


# ---- aggregation ---------------------------------------------------------------------------------------------------
def _median(traces: list[Trace]) -> dict[str, float]:
    stages = [t.stages() for t in traces]
    out = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
    out["peak_mem_bytes"] = max(t.peak_mem for t in traces)
    out["timings"] = {k: [s[k] for s in stages] for k in ("ttft_s", "encoder_s", "compress_s", "prefill_s",
                                                         "projector_s")}
    return out


def _media_counts(built: Built) -> dict[str, int]:
    """Placeholder tokens per modality in the prompt (the media token ids the model's adapter names)."""
    from ..adapters import adapter_for

    ids = built.inputs.get("input_ids")
    if ids is None:
        return {}
    try:
        token_ids = adapter_for(built.model).parts().media_token_ids
    except TypeError:  # no adapter: nothing tokenzip could compress, nothing to count
        return {}
    counts, seen = {}, set()
    for m, t in token_ids.items():  # a token id two modalities share (InternVL's frames are tiles) counts once
        if t not in seen:
            seen.add(t)
            counts[m] = int((ids == t).sum())
    return {m: c for m, c in counts.items() if c}


class Shapes:
    """FLOP formula inputs of the built model."""

    def __init__(self, built: Built):
        roles = find_roles(built.model)
        self.vision = F.stack_shape(roles.encoder_layers)
        self.llm = F.stack_shape(roles.llm_layers)
        tc = getattr(built.model.config, "text_config", built.model.config)
        self.d_model = int(getattr(tc, "hidden_size", 0) or 0)
        self.vocab = int(getattr(tc, "vocab_size", 0) or 0)
        self.full = built.layers_full

    def row(self, trace: Trace, llm_method: Compressor | None = None) -> dict[str, float]:
        n = trace.llm_calls[0]["length"] if trace.llm_calls else 0
        batch = 1
        enc = F.encoder_flops(self.vision, trace.encoder_passes)
        llm = F.llm_prefill_flops(self.llm, n, self.d_model, self.vocab, batch=batch)
        enc_full = F.encoder_flops(self.vision, trace.encoder_passes, self.full.get("vision"))
        extra: dict[str, Any] = {}
        if trace.encoder_layer_calls:  # stage "encoder": each layer on its own token count
            enc = F.encoder_flops_per_layer(self.vision, trace.encoder_layer_calls)
            enc_full = F.encoder_flops_per_layer(self.vision, trace.encoder_layer_calls, self.full.get("vision"))
            extra["encoder_layer_tokens"] = F.layer_tokens(trace.encoder_layer_calls)
        llm_full = F.llm_prefill_flops(self.llm, n, self.d_model, self.vocab, self.full.get("text"), batch=batch)
        if llm_method is not None and self.llm is not None and hasattr(llm_method, "schedule"):
            items = [it.tokens_in for s in llm_method.last_stats for ms in s.values() for it in ms.items]
            per = {}
            for key, layers in (("built", self.llm.layers), ("full", self.full.get("text", self.llm.layers))):
                lengths = F.scheduled_lengths(n, items, llm_method.schedule, layers)
                per[key] = F.llm_prefill_flops_per_layer(self.llm, lengths, self.d_model, self.vocab)
            llm, llm_full = per["built"], per["full"]
        return {"encoder_flops": enc, "llm_flops": llm, "flops": enc + llm, "encoder_flops_full": enc_full,
                "llm_flops_full": llm_full, "flops_full": enc_full + llm_full, "llm_seq_len": n,
                "encoder_passes": list(trace.encoder_passes), **extra}


def check_compressed(compressor: Compressor) -> None:
    """:class:`NothingCompressed` when the last call compressed nothing: no media item of a modality the method
    compresses, or (below retain 1) every item kept at its full count."""
    mods = compressor.info.modalities
    items = [(mod, it) for sample in compressor.last_stats for mod, ms in sample.items() for it in ms.items]
    mine = [it for mod, it in items if mod in mods]
    if not mine:
        present = sorted({mod for mod, _ in items})
        raise NothingCompressed(f"compresses {list(mods)}, but the inputs carry only {present or 'no'} media")
    budget = getattr(compressor, "budget", None)  # a tz.compose pipeline has no budget of its own: its nominal retain
    retain = getattr(budget, "retain", None) if budget is not None else getattr(compressor, "retain", None)
    if (retain is None or retain < 1.0) and all(it.tokens_out >= it.tokens_in for it in mine):
        raise NothingCompressed(f"kept every {'/'.join(sorted({it.modality for it in mine}))} token "
                                f"({sum(it.tokens_in for it in mine)}): nothing was compressed")


def _kept_hash(compressor: Compressor) -> str:
    h = hashlib.sha1()
    for sample in compressor.last_stats:
        for mod in sorted(sample):
            for it in sample[mod].items:
                h.update(mod.encode())
                h.update(json.dumps(it.source.tolist()).encode())
    return h.hexdigest()[:16]


def _over_budget(compressor: Compressor) -> int:
    """Items given more tokens than their budget (an input-stage method's floor, tokenzip.budget.BudgetFloorWarning);
    the report flags such rows."""
    return sum(it.over_budget for sample in compressor.last_stats for ms in sample.values() for it in ms.items)


def _tokens(compressor: Compressor) -> tuple[int, int, dict[str, list[int]]]:
    per: dict[str, list[int]] = {}
    for sample in compressor.last_stats:
        for mod, ms in sample.items():
            cur = per.setdefault(mod, [0, 0])
            cur[0] += ms.tokens_in
            cur[1] += ms.tokens_out
    return sum(v[0] for v in per.values()), sum(v[1] for v in per.values()), per


# ---- items ---------------------------------------------------------------------------------------------------------
@dataclass
class Item:
    method: str  # "none" or a method name
    retain: float
    cls: type[Compressor] | None = None


def warm_up(built: Built, cfg: BenchConfig, clock: Clock) -> None:
    for _ in range(cfg.warmup):
        call(built.model, built.inputs, clock=clock, new_tokens=cfg.new_tokens, device=cfg.device)


def measure_none(built: Built, cfg: BenchConfig, clock: Clock, shapes: Shapes) -> list[dict[str, Any]]:
    traces = [call(built.model, built.inputs, clock=clock, new_tokens=cfg.new_tokens, device=cfg.device)
              for _ in range(cfg.repeats)]
    counts = _media_counts(built)
    row = {"kind": "none", "method": "none", "retain": 1.0, **_median(traces), **shapes.row(traces[-1]),
           "tokens_in": sum(counts.values()), "tokens_out": sum(counts.values()),
           "tokens_by_modality": {m: [c, c] for m, c in counts.items()}, "kept_hash": ""}
    row["llm_ttft_s"] = row["ttft_s"]
    return [row]


def measure_point(built: Built, item: Item, cfg: BenchConfig, clock: Clock, shapes: Shapes) -> list[dict[str, Any]]:
    comp = item.cls(retain=item.retain)
    in_encoder = is_encoder_stage(comp)
    m_traces, o_traces, b_traces = [], [], []
    for i in range(cfg.point_warmup + cfg.repeats):
        tb = call(built.model, built.inputs, clock=clock, new_tokens=cfg.new_tokens, device=cfg.device)
        with (recording(comp) if in_encoder else nullcontext()) as recorded:
            tm = call(built.model, built.inputs, clock=clock, new_tokens=cfg.new_tokens, compressor=comp,
                      capture=True, device=cfg.device)
        if i == 0:  # before building an oracle from items that may not exist (e.g. clips a model's adapter skips)
            check_compressed(comp)
        if comp.info.stage == "llm":  # also a pipeline ending in the LLM: its pre-LLM part's output is not final
            tm.captured = kept_inputs(built.model, built.inputs, comp)
        if tm.captured is None:
            raise RuntimeError(f"{item.method}: the compressor did not run (no media found in the inputs)")
        # the oracle generates one token: its decode steps are the method's (same kept tokens, same cache)
        if in_encoder:  # the same reduced encoder, fed the method's recorded outputs (no signals, no selection)
            to = call(built.model, built.inputs, clock=clock, new_tokens=1, compressor=Replay(comp, recorded),
                      device=cfg.device)
        else:
            to = call(built.model, tm.captured, clock=clock, new_tokens=1, device=cfg.device)
        if i >= cfg.point_warmup:
            b_traces.append(tb)
            m_traces.append(tm)
            o_traces.append(to)
    t_in, t_out, per = _tokens(comp)
    common = {"method": item.method, "retain": float(item.retain), "tokens_in": t_in, "tokens_out": t_out,
              "oracle_kind": ORACLE_KIND.get(comp.info.stage, "exact"),
              "tokens_by_modality": per, "kept_hash": _kept_hash(comp), "family": comp.info.family,
              "over_budget": _over_budget(comp),
              "stage": comp.info.stage, "query_aware": comp.info.query_aware}
    llm_part = comp.parts[-1] if hasattr(comp, "parts") else comp  # a pipeline's LLM stage is its last part
    mrow = {"kind": "method", **common, **_median(m_traces),
            **shapes.row(m_traces[-1], llm_part if comp.info.stage == "llm" else None)}
    mrow["llm_ttft_s"] = mrow["ttft_s"]
    base = _median(b_traces)
    mrow["baseline"] = {k: base[k] for k in BASELINE_FIELDS}  # the uncompressed model, interleaved with this point
    mrow["baseline"]["timings"] = base["timings"]  # per repeat, for the paired overhead (tokenzip.bench.derive)
    orow = {"kind": "oracle", **common, **_median(o_traces), **shapes.row(o_traces[-1])}
    orow["llm_ttft_s"] = orow["ttft_s"]  # exact: the LLM call alone, the encoder time is added in finalize()
    orow["decode_s_per_token"] = mrow["decode_s_per_token"]  # not re-measured (see above)
    # the oracle's FLOPs: the same encoder passes as the method (the encoder still runs), its own LLM call
    for k in ("encoder_flops", "encoder_flops_full", "encoder_passes"):
        orow[k] = mrow[k]
    orow["flops"] = orow["encoder_flops"] + orow["llm_flops"]
    orow["flops_full"] = orow["encoder_flops_full"] + orow["llm_flops_full"]
    return [mrow, orow]
