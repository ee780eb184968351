"""LLM-stage video methods: FrameFusion's merge rule and cascade against oracles written here from scratch."""

import pytest
import torch
import torch.nn.functional as F
from test_llm_stage import _case_forward, assert_equals_mask_oracle

from tokenzip import layout as L
from tokenzip.adapters import adapter_for
from tokenzip.compat import cache_kwarg, output_cache
from tokenzip.llm.base import StageContext
from tokenzip.llm.hooks import STATE_ATTR
from tokenzip.methods.dycoke_kv import DyCokeKV
from tokenzip.methods.framefusion import FrameFusion
from tokenzip.testing import CASES, default_samples

from conftest import built

CASE = "llava_onevision_video"


def _partition(source):
    """The groups of a ``source`` map (input index -> output slot) as a set of frozensets."""
    groups = {}
    for i, slot in enumerate(source.tolist()):
        if slot >= 0:
            groups.setdefault(slot, set()).add(i)
    return {frozenset(g) for g in groups.values()}


# ---- tensor level -------------------------------------------------------------------------------------------------
def _clip(frames=3, side=2, dim=8, seed=0):
    """Random frame tokens on a ``side x side`` grid plus a trailing newline token, and its layout."""
    g = torch.Generator().manual_seed(seed)
    lay = L.Layout([L.Segment("frames", frames, side, side), L.Segment("newline", 1, 1, 1)])
    return torch.randn(1, lay.n, dim, generator=g), lay


def test_merge_joins_runs_into_the_same_position_of_the_earliest_frame():
    tokens, lay = _clip()
    tokens[0, 4] = tokens[0, 0] * 2.0  # frame 1, position 0 repeats frame 0 (cosine 1)
    tokens[0, 8] = tokens[0, 4] * 3.0  # frame 2, position 0 repeats frame 1: a run of two -> into token 0
    tokens[0, 9] = tokens[0, 1] + 1e-3  # frame 2, position 1 repeats frame 0's, not frame 1's: no merge
    tokens[0, 12] = tokens[0, 11]  # the newline repeats a frame token: never merged
    c = FrameFusion(tokens=3, threshold=0.99)
    ctx = StageContext(lay, lay.n, torch.arange(lay.n))
    out = c.stage(tokens, 3, final=3, last=False, signals={}, context=ctx)
    assert _partition(out.source[0]) == {frozenset({0, 4, 8})} | {frozenset({i}) for i in range(13)
                                                                  if i not in (0, 4, 8)}
    slot = int(out.source[0, 0])
    torch.testing.assert_close(out.tokens[0, slot], tokens[0, [0, 4, 8]].mean(0))  # plain mean of the members
    assert out.index[0].tolist() == [i for i in range(13) if i not in (4, 8)]
    # 2 of 12 frame tokens merged (17 % >= min_share 10 %): the cascade goes on
    assert not ctx.memo.get("merged")


def test_cascade_compares_with_the_representative_and_stops_below_min_share():
    tokens, lay = _clip(frames=4)
    c = FrameFusion(tokens=2, threshold=0.99, min_share=0.5)
    # after a first merge of frame 1 into frame 0 at position 0, the next stage compares frame 2 with that
    # representative (token 0): the remaining tokens are every token but 4
    index = torch.tensor([i for i in range(lay.n) if i != 4])
    cur = tokens[:, index].clone()
    cur[0, 7] = cur[0, 0]  # original token 8 (frame 2, position 0) now repeats the merged token 0
    ctx = StageContext(lay, lay.n, index)
    out = c.stage(cur, 2, final=2, last=False, signals={}, context=ctx)
    assert frozenset({0, 7}) in _partition(out.source[0])
    assert ctx.memo["merged"]  # 1 of 15 frame tokens merged < 50 %: merging stops
    score = torch.rand(1, out.tokens.shape[1], generator=torch.Generator().manual_seed(1))
    pruned = c.stage(out.tokens, 2, final=2, last=False, signals={"last_attention": score,
                                                                    "text_attention": score[:, None]},
                     context=StageContext(lay, lay.n, index[out.index[0]], ctx.memo))
    assert pruned.index[0].tolist() == sorted(torch.topk(score[0], 2).indices.tolist())


