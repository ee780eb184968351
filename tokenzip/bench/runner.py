"""The sweep: methods x budgets on one model, each point timed against the uncompressed model and its oracle.

Work items are the uncompressed model (``none``) and every (method, retain) point. A point is measured as
``warmup`` discarded pairs, then ``repeats`` pairs of

1. the method: ``generate()`` with the compressor installed (encoder, compression and the LLM all run);
2. its oracle: the stock model fed exactly the arguments the method handed to the model (the shortened prompt and
   the kept/merged tokens as precomputed ``mm_encoder_outputs``), so the LLM sees the very same tokens while no
   compression runs. The encoder still has to run in reality; the oracle's TTFT is that LLM call plus the
   uncompressed model's measured encoder time.

Every repeat of a point also re-runs the uncompressed model (``none``) right before the method, so speed-up and the
oracle's encoder time are ratios/values of measurements taken side by side: on a shared machine whose speed drifts
during a sweep, a single baseline measured at the start would make later points look faster or slower than they
are. The ``none`` row itself is the separate measurement at the start of the sweep.

Reported values are medians over the repeats (peak memory: the maximum). Derived columns (speed-up, overhead,
FLOP-ideal, Amdahl bound) are computed once all rows are in, so torchrun ranks can measure items independently.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..base import Compressor
from . import flops as F
from .instrument import Clock, PeakMemory, TokenStamps, Trace, clock_for, find_roles, instrument
from .presets import Built, build

# the uncompressed measurement interleaved with each point
BASELINE_FIELDS = ("ttft_s", "encoder_s", "compress_s", "prefill_s", "other_s")

# Columns that are measurements of time or memory (everything else must be identical across runs and ranks).
TIMING_FIELDS = ("ttft_s", "encoder_s", "compress_s", "prefill_s", "other_s", "decode_s_per_token", "total_s",
                 "llm_ttft_s", "projector_s", "peak_mem_bytes", "overhead_vs_oracle", "speedup", "oracle_speedup",
                 "amdahl_bound", "amdahl_limit", "amdahl_bound_full", "ttft_full_est_s", "speedup_full_est",
                 "overhead_full_est",
                 "timings", "measured_on_rank", "baseline")
GENERATION_KEYS = ("streamer", "max_new_tokens", "min_new_tokens", "do_sample", "pad_token_id", "eos_token_id",
                   "use_cache", "return_dict_in_generate", "output_scores", "generation_config", "num_beams")


@dataclass
class BenchConfig:
    model: str = "tiny"
    methods: Sequence[str | type[Compressor]] | None = None  # None: every registered method the model supports
    retain: Sequence[float] = (0.5, 0.25, 0.1)
    out: str = "bench_out"
    repeats: int = 3
    warmup: int = 1  # discarded uncompressed runs per process before anything is measured
    point_warmup: int = 0  # discarded (method, oracle) pairs per point
    new_tokens: int = 3
    attn: str = "sdpa"
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None
    layers: str | tuple[int, int] | None = None
    seed: int = 0
    quality: str = "auto"  # "dinov2": DINOv2 feature fidelity; "none"; "auto": dinov2 when its weights load,
    # except for tiny presets (smoke tests)
    quality_images: int = 24
    task: str | None = None  # a local VQA task file (JSONL/Parquet), needs a checkpoint with a processor
    task_limit: int | None = None
    progress: bool = True
    command: str = ""
    clock: Callable[[], float] | None = field(default=None, repr=False)  # inject a fake clock (tests)

    def validate(self) -> None:
        if not self.retain:
            raise ValueError("retain must list at least one fraction in (0, 1]")
        for r in self.retain:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < float(r) <= 1.0:
                raise ValueError(f"retain values must be in (0, 1], got {r!r}")
        for name, lo in (("repeats", 1), ("warmup", 0), ("point_warmup", 0), ("new_tokens", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be an int >= 1, got {self.threads!r}")
        if self.quality not in ("auto", "dinov2", "none"):
            raise ValueError(f"quality must be auto, dinov2 or none, got {self.quality!r}")


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
    with torch.no_grad(), (compressor(model) if compressor is not None else nullcontext()) as patch:
        with instrument(model, trace, patch, capture=capture, record_llm_inputs=record), mem:
            trace.start = clock.stamp()
            model.generate(**inputs, **gen)
            trace.end = clock.stamp()
    clock.sync()
    trace.peak_mem = mem.peak
    if capture and trace.captured is not None:
        trace.captured = oracle_inputs(trace.captured)
    return trace


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
    out["timings"] = {k: [s[k] for s in stages] for k in ("ttft_s", "encoder_s", "compress_s", "prefill_s")}
    return out


def _media_token_ids(config: Any) -> dict[str, int]:
    out = {}
    for mod, names in (("image", ("image_token_id", "image_token_index")),
                       ("video", ("video_token_id", "video_token_index")),
                       ("audio", ("audio_token_id", "audio_token_index"))):
        for n in names:
            v = getattr(config, n, None)
            if isinstance(v, int):
                out[mod] = v
                break
    return out


def _media_counts(built: Built) -> dict[str, int]:
    ids = built.inputs.get("input_ids")
    if ids is None:
        return {}
    counts = {m: int((ids == t).sum()) for m, t in _media_token_ids(built.model.config).items()}
    return {m: c for m, c in counts.items() if c}


class Shapes:
    """FLOP formula inputs of the built model."""

    def __init__(self, built: Built):
        roles = find_roles(built.model)
        self.vision = F.stack_shape(roles.vision)
        self.llm = F.stack_shape(roles.llm)
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
                "encoder_passes": list(trace.encoder_passes)}


def _kept_hash(compressor: Compressor) -> str:
    h = hashlib.sha1()
    for sample in compressor.last_stats:
        for mod in sorted(sample):
            for it in sample[mod].items:
                h.update(mod.encode())
                h.update(json.dumps(it.source.tolist()).encode())
    return h.hexdigest()[:16]


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
    m_traces, o_traces, b_traces = [], [], []
    for i in range(cfg.point_warmup + cfg.repeats):
        tb = call(built.model, built.inputs, clock=clock, new_tokens=cfg.new_tokens, device=cfg.device)
        tm = call(built.model, built.inputs, clock=clock, new_tokens=cfg.new_tokens, compressor=comp, capture=True,
                  device=cfg.device)
        if tm.captured is None and comp.info.stage == "llm":
            tm.captured = kept_inputs(built.model, built.inputs, comp)
        if tm.captured is None:
            raise RuntimeError(f"{item.method}: the compressor did not run (no media found in the inputs)")
        # the oracle generates one token: its decode steps are the method's (same kept tokens, same cache)
        to = call(built.model, tm.captured, clock=clock, new_tokens=1, device=cfg.device)
        if i >= cfg.point_warmup:
            b_traces.append(tb)
            m_traces.append(tm)
            o_traces.append(to)
    t_in, t_out, per = _tokens(comp)
    common = {"method": item.method, "retain": float(item.retain), "tokens_in": t_in, "tokens_out": t_out,
              "oracle_kind": "kept-at-input" if comp.info.stage == "llm" else "exact",
              "tokens_by_modality": per, "kept_hash": _kept_hash(comp), "family": comp.info.family,
              "stage": comp.info.stage, "query_aware": comp.info.query_aware}
    mrow = {"kind": "method", **common, **_median(m_traces),
            **shapes.row(m_traces[-1], comp if comp.info.stage == "llm" else None)}
    mrow["llm_ttft_s"] = mrow["ttft_s"]
    base = _median(b_traces)
    mrow["baseline"] = {k: base[k] for k in BASELINE_FIELDS}  # the uncompressed model, interleaved with this point
    orow = {"kind": "oracle", **common, **_median(o_traces), **shapes.row(o_traces[-1])}
    orow["llm_ttft_s"] = orow["ttft_s"]  # the LLM call alone; the encoder time is added in finalize()
    orow["decode_s_per_token"] = mrow["decode_s_per_token"]  # not re-measured (see above)
    # the oracle's FLOPs: the same encoder passes as the method (the encoder still runs), its own LLM call
    for k in ("encoder_flops", "encoder_flops_full", "encoder_passes"):
        orow[k] = mrow[k]
    orow["flops"] = orow["encoder_flops"] + orow["llm_flops"]
    orow["flops_full"] = orow["encoder_flops_full"] + orow["llm_flops_full"]
    return [mrow, orow]


# ---- derived columns -----------------------------------------------------------------------------------------------
def finalize(rows: list[dict[str, Any]], built_scale: dict[str, float]) -> list[dict[str, Any]]:
    """Add the columns that compare rows: speed-up, overhead vs oracle, FLOP-ideal speed-up, Amdahl bound, and the
    full-depth estimates. Rows come back in a canonical order (none first, then by method and descending retain)."""
    none = next((r for r in rows if r["kind"] == "none"), None)
    if none is None:
        raise RuntimeError("the uncompressed row is missing")
    oracles = {(r["method"], r["retain"]): r for r in rows if r["kind"] == "oracle"}
    # the oracle still runs the encoder (the uncompressed model's measured encoder time) and the projector on the
    # kept tokens (the method call's measured projector time; the captured features are already projected)
    methods_by_point = {(r["method"], r["retain"]): r for r in rows if r["kind"] == "method"}
    def baseline(r: dict[str, Any]) -> dict[str, Any]:
        """The uncompressed measurement to compare ``r`` with: the one interleaved with its point when there is."""
        m = methods_by_point.get((r["method"], r["retain"])) if r["kind"] != "none" else None
        return (m or {}).get("baseline") or none

    for key, o in oracles.items():
        m = methods_by_point.get(key)
        enc = baseline(o)["encoder_s"]
        o["encoder_s"] = enc
        o["compress_s"] = 0.0
        o["projector_s"] = m["projector_s"] if m is not None and o.get("oracle_kind") == "exact" else 0.0
        o["ttft_s"] = o["llm_ttft_s"] + enc + o["projector_s"]
        o["other_s"] = o["ttft_s"] - o["encoder_s"] - o["prefill_s"]
    s_enc = built_scale.get("vision", 1.0)
    s_llm = built_scale.get("text", 1.0)

    def llm_scale(r: dict[str, Any]) -> float:
        # the prefill scales with the LLM's FLOPs at full depth (= the layer ratio for pre-LLM methods; LLM-stage
        # methods prune at the layers their full-depth schedule names, which a cut model cannot reproduce)
        return r["llm_flops_full"] / r["llm_flops"] if r.get("llm_flops") else s_llm

    def full_est(r: dict[str, Any]) -> float:
        return r["encoder_s"] * s_enc + r["compress_s"] + r["prefill_s"] * llm_scale(r) + r["other_s"]

    p = none["prefill_s"] / none["ttft_s"] if none["ttft_s"] > 0 else 0.0
    p_full = none["prefill_s"] * llm_scale(none) / full_est(none) if full_est(none) > 0 else 0.0
    for r in rows:
        o = oracles.get((r["method"], r["retain"]), r if r["kind"] == "oracle" else None)
        b = baseline(r)
        r["speedup"] = b["ttft_s"] / r["ttft_s"] if r["ttft_s"] > 0 else float("nan")
        if r["kind"] == "none":
            r["overhead_vs_oracle"] = 1.0
            r["oracle_speedup"] = 1.0
        else:
            r["overhead_vs_oracle"] = r["ttft_s"] / o["ttft_s"] if o and o["ttft_s"] > 0 else float("nan")
            r["oracle_speedup"] = b["ttft_s"] / o["ttft_s"] if o and o["ttft_s"] > 0 else float("nan")
        r["flop_speedup"] = none["flops"] / r["flops"] if r["flops"] else float("nan")
        r["llm_flop_speedup"] = none["llm_flops"] / r["llm_flops"] if r["llm_flops"] else float("nan")
        s = r["llm_flop_speedup"]
        s_full = none["llm_flops_full"] / r["llm_flops_full"] if r.get("llm_flops_full") else s
        # Amdahl: only the LLM prefill (fraction p of the uncompressed TTFT) can shrink, at best by its FLOP ratio
        r["amdahl_bound"] = 1.0 / ((1.0 - p) + p / s) if math.isfinite(s) and s > 0 else float("nan")
        r["amdahl_limit"] = 1.0 / (1.0 - p) if p < 1 else float("inf")
        if s_enc != 1.0 or s_llm != 1.0:
            est = full_est(r) if r["kind"] != "oracle" else (b["encoder_s"] * s_enc
                                                            + r["prefill_s"] * llm_scale(r) + r["other_s"])
            r["ttft_full_est_s"] = est
            base_est = full_est({**b, "llm_flops": none.get("llm_flops"), "llm_flops_full": none.get("llm_flops_full")})
            r["speedup_full_est"] = base_est / est if est > 0 else float("nan")
            r["amdahl_bound_full"] = (1.0 / ((1.0 - p_full) + p_full / s_full)
                                      if math.isfinite(s_full) and s_full > 0 else float("nan"))
    for r in rows:
        if "ttft_full_est_s" in r and r["kind"] == "method":
            o = oracles.get((r["method"], r["retain"]))
            r["overhead_full_est"] = r["ttft_full_est_s"] / o["ttft_full_est_s"] if o else float("nan")
    order = {"none": 0, "method": 1, "oracle": 2}
    rows.sort(key=lambda r: (r["kind"] != "none", r["method"], -r["retain"], order[r["kind"]]))
    return rows


# ---- environment ---------------------------------------------------------------------------------------------------
def environment(built: Built, cfg: BenchConfig, world: int) -> dict[str, Any]:
    import transformers

    from .. import __version__

    if torch.device(cfg.device).type == "cuda":
        device_name = torch.cuda.get_device_name(torch.device(cfg.device))
    else:
        device_name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        device_name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenzip": __version__,
            "python": platform.python_version(), "platform": platform.platform(), "device": cfg.device,
            "device_name": device_name, "threads": torch.get_num_threads(), "dtype": str(cfg.dtype),
            "attn_implementation": getattr(built.model.config, "_attn_implementation", cfg.attn),
            "world_size": world, "preset": built.preset, "model_class": type(built.model).__name__,
            "layers_built": built.layers_built, "layers_full": built.layers_full, "new_tokens": cfg.new_tokens,
            "repeats": cfg.repeats, "warmup": cfg.warmup, "point_warmup": cfg.point_warmup}


# ---- methods -------------------------------------------------------------------------------------------------------
def resolve_methods(model: torch.nn.Module, wanted: Sequence[str | type[Compressor]] | None
                    ) -> tuple[list[tuple[str, type[Compressor]]], dict[str, str]]:
    """(name, class) of the methods to run and, for the others, why they are skipped."""
    from ..adapters import adapter_for
    from ..methods import METHODS
    from ..registry import method_class

    try:
        adapter = adapter_for(model)
    except TypeError as e:
        adapter = None
        why = str(e)
    if wanted is None:
        classes = list(METHODS)
    else:
        classes = [method_class(w) if isinstance(w, str) else w for w in wanted]
        for c in classes:
            if not (isinstance(c, type) and issubclass(c, Compressor)):
                raise TypeError(f"methods must be names or Compressor subclasses, got {c!r}")
    run, skipped = [], {}
    for c in classes:
        name = c.info.name
        if adapter is None:
            skipped[name] = why
        elif c.info.stage not in adapter.stages:
            skipped[name] = f"stage {c.info.stage} not supported by {type(adapter).__name__}"
        elif not set(c.info.modalities) & set(adapter.modalities):
            skipped[name] = f"modalities {list(c.info.modalities)} not in {list(adapter.modalities)}"
        else:
            run.append((name, c))
    return run, skipped


# ---- the sweep -----------------------------------------------------------------------------------------------------
def run_bench(cfg: BenchConfig, built: Built | None = None) -> dict[str, Any]:
    """Run the sweep, write ``results.jsonl``, ``report.md`` and the plots into ``cfg.out`` (rank 0), and return
    ``{"rows": [...], "env": {...}, "skipped": {...}, "quality": [...]}`` (rank 0; other ranks get their shard)."""
    from . import dist

    cfg.validate()
    ctx = dist.setup(cfg.device)
    if cfg.device.startswith("cuda") and ctx.world > 1:
        cfg.device = f"cuda:{ctx.local_rank}"
    torch.set_num_threads(cfg.threads or dist.default_threads(ctx))
    if built is None:
        built = build(cfg.model, attn=cfg.attn, dtype=cfg.dtype, device=cfg.device, layers=cfg.layers, seed=cfg.seed)
    clock = Clock(cfg.clock) if cfg.clock is not None else clock_for(cfg.device)
    shapes = Shapes(built)
    methods, skipped = resolve_methods(built.model, cfg.methods)
    items = [Item("none", 1.0)] + [Item(n, float(r), c) for n, c in methods for r in cfg.retain]
    mine = items[ctx.rank::ctx.world]
    rows: list[dict[str, Any]] = []
    bar = _progress(len(mine), cfg.progress and ctx.rank == 0, f"bench {built.preset}")
    t0 = time.perf_counter()
    warm_up(built, cfg, clock)
    failed: dict[str, str] = {}
    for it in mine:
        if bar is not None:
            bar.set_postfix_str(f"{it.method} r={it.retain:g}")
        if it.method == "none":
            new = measure_none(built, cfg, clock, shapes)
        else:
            try:
                new = measure_point(built, it, cfg, clock, shapes)
            except (ValueError, TypeError, RuntimeError) as e:  # e.g. an LLM-stage schedule needing more layers
                failed[it.method] = f"failed at retain {it.retain:g}: {e}"
                new = []
        for r in new:
            r["measured_on_rank"] = ctx.rank
        rows += new
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0

    quality: list[dict[str, Any]] = []
    q_note = ""
    t1 = time.perf_counter()
    if cfg.quality == "dinov2" or (cfg.quality == "auto" and not built.preset.startswith("tiny")):
        from . import fidelity

        names = [n for n, _ in methods] if cfg.methods is not None else None
        try:
            quality = fidelity.run_fidelity(names, cfg.retain, n_images=cfg.quality_images, rank=ctx.rank,
                                            world=ctx.world, progress=cfg.progress and ctx.rank == 0)
        except fidelity.Unavailable as e:
            if cfg.quality == "dinov2":
                raise
            q_note = str(e)
    accuracy: list[dict[str, Any]] = []
    if cfg.task:
        from .tasks import run_task_sweep

        accuracy = run_task_sweep(built, cfg.task, methods, cfg.retain, limit=cfg.task_limit, rank=ctx.rank,
                                  world=ctx.world, new_tokens=16)

    gathered = dist.gather(ctx, {"rows": rows, "quality": quality, "accuracy": accuracy, "elapsed": elapsed,
                                 "quality_elapsed": time.perf_counter() - t1, "failed": failed})
    env = environment(built, cfg, ctx.world)
    if ctx.rank != 0:
        dist.barrier(ctx)
        dist.teardown(ctx)
        return {"rows": rows, "env": env, "skipped": skipped, "quality": quality}
    all_rows = [r for g in gathered for r in g["rows"]]
    all_quality = [r for g in gathered for r in g["quality"]]
    all_acc = [r for g in gathered for r in g["accuracy"]]
    for g in gathered:
        skipped.update(g["failed"])
    all_rows = finalize(all_rows, built.scale)
    for r in all_rows:
        r["env"] = env
    result = {"rows": all_rows, "env": env, "skipped": skipped, "quality": all_quality, "accuracy": all_acc,
              "quality_note": q_note, "elapsed_s": max(g["elapsed"] for g in gathered),
              "quality_elapsed_s": max(g["quality_elapsed"] for g in gathered),
              "preset_notes": built.notes, "preset_source": built.source, "scale": built.scale,
              "command": cfg.command, "config": {k: v for k, v in asdict(cfg).items() if k != "clock"}}
    from .report import write_outputs

    write_outputs(result, cfg.out)
    dist.barrier(ctx)
    dist.teardown(ctx)
    return result


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="point")
