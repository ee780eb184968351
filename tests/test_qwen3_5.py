"""Qwen3.5 (tokenzip/adapters/qwen3_5.py): positions of kept image and video tokens, and the hybrid LLM inside the
LLM stage: dropped tokens never enter the later layers (linear-attention ones included), decoding continues from
the shortened hybrid cache (K/V, convolution and recurrent states) exactly as the removal oracle
(tests/hybrid_oracle.py) decodes, the linear-first layer pattern of the released models, and the MoE class."""

import pytest
import torch

import tokenzip as tz
from tokenzip.adapters import Qwen3_5Adapter, adapter_for
from tokenzip.compat import attention_seq_length, cache_kwarg, output_cache
from tokenzip.testing import (
    CASES,
    IMAGE_TOKEN,
    default_samples,
    qwen3_vl_positions,
    qwen3_vl_video_inputs,
    qwen_vl_inputs,
    tiny_qwen3_5,
)

from conftest import built
from hybrid_oracle import greedy, prompt_call
from mrope_checks import (
    assert_encoder_cut_equals_stock_blocks,
    assert_encoder_schedule_lossless_and_at_budget,
    assert_kept_positions,
)

torch.set_num_threads(1)

LINEAR_FIRST = ("linear_attention", "linear_attention", "linear_attention", "full_attention")


@pytest.mark.parametrize("case,method", [("qwen3_5", lambda: tz.ClsTopK(retain=0.4)),
                                         ("qwen3_5", lambda: tz.ToMe(retain=0.4)),
                                         ("qwen3_5_video", lambda: tz.DyCoke(retain=0.4))])
def test_kept_tokens_keep_their_uncompressed_positions_and_decoding_continues(case, method):
    assert_kept_positions(case, method())


def _kept_plan(c, inputs, b=0):
    """``{layer: [(groups, dropped)]}`` of a selection-only method's run on sample ``b`` of ``inputs`` (unpadded
    positions), for :func:`hybrid_oracle.run_layers`."""
    ids = inputs["input_ids"][b]
    pad = int((inputs["attention_mask"][b] == 0).sum())
    where = ((ids == IMAGE_TOKEN).nonzero().flatten() - pad).tolist()
    plan, start = {}, 0
    for it in c.last_stats[b]["image"].items:
        alive = where[start: start + it.tokens_in]
        start += it.tokens_in
        for (layer, _), src in zip(it.stages, it.stage_sources):
            kept = [p for p, slot in zip(alive, src.tolist()) if slot >= 0]
            plan.setdefault(layer, []).append(([[p] for p in kept], sorted(set(alive) - set(kept))))
            alive = kept
    return plan