def test_merge_never_goes_below_the_budget():
    tokens, lay = _clip(frames=3)
    tokens[0, 4:12] = tokens[0, 0:8].clone()  # frames 1 and 2 repeat the previous frame: 8 merges possible
    ctx = StageContext(lay, lay.n, torch.arange(lay.n))
    out = FrameFusion(tokens=9, threshold=0.9).stage(tokens, 9, final=9, last=False, signals={}, context=ctx)
    assert out.tokens.shape[1] == 9 and ctx.memo["merged"]  # met by merging: no pruning stage follows


def test_bad_arguments():
    for kwargs, name in [({"threshold": 1.5}, "threshold"), ({"min_share": -0.1}, "min_share"),
                         ({"layers": 0}, "layers")]:
        with pytest.raises(ValueError, match=name):
            FrameFusion(retain=0.5, **kwargs)


# ---- inside the model ---------------------------------------------------------------------------------------------
def test_first_merge_equals_a_from_scratch_same_position_oracle():
    """Sample alone: the groups FrameFusion forms before layer 1 == adjacent-frame runs of same-position tokens
    whose cosine similarity (on the layer-1 input of the stock model) reaches the threshold."""
    model = built(CASE)
    inputs = CASES[CASE].make_inputs(model, default_samples()[:1])
    c = FrameFusion(retain=0.3, threshold=0.95)
    with c(model):
        _case_forward(CASE, model, inputs)
    it = c.last_stats[0]["video"].items[0]
    assert [layer for layer, _ in it.stages] == [1, 2]  # a merge, then the pruning stage
    cap = {}
    layer1 = adapter_for(model).parts().decoder_layers[1]
    h = layer1.register_forward_pre_hook(lambda m, a, kw: cap.update(h=a[0] if a else kw["hidden_states"]),
                                         with_kwargs=True)
    try:
        _case_forward(CASE, model, inputs)
    finally:
        h.remove()
    pos = (inputs["input_ids"][0] == model.config.video_token_id).nonzero().flatten()
    x = cap["h"][0, pos].float()
    per_frame = adapter_for(model).video_grid() ** 2
    frames = inputs["pixel_values_videos"].shape[1]
    target = list(range(x.shape[0]))
    for j in range(per_frame, frames * per_frame):
        if F.cosine_similarity(x[j], x[j - per_frame], dim=0) >= 0.95:
            target[j] = target[j - per_frame]
    expected = {}
    for j, t in enumerate(target):
        expected.setdefault(t, set()).add(j)
    assert _partition(it.stage_sources[0]) == {frozenset(g) for g in expected.values()}
    assert any(len(g) > 1 for g in expected.values())


@pytest.mark.parametrize("threshold", [0.6, 0.95])
def test_batch_equals_the_masking_oracle(threshold):
    """A ragged batch of 3 (merge to the budget at layer 1 / merge then prune): logits at kept positions and greedy
    generation == the stock model with the recorded merges (means) and drops imposed by masks."""
    model = built(CASE)
    inputs = CASES[CASE].make_inputs(model, default_samples())
    c = FrameFusion(retain=0.3, threshold=threshold)
    with c(model):
        out = _case_forward(CASE, model, inputs)
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    merged = [len(g) > 1 for s in c.last_stats for it in s["video"].items for g in _partition(it.stage_sources[0])]
    assert any(merged)
    assert_equals_mask_oracle(model, c, inputs, out, gen, lambda: _case_forward(CASE, model, inputs))


