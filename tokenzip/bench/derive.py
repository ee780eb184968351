"""Columns that compare rows, computed once every rank's rows are in: speed-up, overhead vs oracle (medians, and
paired per repeat), FLOP-ideal speed-up, Amdahl bound, the LLM prefill's measured vs FLOP-ideal speed-up and the
full-depth estimates."""

from __future__ import annotations

import math
import statistics
from typing import Any


def paired_ratio(num: list[float], den: list[float]) -> float:
    """The median over repeats of ``num[i] / den[i]`` (pairs timed in the same repeat), pairs with ``den[i] <= 0``
    left out; NaN when no pair is left. Noise that slows a whole repeat (a shared machine's neighbours) cancels in
    each pair's ratio, which a ratio of separately taken medians does not do."""
    if len(num) != len(den):
        raise ValueError(f"paired timings need one value per repeat on both sides, got {len(num)} and {len(den)}")
    ratios = [a / b for a, b in zip(num, den) if b > 0]
    return statistics.median(ratios) if ratios else float("nan")


def oracle_ttft_per_repeat(o: dict[str, Any], m: dict[str, Any] | None, base: dict[str, Any]) -> list[float] | None:
    """The oracle's TTFT of each repeat, built as :func:`finalize` builds its median ``ttft_s`` but from that
    repeat's own measurements: the oracle's LLM call, plus (unless a replay, which measured its own encoder) the
    encoder time of the uncompressed call of the same repeat (``base``: the interleaved baseline, whose
    ``timings`` lists its repeats; a baseline without them contributes its median), plus for ``exact`` oracles the
    method call's projector time of the same repeat. ``o["timings"]`` must be the oracle's raw per-repeat timings
    (before :func:`finalize` rewrites the medians). None when the rows carry no per-repeat timings."""
    ot = o.get("timings")
    if not ot or not ot.get("ttft_s"):
        return None
    n = len(ot["ttft_s"])
    mt = (m or {}).get("timings") or {}

    def per(t: dict[str, Any], key: str, fallback: float) -> list[float]:
        vals = t.get(key)
        return list(vals) if vals is not None and len(vals) == n else [fallback] * n

    llm = list(ot["ttft_s"])
    kind = o.get("oracle_kind")
    if kind == "replay":
        return llm
    base_enc = per(base.get("timings") or {}, "encoder_s", base["encoder_s"])
    if kind == "reduced-input":  # same rule as the medians: its own encoder time when it ran one, else the method's
        o_enc = per(ot, "encoder_s", 0.0)
        m_enc = per(mt, "encoder_s", m["encoder_s"] if m is not None else 0.0)
        return [t if e > 0 else t + me for t, e, me in zip(llm, o_enc, m_enc)]
    proj = per(mt, "projector_s", m.get("projector_s", 0.0) if m is not None else 0.0) \
        if kind == "exact" and m is not None else [0.0] * n
    return [t + e + p for t, e, p in zip(llm, base_enc, proj)]


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

    # paired overhead: the oracle's per-repeat TTFT from its raw timings, before the medians below are rewritten
    paired = {}
    for key, o in oracles.items():
        m = methods_by_point.get(key)
        o_ttft = oracle_ttft_per_repeat(o, m, baseline(o))
        m_ttft = ((m or {}).get("timings") or {}).get("ttft_s")
        if o_ttft is not None and m_ttft is not None and len(m_ttft) == len(o_ttft):
            paired[key] = paired_ratio(list(m_ttft), o_ttft)
    for key, o in oracles.items():
        m = methods_by_point.get(key)
        if o.get("oracle_kind") == "replay":  # it ran its own (reduced) encoder: every stage is measured
            continue
        enc = baseline(o)["encoder_s"]
        if o.get("oracle_kind") == "reduced-input":
            # the reduced call encodes the smaller input itself (pixels: its own encoder time), or carries features
            # the method encoded from the reduced input (that encoder time is the method's own measured one)
            enc = o["encoder_s"] if o["encoder_s"] > 0 else (m["encoder_s"] if m is not None else enc)
            o["llm_ttft_s"] -= o["encoder_s"]
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

    def enc_scale(r: dict[str, Any]) -> float:
        # the encoder scales with its FLOPs at full depth (= the layer ratio, unless an encoder-stage method's layers
        # after its cut run on fewer tokens)
        return r["encoder_flops_full"] / r["encoder_flops"] if r.get("encoder_flops") else s_enc

    def full_est(r: dict[str, Any]) -> float:
        return r["encoder_s"] * enc_scale(r) + r["compress_s"] + r["prefill_s"] * llm_scale(r) + r["other_s"]

    p = none["prefill_s"] / none["ttft_s"] if none["ttft_s"] > 0 else 0.0
    p_full = none["prefill_s"] * llm_scale(none) / full_est(none) if full_est(none) > 0 else 0.0
    for r in rows:
        o = oracles.get((r["method"], r["retain"]), r if r["kind"] == "oracle" else None)
        b = baseline(r)
        r["speedup"] = b["ttft_s"] / r["ttft_s"] if r["ttft_s"] > 0 else float("nan")
        if r["kind"] == "none":
            r["overhead_vs_oracle"] = r["overhead_vs_oracle_paired"] = 1.0
            r["oracle_speedup"] = 1.0
        else:
            r["overhead_vs_oracle"] = r["ttft_s"] / o["ttft_s"] if o and o["ttft_s"] > 0 else float("nan")
            # method and oracle timed in the same repeat: the median of the per-repeat ratios (the oracle row: 1)
            r["overhead_vs_oracle_paired"] = (1.0 if r["kind"] == "oracle"
                                              else paired.get((r["method"], r["retain"]), float("nan")))
            r["oracle_speedup"] = b["ttft_s"] / o["ttft_s"] if o and o["ttft_s"] > 0 else float("nan")
        r["flop_speedup"] = none["flops"] / r["flops"] if r["flops"] else float("nan")
        # encoder FLOPs the row saves vs the uncompressed tower (stage "encoder" only; pre-LLM methods save none)
        r["encoder_flops_saved"] = none["encoder_flops"] - r["encoder_flops"]
        r["encoder_flops_saved_frac"] = (r["encoder_flops_saved"] / none["encoder_flops"]
                                         if none["encoder_flops"] else 0.0)
        r["llm_flop_speedup"] = none["llm_flops"] / r["llm_flops"] if r["llm_flops"] else float("nan")
        # the LLM prefill alone, measured (vs the interleaved uncompressed prefill) next to its FLOP-ideal speed-up
        r["prefill_speedup"] = b["prefill_s"] / r["prefill_s"] if r["prefill_s"] > 0 else float("nan")
        r["prefill_vs_ideal"] = (r["prefill_speedup"] / r["llm_flop_speedup"]
                                 if math.isfinite(r["llm_flop_speedup"]) and r["llm_flop_speedup"] > 0
                                 else float("nan"))
        s = r["llm_flop_speedup"]
        s_full = none["llm_flops_full"] / r["llm_flops_full"] if r.get("llm_flops_full") else s
        # Amdahl: only the LLM prefill (fraction p of the uncompressed TTFT) can shrink, at best by its FLOP ratio
        r["amdahl_bound"] = 1.0 / ((1.0 - p) + p / s) if math.isfinite(s) and s > 0 else float("nan")
        r["amdahl_limit"] = 1.0 / (1.0 - p) if p < 1 else float("inf")
        if s_enc != 1.0 or s_llm != 1.0:
            if r["kind"] != "oracle" or r.get("oracle_kind") == "replay":
                est = full_est(r)
            else:  # the oracle's encoder is the uncompressed one
                est = b["encoder_s"] * s_enc + r["prefill_s"] * llm_scale(r) + r["other_s"]
            r["ttft_full_est_s"] = est
            base_est = full_est({**b, "llm_flops": none.get("llm_flops"), "llm_flops_full": none.get("llm_flops_full")})
            r["speedup_full_est"] = base_est / est if est > 0 else float("nan")
            r["amdahl_bound_full"] = (1.0 / ((1.0 - p_full) + p_full / s_full)
                                      if math.isfinite(s_full) and s_full > 0 else float("nan"))
    for r in rows:
        if r["kind"] == "method":
            o = oracles.get((r["method"], r["retain"]))
            r["oracle_prefill_speedup"] = o["prefill_speedup"] if o else float("nan")
        if "ttft_full_est_s" in r and r["kind"] == "method":
            o = oracles.get((r["method"], r["retain"]))
            r["overhead_full_est"] = r["ttft_full_est_s"] / o["ttft_full_est_s"] if o else float("nan")
    order = {"none": 0, "method": 1, "oracle": 2}
    rows.sort(key=lambda r: (r["kind"] != "none", r["method"], -r["retain"], order[r["kind"]]))
    return rows