def test_dropped_tokens_never_enter_later_layers_and_the_cache_is_shortened():
    """FastV before layer 1: layers 1-3 (two Gated DeltaNet layers, then full attention) run on the kept sequence
    only, as wide as the longest kept row; the cache holds full-length K/V for layer 0 and kept-length K/V for
    layer 3, and the linear layers' states come from the kept sequence."""
    model = built("qwen3_5")
    adapter = adapter_for(model)
    inputs = CASES["qwen3_5"].make_inputs(model, default_samples())
    width = {}
    hooks = [adapter.llm_mixer(i).register_forward_pre_hook(
        lambda m, a, kw, i=i: width.__setitem__(i, (a[0] if a else kw["hidden_states"]).shape[1]), with_kwargs=True)
        for i in range(4)]
    c = tz.FastV(retain=0.3, layer=1)
    try:
        with c(model), torch.no_grad():
            out = model(**inputs, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    cache = output_cache(out)
    mask = inputs["attention_mask"]
    kept = [int(mask[b].sum()) - sum(it.tokens_in - it.tokens_out for it in c.last_stats[b]["image"].items)
            for b in range(3)]
    assert width == {0: mask.shape[1], 1: max(kept), 2: max(kept), 3: max(kept)}
    assert attention_seq_length(cache, 0) == mask.shape[1]
    assert attention_seq_length(cache, 3) == max(kept) < mask.shape[1]
    for i in (1, 2):  # conv window and recurrent state exist for the linear layers: [B, ...]
        assert cache.layers[i].conv_states is not None and cache.layers[i].recurrent_states is not None


@pytest.mark.parametrize("layers,make", [(None, lambda: tz.FastV(retain=0.3, layer=1)),
                                         (None, lambda: tz.PyramidDrop(retain=0.25)),
                                         (LINEAR_FIRST, lambda: tz.VTW(retain=0.5))],
                         ids=["fastv", "pyramiddrop", "vtw-linear-first"])
def test_decoding_from_the_shortened_hybrid_cache_equals_the_removal_oracle(layers, make):
    """Prefill with the method, then decode step by step from the returned cache (no position ids: the model's
    rope_deltas): every step's logits and greedy token equal the removal oracle's, recomputed without cache over
    [kept prompt + generated tokens]; generate() gives the same tokens."""
    model = built("qwen3_5") if layers is None else tiny_qwen3_5(layer_types=layers)
    kinds = adapter_for(model).llm_layer_kinds()
    one = qwen_vl_inputs(model, default_samples()[1:2])
    c = make()
    steps = 4
    suppress = list(model.generation_config.suppress_tokens)
    length = one["input_ids"].shape[1]
    top = int(qwen3_vl_positions(model, one)[1:].max())
    logits, tokens = [], []
    with c(model), torch.no_grad():
        out = model(**one, use_cache=True)
        cache, mask = output_cache(out), one["attention_mask"]
        for j in range(steps):
            last = out.logits[0, -1].clone()
            logits.append(out.logits[0, -1])
            last[suppress] = float("-inf")
            tokens.append(int(last.argmax()))
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
            # the uncompressed model's next position (text row: the causal mask; M-RoPE rows: max + 1), as
            # generate() passes it
            pos = torch.tensor([length + j] + [top + 1 + j] * 3).view(4, 1, 1)
            out = model(input_ids=torch.tensor([[tokens[-1]]]), attention_mask=mask, position_ids=pos,
                        **{cache_kwarg(model): cache}, use_cache=True)
            cache = output_cache(out)
        gen = model.generate(**one, max_new_tokens=steps, do_sample=False)
    plan = _kept_plan(c, one)
    assert sum(len(d) for entries in plan.values() for _, d in entries) > 0
    embeds, positions = prompt_call(model, one, qwen3_vl_positions(model, one))
    ref_tokens, ref_logits = greedy(model, kinds, embeds, positions, plan, steps)
    assert tokens == ref_tokens
    for got, ref in zip(logits, ref_logits):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    assert gen[0, one["input_ids"].shape[1]:].tolist() == tokens


def test_attention_scores_need_a_full_attention_layer_before_the_stage():
    """The released models start with linear-attention layers: a method that scores with attention before layer 2
    has no attention to read there (a ValueError naming the full-attention layers); after the first full-attention
    layer it reads the last one before its stage."""
    model = tiny_qwen3_5(layer_types=LINEAR_FIRST + ("linear_attention", "full_attention"))
    inputs = qwen_vl_inputs(model, default_samples())
    with tz.FastV(retain=0.3, layer=2)(model), pytest.raises(ValueError, match=r"attention layers: \[3, 5\]"):
        model(**inputs)
    c = tz.FastV(retain=0.3, layer=5)
    with c(model), torch.no_grad():  # layer 4 is linear: the scores come from layer 3
        model(**inputs)
    items = [it for stats in c.last_stats for ms in stats.values() for it in ms.items]
    assert len(items) == 4 and all(it.stages == [(5, it.tokens_out)] and it.tokens_out < it.tokens_in
                                   for it in items)


def test_moe_class():
    """Qwen3.5-MoE: the same adapter; retain=1 is the stock model bit for bit before and inside the LLM."""
    model = tiny_qwen3_5(moe=True)
    assert isinstance(adapter_for(model), Qwen3_5Adapter)
    inputs = qwen_vl_inputs(model, default_samples())
    pos = qwen3_vl_positions(model, inputs)
    with torch.no_grad():
        ref = model(**inputs, position_ids=pos).logits
        for c in (tz.ClsTopK(retain=1.0), tz.FastV(retain=1.0, layer=1)):
            with c(model):
                assert torch.equal(model(**inputs, position_ids=pos).logits, ref)
        with tz.FastV(retain=0.3, layer=1)(model):
            short = model(**inputs, position_ids=pos).logits
    assert not torch.allclose(short[:, -1], ref[:, -1])


def test_compose_pre_llm_then_llm_stage_on_the_hybrid_llm():
    """A pre-LLM method on the merger output, then FastV in the hybrid LLM: the LLM stage finds the shortened
    items (precomputed features), each part keeps its own budget of what it receives, and generate() continues the
    prompt from the shortened hybrid cache."""
    model = built("qwen3_5")
    inputs = CASES["qwen3_5"].make_inputs(model, default_samples())
    c = tz.compose(tz.get("avgpool", retain=0.5), tz.FastV(retain=0.5, layer=1))
    with c(model), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    items = [it for stats in c.last_stats for it in stats["image"].items]
    assert len(items) == 4 and all(it.tokens_out == c.effective(it.tokens_in, 4) < it.tokens_in for it in items)


def test_bad_inputs():
    model = built("qwen3_5")
    inputs = CASES["qwen3_5"].make_inputs(model, default_samples()[:1])
    with tz.ClsTopK(retain=0.5)(model):
        with pytest.raises(ValueError, match="mm_token_type_ids is required"):
            model(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"})
        bad = {**inputs, "image_grid_thw": inputs["image_grid_thw"] * torch.tensor([[1, 2, 1]])}
        with pytest.raises(ValueError, match="patches"):
            model(**bad)
        with pytest.raises(ValueError, match=r"position_ids must be \[3, B, L\] or \[4, B, L\]"):
            model(**inputs, position_ids=inputs["attention_mask"].cumsum(-1) - 1)


# ---- stage "encoder" (tokenzip/adapters/merge_unit_vit.py) ---------------------------------------------------------
def deep_vit():
    """The case's class with a 3-block ViT: cuts after blocks 1 and 2, each with a block after it."""
    return tiny_qwen3_5(vision_depth=3)


@pytest.mark.parametrize("cut", [1, 2])
@pytest.mark.parametrize("case", ["qwen3_5", "qwen3_5_video"])
def test_encoder_cut_equals_the_stock_blocks_on_the_kept_units(case, cut):
    """Every other merge unit of each image / clip kept after block ``cut - 1``: the tokens are the model's own ViT
    forward cut to those units by hooks (later blocks, one segment per temporal grid of the units left, then its
    tail)."""
    assert_encoder_cut_equals_stock_blocks(deep_vit(), case, "video" if case.endswith("video") else "image", cut)


@pytest.mark.parametrize("case,name", [("qwen3_5", "tome"), ("qwen3_5_video", "dycoke")])
def test_encoder_schedule_is_lossless_at_retain_one_and_reaches_the_budget(case, name):
    assert_encoder_schedule_lossless_and_at_budget(deep_vit(), case, name)


def test_encoder_stage_is_declared_and_bad_cuts_are_refused():
    assert CASES["qwen3_5"].stages == ("pre_llm", "encoder", "llm")
    model = built("qwen3_5")  # 2 vision blocks: one cut, after block 1
    with pytest.raises(ValueError, match=r"in \[1, 1\]"):
        tz.InEncoder(tz.ToMe(retain=0.5), layer=3)(model)
    with pytest.raises(TypeError, match="projected"):
        tz.InEncoder(tz.get("trim", retain=0.5), layer=1)(model)


# ---- stage "input": "frames" (whole timestamped blocks of temporal grids, as on Qwen3-VL) and "resolution" ----------
@pytest.mark.parametrize("outer_pair", [True, False], ids=["template-pair", "collapsed"])
def test_kept_temporal_grids_are_the_clip_the_processor_gives_for_them(outer_pair):
    """Qwen3.5's prompts are Qwen3VLProcessor's: dropping grids (the first ones too) leaves exactly the prompt and
    pixels of a clip of the kept frames (each kept grid after its own timestamp), and their tokens are the full
    clip's."""
    model = built("qwen3_5_video")
    samples = default_samples()
    inputs = qwen3_vl_video_inputs(model, samples, outer_pair=outer_pair)
    keeps = [[1, 2], [2], [1], [0, 1]]
    adapter = adapter_for(model)
    plan = adapter.input_plan(inputs, "frames")
    for p, keep in zip(plan, keeps):
        p.keep = torch.tensor(keep)
    targets = [len(keep) * p.tokens // p.extra["thw"][0] for p, keep in zip(plan, keeps)]
    new, maps = adapter.rescale_inputs(inputs, "frames", plan, targets)
    oracle = qwen3_vl_video_inputs(model, samples, outer_pair=outer_pair, grids=keeps)
    assert set(new) == set(oracle)
    for key, value in oracle.items():
        assert torch.equal(new[key], value), key
    assert [p.text_removed for p in plan] == [7, 14, 7, 0]  # 5 timestamp tokens + the markers per dropped grid
    with torch.no_grad():
        full = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
        short = model.model.get_video_features(new["pixel_values_videos"], new["video_grid_thw"]).pooler_output
    for f, s, (_, index) in zip(full, short, maps):
        torch.testing.assert_close(s, f[index], atol=1e-5, rtol=1e-5)


def test_frame_selection_through_the_patch_equals_the_stock_model_on_the_kept_frames():
    model = built("qwen3_5_video")
    samples = default_samples()
    inputs = qwen3_vl_video_inputs(model, samples)
    c = tz.get("uniform_frames", tokens=8)
    with c(model), torch.no_grad():
        out = model(**inputs).logits
    keeps = []
    for stats in c.last_stats:
        for it in stats["video"].items:
            per_grid = it.tokens_in // it.grid.segments[0].t
            keeps.append(sorted(set((it.index // per_grid).tolist())))
            assert it.text_removed == 7 * (it.grid.segments[0].t - len(keeps[-1]))
    assert keeps == [[0, 2], [0], [0], [0]]
    with torch.no_grad():
        ref = model(**qwen3_vl_video_inputs(model, samples, grids=keeps)).logits
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_frames_then_an_llm_stage_method_counts_both():
    """Frames, then FastV inside the hybrid LLM: the stats carry the removed timestamp text, and the LLM's first
    layer reads the prompt less the dropped grids' blocks."""
    model = built("qwen3_5_video")
    inputs = qwen3_vl_video_inputs(model, default_samples())
    c = tz.compose(tz.get("uniform_frames", tokens=8), tz.FastV(retain=0.5, layer=1))
    seen = []
    lm = model.model.language_model
    h = lm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["attention_mask"].clone()), with_kwargs=True)
    try:
        with c(model), torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    for b, stats in enumerate(c.parts[0].last_stats):
        items = stats["video"].items
        assert all(it.text_removed == 7 * (it.grid.segments[0].t - len(set((it.index // (
            it.tokens_in // it.grid.segments[0].t)).tolist()))) for it in items)
        removed = sum(it.tokens_in - it.tokens_out + it.text_removed for it in items)
        assert removed > 0 and int(seen[0][b].sum()) == int(inputs["attention_mask"][b].sum()) - removed


def test_frames_is_declared():
    """Both adapters on adapters/mrope_vl.py declare "frames", each with its processor's span finder (Qwen3.5's
    timestamp before each block, GLM's after it), and the invariant suite pairs the frame methods with both."""
    from tokenzip.adapters import Glm4vAdapter
    from tokenzip.adapters import temporal_grids as TG

    from conftest import method_case_pairs

    assert Qwen3_5Adapter.input_reductions == Glm4vAdapter.input_reductions == ("resolution", "frames")
    assert Qwen3_5Adapter.frame_block_spans is TG.leading_timestamp_spans
    assert Glm4vAdapter.frame_block_spans is TG.trailing_timestamp_spans
    pairs = {p.id for p in method_case_pairs()}
    assert {"uniform_frames-qwen3_5_video", "uniform_frames-glm4v_video"} <= pairs