# ---- DyCoke's decode-time KV pruning ------------------------------------------------------------------------------
def _dycoke_kv_oracle(model, inputs, k, decode_at, steps):
    """Greedy decoding of ONE unpadded sample by the stock EAGER model, recomputed without cache at every step.

    At step ``s >= 1`` (the calls that continue a cache), the eager attention weights of layer ``decode_at - 1``
    for the last row (mean over heads) rank each clip's entries that are still alive; the clip keeps its ``k``
    best (ties: earlier). From then on, in layers ``>= decode_at``, every later query row (this step's included)
    no longer sees the dropped entries; rows computed before the drop (prompt, earlier steps) saw them, as their
    cached keys/values did. Returns (generated ids, per step >= 1: per clip the kept local indices)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    prompt = ids.shape[1]
    vid = (ids[0] == model.config.video_token_id).nonzero().flatten().tolist()
    n = len(vid) // inputs["pixel_values_videos"].shape[0]
    clips = [vid[j * n:(j + 1) * n] for j in range(len(vid) // n)]
    alive = [list(range(n)) for _ in clips]
    dropped_at = {}  # sequence position -> step it was dropped at
    layers = adapter_for(model).parts().decoder_layers
    state = {}
    history, generated = [], []

    def score(m, a, out):
        if state["step"] == 0:
            return
        row = out[1][0, :, -1].mean(0)  # [L] over the whole sequence
        kept_now = []
        for j, clip in enumerate(clips):
            vals = torch.stack([row[clip[i]] for i in alive[j]])
            order = torch.sort(vals, descending=True, stable=True).indices[:k].tolist()
            keep = sorted(alive[j][o] for o in order)
            for i in set(alive[j]) - set(keep):
                dropped_at[clip[i]] = state["step"]
            alive[j] = keep
            kept_now.append(keep)
        history.append(kept_now)

    def masked(i):
        def hook(m, args, kwargs):
            if i < decode_at:
                return None
            length = state["length"]
            rows = torch.arange(length)
            step_of_row = (rows - prompt + 1).clamp(min=0)
            drop_step = torch.full((length,), 10 ** 6)
            for p, s in dropped_at.items():
                drop_step[p] = s
            allowed = (rows[None, :] <= rows[:, None]) & (drop_step[None, :] > step_of_row[:, None])
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = torch.zeros(1, 1, length, length).masked_fill(~allowed, torch.finfo(
                torch.float32).min)
            return args, kwargs
        return hook

    handles = [layers[decode_at - 1].self_attn.register_forward_hook(score)]
    handles += [layer.register_forward_pre_hook(masked(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for step in range(steps):
            seq = torch.cat([ids, torch.tensor([generated], dtype=ids.dtype)], dim=1)
            state.update(step=step, length=seq.shape[1])
            full = torch.cat([mask, torch.ones(1, len(generated), dtype=mask.dtype)], dim=1)
            with torch.no_grad():
                logits = model(**{**inputs, "input_ids": seq, "attention_mask": full},
                               position_ids=(full.cumsum(-1) - 1).clamp(min=0), use_cache=False).logits
            generated.append(int(logits[0, -1].argmax()))
    finally:
        for h in handles:
            h.remove()
    return generated, history


def _kv_generate(model, inputs, c, steps=4):
    with c(model):
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True)
    cache = output_cache(out)
    return out.sequences[:, inputs["input_ids"].shape[1]:], cache, getattr(cache, STATE_ATTR)


def test_dycoke_kv_frees_the_dropped_entries_and_equals_the_oracle():
    """A ragged batch of 3 (one sample with two clips): the cache of layers >= the pruning layer really holds only
    the kept visual entries (tensor sizes), layers before it hold everything; every row's greedy tokens and kept
    sets equal the from-scratch eager oracle of that sample alone."""
    sdpa, eager = built(CASE), built(CASE, "eager")
    batch = CASES[CASE].make_inputs(sdpa, default_samples())
    c = DyCokeKV(retain=0.3)
    steps = 4
    new, cache, state = _kv_generate(sdpa, batch, c, steps)
    num_layers = len(adapter_for(sdpa).parts().decoder_layers)
    decode_at = c.decode_layer(num_layers)
    mask = batch["attention_mask"]
    clips = [[it for it in s["video"].items] for s in c.last_stats]
    kept = [int(mask[b].sum()) - sum(it.tokens_in - c.budget.count(it.tokens_in) for it in clips[b])
            for b in range(mask.shape[0])]
    for i, layer in enumerate(cache.layers):
        width = mask.shape[1] if i < decode_at else max(kept)  # the prompt part; then steps - 1 generated tokens
        assert tuple(layer.keys.shape[-2:-1]) == tuple(layer.values.shape[-2:-1]) == (width + steps - 1,), i
    assert cache.layers[decode_at].keys.shape[-2] < cache.layers[0].keys.shape[-2]
    for b, sample in enumerate(default_samples()):
        one = CASES[CASE].make_inputs(eager, [sample])
        ref, history = _dycoke_kv_oracle(eager, one, c.budget.count(clips[b][0].tokens_in), decode_at, steps)
        assert new[b].tolist() == ref
        owned = [j for j, (s, _, _) in enumerate(state.decode.items) if s == b]
        got = [[step[j].tolist() for j in owned] for step in state.decode.history]
        assert got == history


def test_dycoke_kv_sdpa_and_eager_keep_the_same_entries():
    runs = []
    for attn in ("sdpa", "eager"):
        model = built(CASE, attn)
        new, _, state = _kv_generate(model, CASES[CASE].make_inputs(model, default_samples()), DyCokeKV(retain=0.3))
        runs.append((new.tolist(), [[t.tolist() for t in step] for step in state.decode.history]))
    assert runs[0] == runs[1]


def test_dycoke_kv_top_p_keeps_shrinking_and_never_below_the_budget():
    c = DyCokeKV(tokens=2, mass=0.5)
    scores = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])
    assert c.decode_keep(scores, 5).tolist() == [1, 3]  # 0.5 alone does not exceed half: the two best
    assert c.decode_keep(torch.tensor([0.9, 0.1]), 5) is None  # already at the budget
    assert DyCokeKV(tokens=2).decode_keep(scores, 5).tolist() == [1, 3]
    assert DyCokeKV(tokens=1, mass=0.9).decode_keep(scores, 5).tolist() == [1, 2, 3]
    for kwargs, name in [({"layer": 0}, "layer"), ({"mass": 0.0}, "mass")]:
        with pytest.raises(ValueError, match=name):
            DyCokeKV(retain=0.5, **kwargs)


def test_dycoke_kv_restores_the_model_and_leaves_prefill_alone():
    model = built(CASE)
    inputs = CASES[CASE].make_inputs(model, default_samples())
    ref = _case_forward(CASE, model, inputs)
    with DyCokeKV(retain=0.3)(model):
        assert torch.equal(_case_forward(CASE, model, inputs), ref)  # prefill: the stock model
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(_case_forward(CASE, model, inputs), ref)


def test_dycoke_kv_top_p_shrinks_over_steps_and_a_later_turn_continues_the_cache():
    model = built(CASE)
    inputs = CASES[CASE].make_inputs(model, default_samples())
    c = DyCokeKV(retain=0.3, mass=0.6)
    with c(model):
        first = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        ids = torch.cat([first.sequences, torch.tensor([[30, 31, 32]] * 3)], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones(3, ids.shape[1] - inputs["input_ids"].shape[1],
                                                                dtype=torch.long)], dim=1)
        second = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                return_dict_in_generate=True, **{cache_kwarg(model): output_cache(first)})
    assert second.sequences.shape[1] == ids.shape[1] + 3
    cache = output_cache(second)
    state = getattr(cache, STATE_ATTR)
    counts = [[int(t.numel()) for t in step] for step in state.decode.history]
    budget = [c.budget.count(n) for _, n, _ in state.decode.items]
    for j in range(len(budget)):
        seq = [step[j] for step in counts]
        assert seq == sorted(seq, reverse=True) and seq[-1] >= budget[j]
    assert counts[0] != counts[-1]  # the top-p rule kept shrinking after the first step
    kept = max(int(inputs["attention_mask"][b].sum()) - sum(n - int(alive.numel()) for s, n, alive in
                                                             state.decode.items if s == b) for b in range(3))
    assert cache.layers[-1].keys.shape[-2] == kept + ids.shape[1] - inputs["input_ids"].shape[1] + 2
