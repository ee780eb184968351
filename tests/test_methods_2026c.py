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


# ---- MustDrop -------------------------------------------------------------------------------------------------------

def _mustdrop_grid():
    """A 2 x 4 grid, 2 x 2 windows {0, 1, 4, 5} and {2, 3, 6, 7}. t0 = t1 (cos 1), t2 ~ t6 (cos 0.99), t4 ~ t5
    (cos 0.9); every other 4-neighbour pair in a window is orthogonal (cos 0)."""
    t = torch.zeros(1, 8, 4)
    t[0, 0] = t[0, 1] = torch.tensor([1.0, 0, 0, 0])
    t[0, 2] = torch.tensor([0, 1.0, 0, 0])
    t[0, 6] = torch.tensor([0, 0.99, 0.141, 0])
    t[0, 3] = torch.tensor([0, 0, 1.0, 0])
    t[0, 4] = torch.tensor([0, 0, 0, 1.0])
    t[0, 5] = torch.tensor([0, 0, 0.436, 0.9])
    t[0, 7] = torch.tensor([-1.0, 0, 0, 0])
    return t


def test_mustdrop_local_spatial_merging_and_key_tokens():
    """k = 5 of 8: three merges, most similar first: (0, 1), (2, 6), (4, 5) -> groups {0,1} {2,6} {3} {4,5} {7}.
    With [CLS] attention highest on t1, the key set (round(0.25 * 5) = 1 token) is {t1}: it is never merged, so the
    third merge is the first zero-similarity pair in raster order, (0, 4): {0,4,5} {1} {2,6} {3} {7}. k = 1: the
    2 x 2 windows merge whole, then the window doubles to 4 and the two halves join."""
    from tokenzip.methods.mustdrop import MustDropMerge

    t = _mustdrop_grid()
    m = MustDropMerge(retain=1.0)
    out = m.compress(t, grid=(2, 4), k=5)
    assert out.source[0].tolist() == [0, 0, 1, 2, 3, 3, 1, 4]
    assert out.index[0].tolist() == [0, 2, 3, 4, 7]
    assert torch.allclose(out.tokens[0, 3], (t[0, 4] + t[0, 5]) / 2)
    cls = torch.tensor([[0.1, 0.5, 0.05, 0.05, 0.1, 0.1, 0.05, 0.05]])
    keyed = m.compress(t, grid=(2, 4), k=5, cls_attention=cls)
    assert keyed.source[0].tolist() == [0, 1, 2, 3, 0, 0, 2, 4]
    assert m.compress(t, grid=(2, 4), k=2).source[0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    assert m.compress(t, grid=(2, 4), k=1).source[0].tolist() == [0] * 8


def test_mustdrop_dual_attention_takes_global_and_individual_rankings_alternately():
    """Three text rows over five tokens: mean (global) = [.233, .267, .267, .133, .1] -> order 1, 2, 0, 3, 4; max
    (individual) = [.7, .4, .4, .2, .3] -> order 0, 1, 2, 4, 3. Alternating, global first: k = 3 -> 1, 0, 2;
    k = 4 -> then the individual ranking's next untaken token, 4 (top-4 by the mean alone would take 3)."""
    from tokenzip.methods.mustdrop import MustDropFilter

    att = torch.tensor([[[0.0, 0.4, 0.4, 0.2, 0.0], [0.0, 0.4, 0.4, 0.2, 0.0], [0.7, 0.0, 0.0, 0.0, 0.3]]])
    last = torch.full((1, 5), 0.2)
    f = MustDropFilter(retain=1.0)
    assert f.compress(torch.randn(1, 5, 3), k=3, text_attention=att, last_attention=last).index[0].tolist() == \
        [0, 1, 2]
    assert f.compress(torch.randn(1, 5, 3), k=4, text_attention=att, last_attention=last).index[0].tolist() == \
        [0, 1, 2, 4]
    # no text after the item: the last token's row for both rankings
    assert f.compress(torch.randn(1, 5, 3), k=2, text_attention=att[:, :0],
                      last_attention=torch.tensor([[0.1, 0.5, 0.1, 0.2, 0.1]])).index[0].tolist() == [1, 3]
    # decoding: entries under tau / m = 0.1 / 5 = 0.02 go, never below half the prefill count
    d = MustDropFilter(tokens=4, decode=True)
    assert d.decode_keep(torch.tensor([0.5, 0.01, 0.3, 0.015, 0.175]), 16).tolist() == [0, 2, 4]
    assert d.decode_keep(torch.tensor([0.97, 0.01, 0.01, 0.01]), 16).tolist() == [0, 1]  # floor round(0.5 * 4) = 2


def test_mustdrop_budget_split_and_model_run():
    """retain=0.25: 16 tokens -> sqrt(0.25) = 0.5 at the encoder output (8) -> 0.5 of them before layer 2 (4);
    tokens=4: 16 -> round(16^0.5 * 4^0.5) = 8 -> 4; 100 -> round(10 * 2) = 20 -> 4. On the tiny LLaVA each image
    reaches the LLM with llm_count(N) tokens and leaves the stage with final_count(N)."""
    c = tz.MustDrop(retain=0.25)
    assert (c.llm_count(16), c.schedule(16, 32), c.final_count(16, 32)) == (8, [(2, 4)], 4)
    t = tz.MustDrop(tokens=4)
    assert (t.llm_count(16), t.llm_count(100), t.final_count(100, 32)) == (8, 20, 4)
    model = built("llava")
    inputs = CASES["llava"].make_inputs(model, default_samples())
    num_layers = len(adapter_for(model).parts().decoder_layers)
    with c(model):
        with torch.no_grad():
            model(**inputs)
    items = [it for s in c.last_stats for ms in s.values() for it in ms.items]
    assert items
    merged = [it for s in c.parts[0].last_stats for ms in s.values() for it in ms.items]
    assert len(merged) == len(items)
    for it, pre in zip(items, merged):
        assert it.tokens_out == c.final_count(it.tokens_in, num_layers)
        assert it.stages == [(c.parts[1].stage_layer(num_layers), it.tokens_out)]
        # the encoder-output stage only merges (every token in a group) down to llm_count(N)
        assert pre.tokens_out == c.llm_count(it.tokens_in) and bool((pre.source >= 0).all())
        assert sorted(set(it.source[it.source >= 0].tolist())) == list(range(it.tokens_out))


def test_mustdrop_llm_part_equals_the_masking_oracle_and_decode_frees_entries():
    """The LLM part alone (dual-attention filtering) against tests/test_llm_stage.py's masking oracle; with
    decode=True the cache of the layers from the stage on shrinks while decoding, never below the floor."""
    from test_llm_stage import _case_forward, assert_equals_mask_oracle

    from tokenzip.methods.mustdrop import MustDropFilter

    model = built("llava")
    inputs = CASES["llava"].make_inputs(model, default_samples())
    part = MustDropFilter(retain=0.3, layer=1)
    with part(model):
        out = _case_forward("llava", model, inputs)
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert_equals_mask_oracle(model, part, inputs, out, gen, lambda: _case_forward("llava", model, inputs))
    c = tz.MustDrop(retain=0.25, decode=True, tau=0.9)
    with c(model):
        res = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    state = getattr(output_cache(res), STATE_ATTR)
    assert len(state.decode.history) == 3
    for j, (_, n, _) in enumerate(state.decode.items):
        k = c.parts[1].budget.count(n)  # n: the item's tokens entering the LLM
        counts = [int(step[j].numel()) for step in state.decode.history]
        assert counts == sorted(counts, reverse=True) and counts[0] < k and counts[-1] >= max(1, round(0.5 * k))


# ---- VScan ----------------------------------------------------------------------------------------------------------

def test_vscan_local_scan_spreads_picks_over_windows():
    """2 x 4 grid, 2 x 2 windows W0 = {0, 1, 4, 5}, W1 = {2, 3, 6, 7}; scores .9 .8 .2 .1 / .7 .3 .15 .05. Round 1:
    W0 offers t0 (.9), W1 offers t2 (.2): both taken, best first. Round 2: W0 offers t1 (.8), W1 t6 (.15): t1 is
    taken. The global top 3 would be t0, t1, t4, all in W0."""
    from tokenzip.methods.vscan import _windows, local_scan

    score = torch.tensor([0.9, 0.8, 0.2, 0.1, 0.7, 0.3, 0.15, 0.05])
    wins = _windows(tz.layout.grid(2, 4), 2)
    assert wins == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert local_scan(score, wins, torch.zeros(8, dtype=torch.bool), 3) == [0, 2, 1]


def test_vscan_scans_then_merges_into_the_most_similar_kept_token():
    """k = 4: global scan (2 = half of 4) by [CLS] attention: t0 (.3), t4 (.25). Local scan (2) by mid_attention
    over 2 x 2 windows: W0 offers t1 (t1, t5 tie at .1: the earlier), W1 offers t2 (.3): taken t2 then t1. Kept
    {0, 1, 2, 4}; the rest fold into their most similar kept token: t3 -> t2, t5 -> t4, t6 -> t1, t7 -> t0."""
    from tokenzip.methods.vscan import VScanScan

    t = torch.zeros(1, 8, 4)
    for i, v in {0: (1, 0, 0, 0), 1: (0, 1, 0, 0), 2: (0, 0, 1, 0), 4: (0, 0, 0, 1), 3: (0, 0, 0.9, 0.1),
                 5: (0.1, 0, 0, 1), 6: (0, 1, 0.2, 0), 7: (1, 0, 0, 0.2)}.items():
        t[0, i] = torch.tensor(v, dtype=torch.float)
    cls = torch.tensor([[0.3, 0.05, 0.05, 0.05, 0.25, 0.1, 0.1, 0.1]])
    mid = torch.tensor([[0.1, 0.1, 0.3, 0.05, 0.1, 0.1, 0.05, 0.2]])
    out = VScanScan(retain=1.0, window=2).compress(t, grid=(2, 4), k=4, cls_attention=cls, mid_attention=mid)
    assert out.index[0].tolist() == [0, 1, 2, 4]
    assert out.source[0].tolist() == [0, 1, 2, 2, 3, 3, 1, 0]
    assert torch.allclose(out.tokens[0, 2], (t[0, 2] + t[0, 3]) / 2)


def test_vscan_budget_split_model_run_and_llm_part_oracle():
    """retain=0.25: 16 -> 8 at the encoder output -> 4 before the middle layer (16 of 32, 1 of 3). On the tiny LLaVA
    every image ends at final_count(N) after one stage at L // 2; the LLM part alone equals the masking oracle."""
    from test_llm_stage import _case_forward, assert_equals_mask_oracle

    from tokenzip.methods.vscan import VScanPrune

    c = tz.VScan(retain=0.25)
    assert (c.llm_count(16), c.schedule(16, 32), c.final_count(16, 32)) == (8, [(16, 4)], 4)
    assert tz.VScan(tokens=4).llm_count(100) == 20
    model = built("llava")
    inputs = CASES["llava"].make_inputs(model, default_samples())
    num_layers = len(adapter_for(model).parts().decoder_layers)
    with c(model):
        with torch.no_grad():
            model(**inputs)
    items = [it for s in c.last_stats for ms in s.values() for it in ms.items]
    assert items
    for it in items:
        assert it.tokens_out == c.final_count(it.tokens_in, num_layers)
        assert it.stages == [(max(1, num_layers // 2), it.tokens_out)]
    part = VScanPrune(retain=0.3)
    with part(model):
        out = _case_forward("llava", model, inputs)
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert_equals_mask_oracle(model, part, inputs, out, gen, lambda: _case_forward("llava", model, inputs))
    with pytest.raises(ValueError, match="global_share"):
        tz.VScan(retain=0.5, global_share=2)
    with pytest.raises(ValueError, match="layer"):
        tz.VScan(retain=0.5, layer=9).schedule(16, 4)


# ---- FitPrune -------------------------------------------------------------------------------------------------------

def _fitprune_stats():
    """One item of 4 tokens in a 4-layer LLM: attention rows for layers 0, 1, 2 (uniform, then concentrating)."""
    return [torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.97, 0.01, 0.01, 0.01]])]


def test_fitprune_fits_the_recipe_by_bisection_on_the_attention_mass():
    """alpha = 0.25 (a layer may lose a quarter of its attention mass): layer 0 (uniform) needs 3 of 4 tokens
    (0.75), layer 1 needs 2 (0.7 < 0.75 <= 0.8), layer 2 needs 1 (0.97): keep = [1, 0.75, 0.5, 0.25], average
    0.625. Just under 0.25 layer 0 needs all 4 (average 0.6875), so target 0.625 gives that recipe. Target 0.6
    needs alpha >= 0.3, where layer 1 needs 1 token (0.7): keep = [1, 0.75, 0.25, 0.25] (average 0.5625)."""
    r = tz.FitPruneRecipe.fit(_fitprune_stats(), target=0.625)
    assert r.num_layers == 4 and r.samples == 1
    assert [round(v, 6) for v in r.keep] == [1.0, 0.75, 0.5, 0.25]
    assert [round(v, 6) for v in tz.FitPruneRecipe.fit(_fitprune_stats(), target=0.6).keep] == [1.0, 0.75, 0.25, 0.25]
    # two items: the shares are averaged (the second, uniform everywhere, needs 3 of 4 at every layer from alpha =
    # 0.25 on): [(.75 + .75) / 2, (.5 + .75) / 2, (.25 + .75) / 2] -> keep [1, .75, .625, .5], average 0.71875
    two = tz.FitPruneRecipe.fit(_fitprune_stats() + [torch.full((3, 4), 0.25)], target=0.72)
    assert [round(v, 6) for v in two.keep] == [1.0, 0.75, 0.625, 0.5]
    for bad, err in [([], "empty"), ([torch.ones(3, 4), torch.ones(2, 4)], "same"), ([-torch.ones(3, 4)], "negative")]:
        with pytest.raises(ValueError, match=err):
            tz.FitPruneRecipe.fit(bad, target=0.5)
    with pytest.raises(ValueError, match="below"):
        tz.FitPruneRecipe.fit(_fitprune_stats(), target=0.2)  # under 1 / 4: layer 0 sees everything


def test_fitprune_recipe_schedule_files_and_misfit(tmp_path):
    """The recipe [1, .75, .5, .25] on 16 tokens: retain=0.25 (k = 4, the recipe's own share) gives its counts
    round(keep * 16) = 12, 8, 4; retain=0.5 (k = 8) rescales between 16 and 8: 8 + round(8 * 2/3) = 13,
    8 + round(8 / 3) = 11, 8. No recipe: one stage before layer 1."""
    r = tz.FitPruneRecipe(num_layers=4, keep=(1.0, 0.75, 0.5, 0.25), target=0.625)
    assert tz.FitPrune(retain=0.25, recipe=r).schedule(16, 4) == [(1, 12), (2, 8), (3, 4)]
    assert tz.FitPrune(retain=0.5, recipe=r).schedule(16, 4) == [(1, 13), (2, 11), (3, 8)]
    assert tz.FitPrune(retain=0.25).schedule(16, 4) == [(1, 4)]
    path = tmp_path / "recipe.json"
    r.save(path)
    assert tz.FitPruneRecipe.load(path) == r
    with pytest.raises(ValueError, match="4-layer LLM; the model has 8"):
        tz.FitPrune(retain=0.25, recipe=r).schedule(16, 8)
    with pytest.raises(ValueError, match="4-layer"):
        tz.FitPrune(retain=0.25, recipe=r).decode_layer(8)  # what the patch asks when it is created
    path.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        tz.FitPruneRecipe.load(path)
    path.write_text('{"format": "tokenzip.fitprune.recipe/1", "num_layers": 3, "keep": [1, 0.5], "target": 0.5}')
    with pytest.raises(ValueError, match="one share per layer"):
        tz.FitPruneRecipe.load(path)
    with pytest.raises(ValueError, match="non-increasing"):
        tz.FitPruneRecipe(num_layers=3, keep=(1.0, 0.5, 0.7), target=0.5)
    with pytest.raises(TypeError, match="recipe"):
        tz.FitPrune(retain=0.5, recipe={"keep": [1.0]})


def test_fitprune_calibrates_on_a_model_and_the_fitted_recipe_runs():
    """calibrate() runs the tiny LLaVA unchanged and returns, per image, [L - 1, n] rows of attention (each row a
    share of the text's attention, so at most 1 per text row on average); a recipe fitted on them drives the
    stages, and a recipe for another depth is refused before the model is patched."""
    model = built("llava")
    inputs = CASES["llava"].make_inputs(model, default_samples())
    num_layers = len(adapter_for(model).parts().decoder_layers)
    with torch.no_grad():
        ref = model(**inputs).logits
    stats = tz.FitPrune.calibrate(model, [inputs])
    assert not [name for name, m in model.named_modules() if "forward" in m.__dict__]  # unpatched again
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    assert len(stats) >= 3 and all(s.shape[0] == num_layers - 1 for s in stats)
    assert all(bool((s >= 0).all()) and float(s.sum(1).max()) <= 1.0 + 1e-5 for s in stats)
    recipe = tz.FitPruneRecipe.fit(stats, target=0.6)
    c = tz.FitPrune(retain=recipe.keep[-1], recipe=recipe)
    with c(model):
        with torch.no_grad():
            model(**inputs)
    for it in (it for s in c.last_stats for ms in s.values() for it in ms.items):
        assert it.stages == c.schedule(it.tokens_in, num_layers) and it.tokens_out == c.budget.count(it.tokens_in)
    other = tz.FitPruneRecipe(num_layers=num_layers + 1, keep=(1.0,) * (num_layers + 1), target=1.0)
    with pytest.raises(ValueError, match="calibrate and fit"):
        tz.FitPrune(retain=0.5, recipe=other)(model)
    with pytest.raises(TypeError, match="calls"):
        tz.FitPrune.calibrate(model, [[1, 2]])


def test_st3_vta_scores_the_entries_a_prefill_stage_left_in_the_scoring_layer():
    """An independent check of decode-time pruning after prefill stages (tiny LLaVA, 3 layers: PVTP stages before
    layers 1 and 2, VTA from layer 2, scored with layer 1, whose cache holds what stage 1 kept). The eager
    attention weights of layer 1 at the first decoding step, over its cache columns (each row: its real tokens
    minus those stage 1 dropped, ascending, left-filled to the widest row; then the new token), rank each image's
    entries still alive; the step keeps the best anneal_count(n, k) of them (ties: the earlier)."""
    model = built("llava", "eager")
    inputs = CASES["llava"].make_inputs(model, default_samples())
    layers = adapter_for(model).parts().decoder_layers
    c = tz.ST3(retain=0.5, anneal=True, anneal_steps=2)
    assert c.boundaries(len(layers)) == [1, 2] and c.decode_layer(len(layers)) == 2
    calls = []
    hook = layers[1].self_attn.register_forward_hook(lambda m, a, out: calls.append(out[1].detach()))
    try:
        _, _, state = _st3_generate(model, inputs, c, steps=2)
    finally:
        hook.remove()
    weights = calls[1].mean(1)[:, 0]  # the first decoding step: [B, K], K = stage-1 width + 1
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    image_token = adapter_for(model).parts().media_token_ids["image"]
    items = [(b, it) for b, s in enumerate(c.last_stats) for it in s["image"].items]
    positions, dropped = [], [set() for _ in range(ids.shape[0])]
    for b in range(ids.shape[0]):
        where = (ids[b] == image_token).nonzero().flatten().tolist()
        for it in c.last_stats[b]["image"].items:
            pos, where = where[: it.tokens_in], where[it.tokens_in:]
            positions.append(pos)
            dropped[b].update(p for p, src in zip(pos, it.stage_sources[0].tolist()) if src < 0)
    kept = [[p for p in range(ids.shape[1]) if mask[b, p] and p not in dropped[b]] for b in range(ids.shape[0])]
    width = weights.shape[1] - 1
    assert width == max(len(k) for k in kept)
    for j, (b, it) in enumerate(items):
        column = {p: width - len(kept[b]) + i for i, p in enumerate(kept[b])}
        alive = it.index.tolist()  # what PVTP kept: the entries VTA starts from
        scores = torch.stack([weights[b, column[positions[j][i]]] for i in alive])
        keep = c.anneal_count(it.tokens_in, len(alive))
        expected = sorted(alive[o] for o in torch.sort(scores, descending=True, stable=True).indices[:keep].tolist())
        assert state.decode.history[0][j].tolist() == expected


def test_a_multi_stage_method_joins_a_compose_pipeline_as_its_parts():
    """tz.compose(input-stage method, mustdrop) runs uniform_frames, then MustDrop's pre-LLM part, then its LLM part;
    a second pre-LLM method for the same modality is refused (one pre-LLM method per modality)."""
    c = tz.compose(tz.get("uniform_frames", retain=0.5), tz.get("mustdrop", retain=0.25))
    assert [p.info.name for p in c.parts] == ["uniform_frames", "mustdrop_merge", "mustdrop_filter"]
    with pytest.raises(ValueError, match="one pre-LLM method per modality"):
        tz.compose(tz.get("visionzip", retain=0.5), tz.get("vscan", retain=0.25))
