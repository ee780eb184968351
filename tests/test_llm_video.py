"""LLM-stage video methods: FrameFusion's merge rule and cascade against oracles written here from scratch."""

import pytest
import torch
import torch.nn.functional as F
from test_llm_stage import _case_forward, assert_equals_mask_oracle

from tokenzip import layout as L
from tokenzip.adapters import adapter_for
from tokenzip.llm.base import StageContext
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
