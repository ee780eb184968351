"""One check of each issue-22 multi-stage method's own algorithm (ST3, FitPrune, ...), on small cases worked out by
hand. The generic checks (exact budget, determinism, batch independence, the invariants and the masking oracle) come
from the registry-driven suites."""

import pytest
import torch

import tokenzip as tz
from tokenzip.adapters import adapter_for
from tokenzip.compat import output_cache
from tokenzip.llm.hooks import STATE_ATTR
from tokenzip.testing import CASES, default_samples

from conftest import built

torch.set_num_threads(1)


# ---- ST3 ------------------------------------------------------------------------------------------------------------

def test_st3_pvtp_schedule_and_stage_selection():
    """PVTP on a 32-layer LLM: stages at 2, 8, 16, 24; 16 tokens to 4 with the constant ratio (4/16)^(1/4) = 0.7071:
    16 * 0.7071 = 11.3 -> 11, 16 * 0.5 = 8, 16 * 0.3536 = 5.66 -> 6, then exactly 4. A 4-layer LLM puts the stages
    at round(0.25) = 0 -> clamped to 1, round(1) = 1 (duplicate, dropped), 2, 3."""
    c = tz.ST3(retain=0.25)
    assert c.schedule(16, 32) == [(2, 11), (8, 8), (16, 6), (24, 4)]
    assert c.schedule(16, 4) == [(1, 10), (2, 6), (3, 4)]  # ratio (4/16)^(1/3) = 0.63: 10.08 -> 10, 6.35 -> 6
    assert c.final_count(16, 32) == 4 and c.decode_layer(32) is None
    assert tz.ST3(retain=0.5, layers=(3, 5)).schedule(8, 8) == [(3, 6), (5, 4)]  # 8 * 0.7071 = 5.66 -> 6
    # one stage keeps the tokens the last token attends to most, ties to the earlier token
    tokens = torch.arange(12.0).reshape(1, 6, 2)
    att = torch.tensor([[0.1, 0.4, 0.2, 0.4, 0.0, 0.3]])
    out = c.compress(tokens, k=3, last_attention=att)
    assert out.index[0].tolist() == [1, 3, 5]
    assert torch.equal(out.tokens[0], tokens[0, [1, 3, 5]])


def test_st3_pvtp_schedule_is_four_distinct_layers_and_the_runner_applies_it():
    """On the tiny LLaVA, every image item goes through the planned stages, in order, to exactly its budget."""
    model = built("llava")
    inputs = CASES["llava"].make_inputs(model, default_samples())
    num_layers = len(adapter_for(model).parts().decoder_layers)
    c = tz.ST3(retain=0.25)
    with c(model):
        with torch.no_grad():
            model(**inputs)
    items = [it for s in c.last_stats for ms in s.values() for it in ms.items]
    assert items
    for it in items:
        planned = [(layer, k) for layer, k in c.schedule(it.tokens_in, num_layers) if k < it.tokens_in]
        assert it.stages == planned
        assert it.tokens_out == c.budget.count(it.tokens_in)


def test_st3_vta_anneals_linearly_to_the_budget():
    """VTA, n = 16, k = 4, anneal_steps = 4: r = ceil(12 / 4) = 3 per step: 16 -> 13 -> 10 -> 7 -> 4 -> 4. The step
    drops the least attended entries (ties: the later one goes)."""
    c = tz.ST3(tokens=4, anneal=True, anneal_steps=4)
    seq, m = [], 16
    for _ in range(5):
        m = c.anneal_count(16, m)
        seq.append(m)
    assert seq == [13, 10, 7, 4, 4]
    scores = torch.tensor([0.3, 0.1, 0.2, 0.1, 0.3])  # m = 5 left of n = 16: r = 3, but never below k = 4
    assert c.decode_keep(scores, 16).tolist() == [0, 1, 2, 4]  # drops one: t1 and t3 tie, the later (t3) goes
    assert c.decode_keep(scores[:4], 16) is None  # at the budget
    assert c.schedule(16, 8) == [] and c.final_count(16, 8) == 16 and c.decode_layer(8) == 2
    assert tz.ST3(retain=0.5, anneal=True).decode_layer(2) == 1


def test_st3_vta_frees_entries_step_by_step_in_a_model():
    """generate() with VTA on the tiny LLaVA: prefill untouched; each decoding step (the calls that continue the
    cache) cuts every image's entries by r = ceil((n - k) / anneal_steps) until the budget."""
    model = built("llava")
    inputs = CASES["llava"].make_inputs(model, default_samples())
    c = tz.ST3(retain=0.25, anneal=True, anneal_steps=2)
    with c(model):
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    state = getattr(output_cache(out), STATE_ATTR)
    assert len(state.decode.history) == 4  # 5 new tokens: the first comes from prefill
    for j, (_, n, _) in enumerate(state.decode.items):
        k, r = c.budget.count(n), -(-(n - c.budget.count(n)) // 2)
        assert [int(step[j].numel()) for step in state.decode.history] == [max(k, n - s * r) for s in (1, 2, 3, 4)]


def test_st3_bad_input():
    for kwargs, err, name in [({"layers": (3, 2)}, ValueError, "layers"), ({"layers": ()}, ValueError, "layers"),
                              ({"layers": 3}, TypeError, "layers"), ({"anneal": 1}, TypeError, "anneal"),
                              ({"layer": 0}, ValueError, "layer"), ({"anneal_steps": 0}, ValueError, "anneal_steps")]:
        with pytest.raises(err, match=name):
            tz.ST3(retain=0.5, **kwargs)
    with pytest.raises(ValueError, match="layers"):
        tz.ST3(retain=0.5, layers=(2, 8)).schedule(16, 8)
