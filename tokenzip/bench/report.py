"""Writing ``results.jsonl``, ``report.md`` and the PNG plots of a bench run."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

FLOP_FORMULA = """\
FLOPs are analytic (one multiply-add = 2 FLOPs), for the token counts of each row. Per layer with `P` weights in its
linear layers (counted from the built model's first layer), attention width `d` and `n` tokens:
`2·P·n` for the weight matmuls, plus `4·n²·d` attention FLOPs in the (bidirectional) encoder and `2·n·(n+1)·d` in the
causal LLM prefill. Encoder = sum over its passes (one per image/crop); LLM = prefill of the whole prompt plus the LM
head for one position (`2·d_model·vocab`). Norms, activations, softmax, rotary embeddings, patch embedding and the
projector are left out (well under 1 %)."""

DEFINITIONS = """\
- **TTFT** (`ttft_s`): wall time from calling `generate()` to the first new token (streamer timestamp). It is split
  into `encoder_s` (vision tower forward, minus the method's own signal probes), `compress_s` (everything the patch
  adds before the LLM: signal probes, scoring, selection, merging, rebuilding the prompt; for methods that prune
  inside the LLM, also their own `compress` calls there), `prefill_s` (the language model's first forward) and
  `other_s` (the rest: the projector — on all tokens in the stock path, on the kept ones after compression —,
  embedding merge, `generate()` bookkeeping, sampling the first token). Methods that compress inside the encoder
  (stage `encoder`, `NAME@encoderL`) run the tower's layers inside the patch: there `encoder_s` is the encoder
  layers' own time (every layer, before and after the cut, minus the signal probe), `compress_s` the method's own
  calls at every cut plus its signals, and the patch embedding, the bookkeeping between cuts, the projector and the
  prompt rebuild are `other_s`.
- **oracle**: the stock model fed exactly the tokens the method kept (its shortened prompt and precomputed
  `mm_encoder_outputs`, captured from the method's own call), so no compression runs; its TTFT is that LLM call plus
  the uncompressed model's encoder time (the encoder still has to run for pre-LLM methods) plus the method call's
  projector time on the kept tokens. For methods that prune inside the LLM the oracle feeds their final kept tokens
  from the input (`oracle_kind = kept-at-input`), a bound they cannot reach by design. For methods that compress
  inside the encoder the oracle is a replay (`oracle_kind = replay`): the same encoder-stage run with a compressor
  that returns the method's recorded outputs of that repeat (kept tokens and merge sources) and asks for no signals,
  so its TTFT is the reduced encoder + the LLM on the same tokens, measured, without the method's own cost.
- `encoder GFLOPs saved`: the uncompressed encoder's FLOPs minus the row's (each encoder layer counted with the
  tokens it ran on; non-zero only for encoder-stage methods).
- `overhead_vs_oracle = TTFT(method) / TTFT(oracle)` (of the medians); `overhead paired`
  (`overhead_vs_oracle_paired`): the median over repeats of `TTFT(method) / TTFT(oracle)` of the same repeat (method
  and oracle calls alternate, so a slow stretch of a shared machine hits both sides of a pair; the oracle's TTFT of a
  repeat is built as its median one, from that repeat's encoder/projector times);
  `speedup = TTFT(none) / TTFT(row)`, where TTFT(none) is the
  uncompressed model re-measured in every repeat of the same point, interleaved with the method (a shared machine's
  speed drifts during a sweep); `flop_speedup = FLOPs(none) / FLOPs(row)` (encoder + LLM); `llm_flop_speedup` is the LLM
  part alone;
  `amdahl_bound = 1 / ((1 - p) + p / llm_flop_speedup)` with `p = prefill_s / ttft_s` of the uncompressed model —
  the best TTFT speed-up if the LLM prefill shrank exactly with its FLOPs and nothing else changed;
  `amdahl_limit = 1 / (1 - p)` (the prefill removed entirely).
- Medians over `repeats` (after `warmup` discarded uncompressed runs per process and `point_warmup` discarded
  pairs per point); method and oracle calls alternate. The oracle generates one token (its decode steps would be
  the method's: same kept tokens, same cache), so its `decode_s_per_token` is the method's. Peak memory: the largest
  increase of the process's peak RSS during a call on CPU (Linux VmHWM, reset before each call), of
  `torch.cuda.max_memory_allocated` on GPU; timing on GPU uses CUDA events. On CPU the allocator re-uses memory it
  already holds, so peak RSS deltas are a rough guide only."""


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return "–"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def _gflops(v: float) -> str:
    return f"{v / 1e9:,.1f}"


def _mb(v: float) -> str:
    return f"{v / 2**20:,.0f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    """A column-aligned plain-text table (``markdown``: a Markdown one), for terminals and ``.md`` files."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if markdown:
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
        return "\n".join([lines[0], "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + lines[1:])
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def _table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _tokens_cell(r: dict[str, Any]) -> str:
    """``in→out``; "(floor: n over budget)" when an input-stage method gave n items more than their budget."""
    cell = f"{r['tokens_in']}→{r['tokens_out']}"
    return cell + (f" (floor: {r['over_budget']} over budget)" if r.get("over_budget") else "")


def main_table(rows: list[dict[str, Any]]) -> str:
    headers = ["method", "retain", "tokens in→out", "TTFT s", "encoder s", "compress s", "prefill s", "other s",
               "decode s/tok", "peak MB", "GFLOPs", "encoder GFLOPs saved", "speed-up", "oracle speed-up",
               "overhead vs oracle", "overhead paired", "oracle", "FLOP-ideal", "Amdahl bound"]
    body = []
    for r in rows:
        if r["kind"] == "oracle":
            continue
        saved = r.get("encoder_flops_saved", 0.0)
        body.append([r["method"], _fmt(r["retain"], 2), _tokens_cell(r), _fmt(r["ttft_s"]),
                     _fmt(r["encoder_s"]), _fmt(r["compress_s"]), _fmt(r["prefill_s"]), _fmt(r["other_s"]),
                     _fmt(r["decode_s_per_token"], 4), _mb(r["peak_mem_bytes"]), _gflops(r["flops"]),
                     f"{_gflops(saved)} ({100 * r.get('encoder_flops_saved_frac', 0.0):.0f} %)" if saved else "0",
                     _fmt(r["speedup"], 2), _fmt(r["oracle_speedup"], 2), _fmt(r["overhead_vs_oracle"], 2),
                     _fmt(r.get("overhead_vs_oracle_paired"), 2),
                     r.get("oracle_kind", "–") if r["kind"] == "method" else "–",
                     _fmt(r["flop_speedup"], 2), _fmt(r["amdahl_bound"], 2)])
    return _table(headers, body)


def video_table(rows: list[dict[str, Any]]) -> str:
    """Time to first token of a clip split into decode (PyAV + preprocessing, before ``generate()``, the same for
    every row) / encoder / compress / prefill / other, with the peak memory and the speed-ups."""
    headers = ["method", "retain", "tokens in→out", "decode s", "encoder s", "compress s", "prefill s", "other s",
               "TTFT s", "TTFT + decode s", "peak MB", "speed-up", "oracle speed-up", "overhead vs oracle",
               "overhead paired", "oracle"]
    body = []
    for r in rows:
        if r["kind"] == "oracle":
            continue
        body.append([r["method"], _fmt(r["retain"], 2), _tokens_cell(r), _fmt(r.get("decode_s")),
                     _fmt(r["encoder_s"]), _fmt(r["compress_s"]), _fmt(r["prefill_s"]), _fmt(r["other_s"]),
                     _fmt(r["ttft_s"]), _fmt(r.get("ttft_with_decode_s")), _mb(r["peak_mem_bytes"]),
                     _fmt(r["speedup"], 2), _fmt(r["oracle_speedup"], 2), _fmt(r["overhead_vs_oracle"], 2),
                     _fmt(r.get("overhead_vs_oracle_paired"), 2),
                     r.get("oracle_kind", "–") if r["kind"] == "method" else "–"])
    return _table(headers, body)


def prefill_table(rows: list[dict[str, Any]]) -> str:
    """The LLM prefill alone: measured speed-up (vs the uncompressed prefill timed side by side) next to the
    FLOP-ideal one (LLM prefill FLOPs of the uncompressed row / this row's) and their ratio."""
    headers = ["method", "retain", "LLM tokens", "prefill s", "prefill speed-up (measured)",
               "prefill speed-up (FLOP-ideal)", "measured / ideal", "oracle prefill speed-up"]
    body = [[r["method"], _fmt(r["retain"], 2), str(r.get("llm_seq_len", "–")), _fmt(r["prefill_s"]),
             _fmt(r.get("prefill_speedup"), 2), _fmt(r.get("llm_flop_speedup"), 2), _fmt(r.get("prefill_vs_ideal"), 2),
             _fmt(r.get("oracle_prefill_speedup"), 2) if r["kind"] == "method" else "–"]
            for r in rows if r["kind"] != "oracle"]
    return _table(headers, body)


def event_table(events: list[dict[str, Any]]) -> str:
    headers = ["tokens from", "method", "stage", "retain", "tokens in→out", "event recall", "event dominant",
               "event tokens kept", "trials"]
    body = [[e.get("encoder", "model"), e["method"], e.get("stage", "–"), _fmt(e["retain"], 2),
             f"{e['tokens_in']}→{e['tokens_out']}",
             _fmt(e["event_recall"], 2), _fmt(e["event_recall_dominant"], 2), _fmt(e["event_kept_fraction"], 2),
             str(e["trials"])] for e in events if "skipped" not in e]
    return _table(headers, body)


def full_table(rows: list[dict[str, Any]], scale: dict[str, float]) -> str:
    headers = ["method", "retain", "TTFT s (est.)", "speed-up (est.)", "oracle speed-up (est.)",
               "overhead vs oracle (est.)", "GFLOPs (full)", "Amdahl bound (full)"]
    oracles = {(r["method"], r["retain"]): r for r in rows if r["kind"] == "oracle"}
    body = []
    for r in rows:
        if r["kind"] == "oracle" or "ttft_full_est_s" not in r:
            continue
        o = oracles.get((r["method"], r["retain"]))
        body.append([r["method"], _fmt(r["retain"], 2), _fmt(r["ttft_full_est_s"]), _fmt(r["speedup_full_est"], 2),
                     _fmt(o["speedup_full_est"], 2) if o else "1.00",
                     _fmt(r.get("overhead_full_est", 1.0), 2), _gflops(r["flops_full"]),
                     _fmt(r.get("amdahl_bound_full"), 2)])
    return _table(headers, body)


def quality_table(quality: list[dict[str, Any]]) -> str:
    headers = ["method", "retain", "tokens", "cosine (mean)", "cosine (min)", "NN agreement", "self-retrieval",
               "token cosine", "token cosine (dropped → nearest)"]
    video = any("frame_cosine" in q for q in quality)
    if video:
        headers += ["frame cosine", "frame cosine (min)"]
    body = [[q["method"], _fmt(q["retain"], 2), f"{q['tokens_in']}→{q['tokens_out']}", _fmt(q["cosine"]),
             _fmt(q["cosine_min"]), _fmt(q["nn_agreement"], 2), _fmt(q["self_retrieval"], 2),
             _fmt(q.get("token_cosine")), _fmt(q.get("token_cosine_nearest"))]
            + ([_fmt(q.get("frame_cosine")), _fmt(q.get("frame_cosine_min"))] if video else [])
            for q in sorted((q for q in quality if "skipped" not in q),
                            key=lambda q: (q.get("base_method", q["method"]), q["method"], -q["retain"]))]
    return _table(headers, body)


def side_by_side_table(rows: list[dict[str, Any]], kept: list[dict[str, Any]], quality: list[dict[str, Any]]) -> str:
    """Every method's time and kept-set fidelity (:func:`tokenzip.bench.fidelity.run_model_fidelity`) side by side,
    with the bare-encoder token cosine (:func:`tokenzip.bench.fidelity.run_fidelity`) where that exists, sorted by
    the kept set's mean token cosine (dropped → nearest)."""
    headers = ["method", "stage", "retain", "tokens", "TTFT s", "speed-up", "oracle speed-up",
               "kept set: cosine (mean)", "NN agreement", "self-retrieval", "token cosine (dropped → nearest)",
               "bare encoder: token cosine (dropped → nearest)"]
    timed = {(r["method"], round(float(r["retain"]), 6)): r for r in rows if r.get("kind", "method") == "method"}
    bare = {(q["method"], round(float(q["retain"]), 6)): q for q in quality if "skipped" not in q}
    body = []
    for q in sorted((q for q in kept if "skipped" not in q),
                    key=lambda q: (-q["token_cosine_nearest"], q["method"], -q["retain"])):
        key = (q["method"], round(float(q["retain"]), 6))
        t = timed.get(key, {})
        b = bare.get(key, {})
        body.append([q["method"], str(t.get("stage", "–")), _fmt(q["retain"], 2),
                     _tokens_cell(t) if t else f"{q['tokens_in']}→{q['tokens_out']}", _fmt(t.get("ttft_s")),
                     _fmt(t.get("speedup"), 2), _fmt(t.get("oracle_speedup"), 2), _fmt(q["cosine"]),
                     _fmt(q["nn_agreement"], 2), _fmt(q["self_retrieval"], 2), _fmt(q["token_cosine_nearest"]),
                     _fmt(b.get("token_cosine_nearest"))])
    return _table(headers, body)


def accuracy_table(acc: list[dict[str, Any]]) -> str:
    headers = ["method", "retain", "n", "exact match", "MC accuracy"]
    body = [[a["method"], _fmt(a["retain"], 2), str(a["n"]), _fmt(a.get("exact_match"), 3),
             _fmt(a.get("mc_accuracy"), 3)] for a in sorted(acc, key=lambda a: (a["method"] != "none", a["method"],
                                                                                  -a["retain"]))]
    return _table(headers, body)


# ---- plots ---------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_method(rows: list[dict[str, Any]], kind: str = "method") -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("kind", kind) == kind and "skipped" not in r:
            out.setdefault(r["method"], []).append(r)
    for v in out.values():
        v.sort(key=lambda r: r["retain"])
    return out


MARKERS = "osD^vP*Xh<>p"


def _style(i: int) -> dict[str, Any]:
    import matplotlib

    slot = (2 * i) % 20 + ((2 * i) // 20) % 2  # the 10 dark hues first, then their light shades
    return {"color": matplotlib.colormaps["tab20"](slot), "marker": MARKERS[i % len(MARKERS)]}


def _retain_axis(ax: Any, retains: list[float]) -> None:
    ax.set_xscale("log")
    ticks = sorted(set(retains))
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.minorticks_off()


def plot_speedup(rows: list[dict[str, Any]], path: str, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, rs) in enumerate(_by_method(rows).items()):
        ax.plot([r["retain"] for r in rs], [r["speedup"] for r in rs], label=name, **_style(i))
    orc: dict[float, list[float]] = {}
    amd: dict[float, float] = {}
    flo: dict[float, float] = {}
    for r in rows:
        if r["kind"] == "oracle":
            orc.setdefault(r["retain"], []).append(r["speedup"])
        if r["kind"] == "method":
            amd[r["retain"]] = r["amdahl_bound"]
            flo[r["retain"]] = r["flop_speedup"]
    xs = sorted(orc)
    if xs:
        ax.plot(xs, [sorted(orc[x])[len(orc[x]) // 2] for x in xs], "k--", lw=2,
                label="oracle (kept tokens fed directly)")
        ax.plot(xs, [amd[x] for x in xs], "k:", lw=2, label="Amdahl bound")
        ax.plot(xs, [flo[x] for x in xs], color="gray", ls="-.", lw=1.5, label="FLOP-ideal (encoder + LLM)")
    ax.axhline(1.0, color="red", lw=1, label="no compression (SDPA)")
    _retain_axis(ax, [r["retain"] for r in rows if r["kind"] != "none"] or [1.0])
    ax.set_xlabel("retain (fraction of visual tokens kept)")
    ax.set_ylabel("TTFT speed-up vs no compression")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_quality(quality: list[dict[str, Any]], acc: list[dict[str, Any]], path: str) -> bool:
    plt = _plt()
    if not quality and not acc:
        return False
    ncols = 2 if quality else 1
    fig, axes = plt.subplots(1, ncols + (1 if acc and quality else 0), figsize=(6.5 * (ncols + bool(acc and quality)),
                                                                                  4.5))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    i = 0
    if quality:
        for key, ax in (("cosine", axes[0]), ("nn_agreement", axes[1])):
            for j, (name, rs) in enumerate(_by_method(quality).items()):
                ax.plot([r["retain"] for r in rs], [r[key] for r in rs], label=name, **_style(j))
            _retain_axis(ax, [r["retain"] for r in quality if "retain" in r])
            ax.set_xlabel("retain")
            ax.set_ylabel({"cosine": "cosine(mean-pooled compressed, full)",
                           "nn_agreement": "nearest-neighbour agreement"}[key])
            ax.set_title(f"DINOv2-S/14 feature fidelity ({quality[0].get('n_images', '?')} real images)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7, ncol=2)
        i = 2
    if acc:
        ax = axes[i] if i < len(axes) else axes[-1]
        for j, (name, rs) in enumerate(_by_method(acc).items()):
            ax.plot([r["retain"] for r in rs], [r.get("mc_accuracy") or r.get("exact_match") or 0 for r in rs],
                    label=name, **_style(j))
        _retain_axis(ax, [r["retain"] for r in acc])
        ax.set_xlabel("retain")
        ax.set_ylabel("task accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_token_fidelity(quality: list[dict[str, Any]], path: str) -> bool:
    """Token-level DINOv2 fidelity vs retain: each method at the tower's output (solid) and its ``NAME@encoderL``
    counterparts (dashed, same colour)."""
    rows = [q for q in quality if "skipped" not in q and q.get("token_cosine") is not None]
    if not rows:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    bases = sorted({q.get("base_method", q["method"]) for q in rows})
    for key, ax in (("token_cosine", axes[0]), ("token_cosine_nearest", axes[1])):
        for name, rs in _by_method(rows).items():
            st = _style(bases.index(rs[0].get("base_method", name)))
            ls = "-" if rs[0].get("cut") is None else ("--" if rs[0]["cut"] >= 6 else ":")
            ax.plot([r["retain"] for r in rs], [r[key] for r in rs], ls=ls, label=name, **st)
        _retain_axis(ax, [r["retain"] for r in rows])
        ax.set_xlabel("retain")
        ax.set_ylabel({"token_cosine": "token cosine (dropped patch = 0)",
                       "token_cosine_nearest": "token cosine (dropped patch → nearest output token)"}[key])
        ax.set_title(f"DINOv2-S/14 per-patch fidelity ({rows[0].get('n_images', '?')} real images)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def pareto_points(rows: list[dict[str, Any]], quality: list[dict[str, Any]], acc: list[dict[str, Any]]
                  ) -> tuple[list[tuple[str, float, float, float]], str]:
    """(method, retain, speed-up, quality) for every measured point with a quality value."""
    if acc:
        q = {(a["method"], a["retain"]): (a.get("mc_accuracy") if a.get("mc_accuracy") is not None
                                          else a.get("exact_match")) for a in acc}
        label = "task accuracy"
    else:
        q = {(a["method"], a["retain"]): a["cosine"] for a in quality if "skipped" not in a}
        label = "DINOv2 fidelity (cosine)"
    pts = [(r["method"], r["retain"], r["speedup"], q[(r["method"], r["retain"])]) for r in rows
           if r["kind"] == "method" and q.get((r["method"], r["retain"])) is not None]
    return pts, label


def pareto_front(pts: list[tuple[str, float, float, float]]) -> list[tuple[str, float, float, float]]:
    """Points no other point beats on both speed-up and quality."""
    return [p for p in pts if not any(o[2] >= p[2] and o[3] >= p[3] and (o[2] > p[2] or o[3] > p[3]) for o in pts)]


def plot_pareto(rows: list[dict[str, Any]], quality: list[dict[str, Any]], acc: list[dict[str, Any]],
                path: str) -> bool:
    pts, label = pareto_points(rows, quality, acc)
    if not pts:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    names = sorted({p[0] for p in pts})
    for i, n in enumerate(names):
        mine = [p for p in pts if p[0] == n]
        st = _style(i)
        ax.scatter([p[2] for p in mine], [p[3] for p in mine], color=st["color"], marker=st["marker"], label=n, s=30)
        for p in mine:
            ax.annotate(f"{p[1]:g}", (p[2], p[3]), fontsize=6, xytext=(2, 2), textcoords="offset points")
    front = sorted(pareto_front(pts), key=lambda p: p[2])
    ax.plot([p[2] for p in front], [p[3] for p in front], "k--", lw=1, label="Pareto front")
    ax.set_xlabel("measured TTFT speed-up vs no compression")
    ax.set_ylabel(label)
    ax.set_title("speed-up vs quality (labels: retain)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- everything ----------------------------------------------------------------------------------------------------
def write_outputs(result: dict[str, Any], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    rows = result["rows"]
    with open(os.path.join(out, "results.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")
    if result.get("events"):
        with open(os.path.join(out, "events.jsonl"), "w") as f:
            for e in result["events"]:
                f.write(json.dumps(e, default=str) + "\n")
    if result.get("quality"):
        with open(os.path.join(out, "quality.jsonl"), "w") as f:
            for q in result["quality"]:
                f.write(json.dumps(q, default=str) + "\n")
    if result.get("kept_quality"):
        with open(os.path.join(out, "kept_quality.jsonl"), "w") as f:
            for q in result["kept_quality"]:
                f.write(json.dumps(q, default=str) + "\n")
    if result.get("accuracy"):
        with open(os.path.join(out, "accuracy.jsonl"), "w") as f:
            for a in result["accuracy"]:
                f.write(json.dumps(a, default=str) + "\n")
    env = result["env"]
    plot_speedup(rows, os.path.join(out, "speedup_vs_retain.png"), f"{env['preset']} on {env['device']}")
    has_q = plot_quality(result.get("quality", []), result.get("accuracy", []),
                         os.path.join(out, "quality_vs_retain.png"))
    has_p = plot_pareto(rows, result.get("quality", []), result.get("accuracy", []), os.path.join(out, "pareto.png"))
    has_t = plot_token_fidelity(result.get("quality", []), os.path.join(out, "token_fidelity_vs_retain.png"))
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(render(result, has_q, has_p, has_t))


def render(result: dict[str, Any], has_quality_plot: bool = False, has_pareto: bool = False,
           has_token_plot: bool = False) -> str:
    env = result["env"]
    rows = result["rows"]
    lines = [f"# tokenzip bench: {env['preset']}", ""]
    if result.get("command"):
        lines += ["Command:", "", "```", result["command"], "```", ""]
    lines += [f"Model `{env['model_class']}` from {result.get('preset_source', '')}. {result.get('preset_notes', '')}.",
              "",
              f"Environment: torch {env['torch']}, transformers {env['transformers']}, tokenzip {env['tokenzip']}, "
              f"device {env['device']} ({env['device_name']}), {env['threads']} threads, dtype {env['dtype']}, "
              f"attention `{env['attn_implementation']}`, {env['world_size']} process(es); "
              f"{env['repeats']} repeats after {env['warmup']} warm-up run(s) per process and "
              f"{env['point_warmup']} per point, {env['new_tokens']} new tokens; "
              f"layers built {env['layers_built']} of {env['layers_full']}; timing sweep took "
              f"{result.get('elapsed_s', 0):.0f} s, quality and accuracy {result.get('quality_elapsed_s', 0):.0f} s.",
              "", "## Measured", "", main_table(rows), ""]
    media = result.get("media") or {}
    if media.get("kind") == "video":
        lines += ["## Video: time to first token from the clip", "",
                  f"Clip `{media['clip']}`: {media['frames']} uniform frames (first and last included) of "
                  f"{media['frame_size'][1]}x{media['frame_size'][0]} px, decoded with PyAV "
                  f"({media['pyav_decode_s']:.3f} s) and preprocessed into the model's pixel tensors "
                  f"({media['preprocess_s']:.3f} s), medians of 3; `decode s` is their sum, work every row "
                  "shares before `generate()`, so `TTFT + decode s` is the time from the file to the first token.",
                  "", video_table(rows), ""]
    lines += ["## LLM prefill: measured vs FLOP-ideal speed-up", "",
              "`prefill speed-up (measured)` = the uncompressed model's LLM prefill time (timed side by side in the "
              "same repeats) / the row's; `FLOP-ideal` = the uncompressed LLM prefill FLOPs / the row's (the LLM "
              "part of `flops.py`: for methods that prune inside the LLM, each layer with its own length); "
              "`measured / ideal` near 1 means the prefill shrank as its arithmetic did.", "",
              prefill_table(rows), ""]
    scale = result.get("scale") or {}
    if any(v != 1.0 for v in scale.values()):
        lines += ["## Full-depth estimate", "",
                  "The model above was built with fewer layers than published (same widths, same token counts). "
                  "Every layer of a stack has the same shape and cost, so the estimate multiplies the measured "
                  f"encoder time by {scale.get('vision', 1):.2f} (the layer ratio) and the measured LLM prefill by "
                  "the ratio of the row's full-depth to built-depth LLM FLOPs (the layer ratio, "
                  f"{scale.get('text', 1):.2f}, for pre-LLM methods; for methods that prune inside the LLM, their "
                  "full-depth schedule), and keeps compression and other time as measured. It is an "
                  "extrapolation, not a measurement. LLM-stage methods RUN on the cut model with the schedule "
                  "of the cut depth, so their measured rows above are not representative of the full model.",
                  "", full_table(rows, scale), ""]
    lines += ["![speed-up vs retain](speedup_vs_retain.png)", ""]
    if result.get("skipped"):
        lines += ["Skipped methods: " + "; ".join(f"`{k}`: {v}" for k, v in result["skipped"].items()), ""]
    q = result.get("quality") or []
    if q and any("frame_cosine" in x for x in q):
        lines += ["## Quality: DINOv2-S/14 feature fidelity (real weights, real clips, per frame)", "",
                  "Every frame of each real clip through DINOv2-S/14 (16 x 16 patch tokens and its signals per frame), "
                  "the clip's tokens in frame order with a frames(T, 16, 16) layout, compressed by each pre-LLM video "
                  "method (see `run_video_fidelity` in `tokenzip/bench/fidelity.py`). As for images: cosine of the "
                  "mean-pooled clip feature, nearest-neighbour agreement and self-retrieval over the clips, token "
                  "cosine per patch of every frame (dropped = 0; last-but-two column: nearest output token); "
                  "`frame cosine`: each frame's mean full feature vs the mean of its patches' output tokens (a frame "
                  "with no represented patch counts 0), mean over frames and clips, and the worst frame.", "",
                  quality_table(q), ""]
        sk = [x for x in q if "skipped" in x]
        if sk:
            lines += ["Not run on a bare encoder: " + "; ".join(f"`{x['method']}` ({x['skipped']})" for x in sk), ""]
        clips = next((x.get("images") for x in q if x.get("images")), None)
        if clips:
            lines += ["Clips: " + ", ".join(clips), ""]
    elif q:
        lines += ["## Quality: DINOv2-S/14 feature fidelity (real weights, real images)", "",
                  "Cosine of mean-pooled compressed vs full patch features, nearest-neighbour agreement and top-1 "
                  "self-retrieval (see `tokenzip/bench/fidelity.py`). Caveat: a global mean-pooled feature "
                  "favours methods whose outputs average back to the full mean (pooling, merging); it measures "
                  "how much of the image's global content survives, not the task accuracy of an MLLM. Token "
                  "cosine: each original patch's final feature vs the final feature of the token it was kept in "
                  "or merged into (ToMe's unmerge), averaged over patches and images; a dropped patch counts 0 "
                  "(last column: its best cosine to any output token instead). `NAME@encoderL` rows compress "
                  "after L of the tower's 12 layers (the later layers run on the kept/merged tokens).", "",
                  quality_table(q), ""]
        sk = [x for x in q if "skipped" in x]
        if sk:
            lines += ["Not run on a bare encoder: " + "; ".join(f"`{x['method']}` ({x['skipped']})" for x in sk), ""]
        imgs = next((x.get("images") for x in q if x.get("images")), None)
        if imgs:
            lines += ["Images: " + ", ".join(imgs), ""]
    kq = result.get("kept_quality") or []
    if any("skipped" not in x for x in kq):
        lines += ["## Every method side by side: time and the kept set's DINOv2-S/14 fidelity", "",
                  "The model's image tower is DINOv2-S/14 (real weights): every method above ran through the model "
                  "on the same real images and prompt, and what it kept (for a method inside the LLM: the visual "
                  "tokens left after its last pruning step; a merged group: its members' mean) is read in "
                  "DINOv2-S/14's final feature space (`run_model_fidelity` in `tokenzip/bench/fidelity.py`). Metrics "
                  "as in the quality table; a dropped patch counts its best cosine to a kept slot. Methods that rank "
                  "with the LLM or the prompt choose through dinov2-llava's untrained projector: mechanics of this "
                  "model, not of a trained MLLM. Last column: the same method on the bare tower (its own merged "
                  "features; – where it needs LLM-side signals or acts inside the LLM). Time columns: the sweep "
                  "above.", "", side_by_side_table(rows, kq, q), ""]
        sk = [x for x in kq if "skipped" in x]
        if sk:
            lines += ["No kept set: " + "; ".join(f"`{x['method']}` ({x['skipped']})" for x in sk), ""]
    if not q and result.get("quality_note"):
        lines += [f"Quality: not measured ({result['quality_note']}).", ""]
    ev = result.get("events") or []
    if ev:
        first = next((e for e in ev if "skipped" not in e), None)
        lines += ["## Event recall: a 2-frame event on synthetic clips", ""]
        if first is not None:
            lines += [f"{first['trials']} synthetic clips of {first['frames']} frames ({first['size'][1]}x"
                      f"{first['size'][0]} px; seeds 0..{first['trials'] - 1}, the event mirrored into each corner in "
                      "turn), a white square visible in exactly 2 consecutive frames, given to the model through its "
                      "own adapter. `event recall`: fraction of clips where some output token has a source token "
                      "inside the event's region and frames (kept or merged); `event dominant`: fraction of clips "
                      "where some output token draws at least half its sources from the event; `event tokens kept`: "
                      "mean share of the event's tokens that have an output token (definitions: "
                      "`tokenzip/bench/events.py`). `tokens from`: `model` = the benchmarked model's own encoder "
                      "and adapter (every video method; with random weights, attention-based methods' values are "
                      "mechanics, not quality); `dinov2-s14` = real DINOv2-S/14 per frame (pre-LLM video methods, "
                      "with `--quality dinov2,event-recall`).", "", event_table(ev), ""]
        sk = [e for e in ev if "skipped" in e]
        if sk:
            lines += ["Not measured: " + "; ".join(f"`{e['method']}` on {e.get('encoder', 'model')} ({e['skipped']})"
                                                  for e in sk), ""]
    if result.get("accuracy"):
        lines += ["## Task accuracy", "", accuracy_table(result["accuracy"]), ""]
    if has_quality_plot:
        lines += ["![quality vs retain](quality_vs_retain.png)", ""]
    if has_token_plot:
        lines += ["![token-level fidelity vs retain](token_fidelity_vs_retain.png)", ""]
    if has_pareto:
        lines += ["![Pareto](pareto.png)", ""]
    lines += ["## Definitions", "", DEFINITIONS, "", "## FLOPs", "", FLOP_FORMULA, ""]
    return "\n".join(lines)
