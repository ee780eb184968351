"""The invariants every method x model adapter must hold. A new method or adapter is covered by registering it
(tz.METHODS / tokenzip.testing.CASES); nothing here names a method or a model."""

import pytest
import torch

import tokenzip as tz
from tokenzip.testing import CASES, default_samples

from conftest import built, method_case_pairs

PAIRS = method_case_pairs()


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _forward(model, inputs, **extra):
    with torch.no_grad():
        return model(**inputs, position_ids=_positions(inputs["attention_mask"]), **extra).logits


def _real_rows(logits, mask):
    """Logits at real (non-padding) positions of each row, as a list."""
    return [logits[i][mask[i].bool()] for i in range(logits.shape[0])]


def _sources(stats):
    return [[it.source.tolist() for ms in s.values() for it in ms.items] for s in stats]


def _hooks(model):
    """Every hook on every submodule (transformers installs its own output-capturing hooks lazily: compare sets)."""
    return {(name, kind, key) for name, m in model.named_modules()
            for kind in ("_forward_hooks", "_forward_pre_hooks") for key in getattr(m, kind)}


def _no_hooks(model, before):
    assert _hooks(model) <= before, f"hooks left behind: {_hooks(model) - before}"
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert getattr(model, "_tokenzip_patch", None) is None


@pytest.mark.parametrize("method,case", PAIRS)
def test_retain_one_is_lossless(method, case):
    model = built(case)
    inputs = CASES[case].make_inputs(model, default_samples())
    ref = _forward(model, inputs)
    with method(retain=1.0)(model):
        out = _forward(model, inputs)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("method,case", PAIRS)
@pytest.mark.parametrize("budget", [{"retain": 0.3}, {"tokens": 3}])
def test_llm_sees_exact_budget(method, case, budget):
    model = built(case)
    inputs = CASES[case].make_inputs(model, default_samples())
    c = method(**budget)
    seen = []
    lm = CASES[case].language_model(model)
    h = lm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["attention_mask"].clone()), with_kwargs=True)
    try:
        with c(model):
            _forward(model, inputs)
    finally:
        h.remove()
    real_in = inputs["attention_mask"].sum(1)
    for b, stats in enumerate(c.last_stats):
        removed = 0
        for ms in stats.values():
            for it in ms.items:
                assert it.tokens_out == c.budget.count(it.tokens_in)
                removed += it.tokens_in - it.tokens_out
        mask = seen[0] if seen[0].dim() == 2 else None
        if mask is not None:
            assert int(mask[b].sum()) == int(real_in[b]) - removed


@pytest.mark.parametrize("method,case", PAIRS)
def test_cached_generation_equals_uncached(method, case):
    model = built(case)
    inputs = CASES[case].make_inputs(model, default_samples())
    c = method(retain=0.4)
    with c(model):
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


@pytest.mark.parametrize("method,case", PAIRS)
def test_padded_batch_equals_singles(method, case):
    model = built(case)
    samples = default_samples()
    batch = CASES[case].make_inputs(model, samples)
    c = method(retain=0.4)
    with c(model):
        logits = _forward(model, batch)
        # the compressed batch's mask is what the LLM saw; real rows end at the right (left padding)
        batch_stats = _sources(c.last_stats)
        singles = []
        for s in samples:
            one = CASES[case].make_inputs(model, [s])
            singles.append((_forward(model, one)[0], _sources(c.last_stats)[0]))
    for i, (single_logits, single_src) in enumerate(singles):
        n = single_logits.shape[0]
        torch.testing.assert_close(logits[i, -n:], single_logits, atol=1e-4, rtol=1e-4)
        assert batch_stats[i] == single_src


@pytest.mark.parametrize("method,case", PAIRS)
def test_sdpa_and_eager_choose_the_same_tokens(method, case):
    inputs = CASES[case].make_inputs(built(case), default_samples())
    chosen = []
    for attn in ("sdpa", "eager"):
        model = built(case, attn)
        c = method(retain=0.4)
        with c(model):
            _forward(model, inputs)
        chosen.append(_sources(c.last_stats))
    assert chosen[0] == chosen[1]


@pytest.mark.parametrize("method,case", PAIRS)
def test_model_restored_after_exit_and_exception(method, case):
    model = built(case)
    inputs = CASES[case].make_inputs(model, default_samples())
    ref = _forward(model, inputs)
    before = _hooks(model)
    with method(retain=0.3)(model):
        _forward(model, inputs)
    _no_hooks(model, before)
    torch.testing.assert_close(_forward(model, inputs), ref, atol=0, rtol=0)
    with pytest.raises(KeyboardInterrupt):
        with method(retain=0.3)(model):
            raise KeyboardInterrupt
    _no_hooks(model, before)
    handle = method(retain=0.3).apply(model)
    handle.remove()
    _no_hooks(model, before)
    torch.testing.assert_close(_forward(model, inputs), ref, atol=0, rtol=0)


@pytest.mark.parametrize("method,case", PAIRS)
def test_selection_is_deterministic(method, case):
    model = built(case)
    inputs = CASES[case].make_inputs(model, default_samples())
    runs = []
    for _ in range(2):
        c = method(retain=0.4)
        with c(model):
            logits = _forward(model, inputs)
        runs.append((_sources(c.last_stats), logits))
    assert runs[0][0] == runs[1][0]
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=0, rtol=0)
