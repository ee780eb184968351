"""The paired overhead vs oracle (issue 21, item 7): arithmetic only, on hand-made rows (no timing assertions)."""

import math

import pytest

from tokenzip.bench.derive import finalize, oracle_ttft_per_repeat, paired_ratio


def test_paired_ratio_is_the_median_of_per_repeat_ratios():
    assert paired_ratio([2.0, 3.0, 10.0], [1.0, 2.0, 4.0]) == pytest.approx(2.0)  # ratios 2, 1.5, 2.5
    assert paired_ratio([1.0, 4.0], [1.0, 2.0]) == pytest.approx(1.5)  # even count: mean of the middle two
    assert paired_ratio([5.0, 2.0], [0.0, 1.0]) == pytest.approx(2.0)  # a zero denominator is left out
    assert math.isnan(paired_ratio([], []))
    with pytest.raises(ValueError, match="one value per repeat"):
        paired_ratio([1.0], [1.0, 2.0])


def _rows(kind):
    """none, method and oracle rows of one point, 3 repeats; repeat 2 is a slow stretch that hits both sides."""
    def row(k, ttft, enc, proj, timings, baseline=None):
        r = {"kind": k, "method": "none" if k == "none" else "m", "retain": 1.0 if k == "none" else 0.25,
             "ttft_s": ttft, "encoder_s": enc, "compress_s": 0.0, "prefill_s": 0.5, "other_s": 0.0,
             "projector_s": proj, "llm_ttft_s": ttft, "flops": 1.0, "llm_flops": 1.0, "encoder_flops": 0.0,
             "llm_flops_full": 1.0, "encoder_flops_full": 0.0,
             "timings": timings}
        if k != "none":
            r["oracle_kind"] = kind
        if baseline is not None:
            r["baseline"] = baseline
        return r

    base = {"ttft_s": 4.0, "encoder_s": 1.0, "compress_s": 0.0, "prefill_s": 3.0, "other_s": 0.0,
            "timings": {"ttft_s": [4.0, 4.0, 8.0], "encoder_s": [1.0, 1.0, 2.0]}}
    method = row("method", 3.0, 1.0, 0.25, {"ttft_s": [3.0, 2.5, 6.0], "encoder_s": [1.0, 1.0, 2.0],
                                           "projector_s": [0.25, 0.25, 0.5]}, base)
    # the oracle's own call: an exact oracle's LLM call alone; a replay measured its encoder too
    oracle = row("oracle", 1.0, 0.0, 0.0, {"ttft_s": [1.0, 1.0, 2.5], "encoder_s": [0.0, 0.0, 0.0]})
    return [row("none", 4.0, 1.0, 0.0, {"ttft_s": [4.0, 4.0, 8.0]}), method, oracle], base


def test_exact_oracle_pairs_its_repeats_with_the_same_repeat_encoder_and_projector():
    rows, base = _rows("exact")
    o_ttft = oracle_ttft_per_repeat(rows[2], rows[1], base)
    assert o_ttft == pytest.approx([1.0 + 1.0 + 0.25, 1.0 + 1.0 + 0.25, 2.5 + 2.0 + 0.5])
    out = finalize(rows, {})
    m = next(r for r in out if r["kind"] == "method")
    o = next(r for r in out if r["kind"] == "oracle")
    # per repeat: 3/2.25 = 1.33, 2.5/2.25 = 1.11, 6/5 = 1.2 -> median 1.2 (repeat 2 is twice as slow on both sides)
    assert m["overhead_vs_oracle_paired"] == pytest.approx(6.0 / 5.0)
    # the ratio of medians beside it: method median 3.0 over the oracle's rebuilt median TTFT
    assert m["overhead_vs_oracle"] == pytest.approx(3.0 / o["ttft_s"])
    assert o["ttft_s"] == pytest.approx(1.0 + 1.0 + 0.25)
    assert o["overhead_vs_oracle_paired"] == 1.0
    assert next(r for r in out if r["kind"] == "none")["overhead_vs_oracle_paired"] == 1.0


def test_replay_and_reduced_input_oracles_per_repeat():
    rows, base = _rows("replay")
    assert oracle_ttft_per_repeat(rows[2], rows[1], base) == pytest.approx([1.0, 1.0, 2.5])  # measured as is
    out = finalize(rows, {})
    m = next(r for r in out if r["kind"] == "method")
    assert m["overhead_vs_oracle_paired"] == pytest.approx(2.5)  # median of 3.0, 2.5, 2.4
    rows, base = _rows("reduced-input")
    rows[2]["timings"]["encoder_s"] = [0.5, 0.0, 0.0]  # repeat 0 encoded the smaller input itself
    # its own encoder time when it ran one (already in its TTFT), else the method's encoder time of that repeat
    assert oracle_ttft_per_repeat(rows[2], rows[1], base) == pytest.approx([1.0, 2.0, 4.5])


def test_paired_overhead_is_nan_without_per_repeat_timings():
    rows, _ = _rows("exact")
    for r in rows:
        del r["timings"]
    out = finalize(rows, {})
    m = next(r for r in out if r["kind"] == "method")
    assert math.isnan(m["overhead_vs_oracle_paired"]) and math.isfinite(m["overhead_vs_oracle"])
