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
    assert c.final_count(16, 32) == 4
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


def test_st3_vta_anneals_linearly_from_the_budget_to_its_floor():
    """VTA, k = 8 (tokens=8), floor f = round(0.5 * 8) = 4, anneal_steps = 2: r = ceil(4 / 2) = 2 per step:
    8 -> 6 -> 4 -> 4. A step drops the least attended entries (ties: the later one goes)."""
    c = tz.ST3(tokens=8, anneal=True, anneal_steps=2)
    seq, m = [], 8
    for _ in range(3):
        m = c.anneal_count(16, m)
        seq.append(m)
    assert seq == [6, 4, 4]
    scores = torch.tensor([0.3, 0.1, 0.2, 0.1, 0.3])  # m = 5: r = 2 but never below f = 4: drops one
    assert c.decode_keep(scores, 16).tolist() == [0, 1, 2, 4]  # t1 and t3 tie at the bottom: the later (t3) goes
    assert c.decode_keep(scores[:4], 16) is None  # at the floor
    # f = round(0.25 * 8) = 2, r = ceil(6 / 3) = 2
    assert tz.ST3(tokens=8, anneal=True, anneal_steps=3, anneal_keep=0.25).anneal_count(16, 8) == 6
    # VTA starts at the last PVTP stage (or a later `layer`); anneal=False: PVTP alone
    assert c.decode_layer(32) == 24 and tz.ST3(tokens=8, anneal=True, layer=30).decode_layer(32) == 30
    assert tz.ST3(tokens=8).decode_layer(32) is None
    with pytest.raises(ValueError, match="last PVTP stage"):
        tz.ST3(tokens=8, anneal=True, layer=20).decode_layer(32)


def _st3_generate(model, inputs, c, steps=5):
    with c(model):
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True)
    cache = output_cache(out)
    return out.sequences[:, inputs["input_ids"].shape[1]:], cache, getattr(cache, STATE_ATTR)


def test_st3_pvtp_then_vta_frees_entries_step_by_step_in_a_model():
    """generate() on the tiny LLaVA (a left-padded batch of 3): PVTP's stages at prefill bring each image to its
    budget k; then every decoding step cuts the entries of the layers from the last stage on by
    r = ceil((k - f) / anneal_steps) until the floor f, and the cache tensors of those layers really shrink. With
    anneal_keep=1 (nothing to anneal) the run decodes exactly as PVTP alone; SDPA and eager keep the same entries."""
    model = built("llava")
    inputs = CASES["llava"].make_inputs(model, default_samples())
    num_layers = len(adapter_for(model).parts().decoder_layers)
    c = tz.ST3(retain=0.5, anneal=True, anneal_steps=2)
    new, cache, state = _st3_generate(model, inputs, c)
    decode_at = c.decode_layer(num_layers)
    assert decode_at == c.boundaries(num_layers)[-1]
    items = [it for s in c.last_stats for ms in s.values() for it in ms.items]
    assert len(state.decode.items) == len(items) and len(state.decode.history) == 4  # 5 tokens: 1 from prefill
    floors = []
    for j, (_, n, _) in enumerate(state.decode.items):
        k = c.budget.count(n)
        f = max(1, round(0.5 * k))
        r = -(-(k - f) // 2)
        floors.append(f)
        assert items[j].tokens_out == k
        assert [int(step[j].numel()) for step in state.decode.history] == [max(f, k - s * r) for s in (1, 2, 3, 4)]
        # the kept entries are among those PVTP kept
        assert set(state.decode.history[-1][j].tolist()) <= set(items[j].index.tolist())
    mask = inputs["attention_mask"]
    # the layers from decode_at on hold, per row, its real prompt tokens minus everything removed, then 4 new tokens
    width = max(int(mask[b].sum()) - sum(n - floors[j] for j, (s, n, _) in enumerate(state.decode.items) if s == b)
                for b in range(mask.shape[0]))
    assert cache.layers[decode_at].keys.shape[-2] == width + 4
    assert cache.layers[0].keys.shape[-2] == mask.shape[1] + 4
    # nothing to anneal: the same tokens as PVTP alone
    same, _, _ = _st3_generate(model, inputs, tz.ST3(retain=0.5, anneal=True, anneal_keep=1.0))
    alone, _, _ = _st3_generate(model, inputs, tz.ST3(retain=0.5, anneal=False))
    assert torch.equal(same, alone)
    eager = built("llava", "eager")
    new_e, _, state_e = _st3_generate(eager, CASES["llava"].make_inputs(eager, default_samples()),
                                      tz.ST3(retain=0.5, anneal=True, anneal_steps=2))
    assert torch.equal(new, new_e)
    assert [[t.tolist() for t in step] for step in state.decode.history] == \
        [[t.tolist() for t in step] for step in state_e.decode.history]


def test_st3_pvtp_alone_equals_the_masking_oracle():
    """anneal=False (PVTP, prefill stages only) on the tiny LLaVA: logits at kept positions and greedy generation
    equal the stock model with the run's selection imposed by masks (tests/test_llm_stage.py's oracle)."""
    from test_llm_stage import _case_forward, assert_equals_mask_oracle

    model = built("llava")
    inputs = CASES["llava"].make_inputs(model, default_samples())
    c = tz.ST3(retain=0.3, anneal=False)
    with c(model):
        out = _case_forward("llava", model, inputs)
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert_equals_mask_oracle(model, c, inputs, out, gen, lambda: _case_forward("llava", model, inputs))


def test_st3_bad_input():
    for kwargs, err, name in [({"layers": (3, 2)}, ValueError, "layers"), ({"layers": ()}, ValueError, "layers"),
                              ({"layers": 3}, TypeError, "layers"), ({"anneal": 1}, TypeError, "anneal"),
                              ({"layer": 0}, ValueError, "layer"), ({"anneal_steps": 0}, ValueError, "anneal_steps"),
                              ({"anneal_keep": 1.5}, ValueError, "anneal_keep")]:
        with pytest.raises(err, match=name):
            tz.ST3(retain=0.5, **kwargs)
    with pytest.raises(ValueError, match="layers"):
        tz.ST3(retain=0.5, layers=(2, 8)).schedule(16, 8)
