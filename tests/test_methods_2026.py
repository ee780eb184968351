"""One check of each 2025-2026 method's own algorithm, on small cases worked out by hand (issue 22). The generic
tensor-level checks (exact budget, determinism, batch independence) come from tests/test_methods.py."""

import pytest
import torch

import tokenzip as tz
from tokenzip import ops
from tokenzip.adapters import adapter_for
from tokenzip.testing import default_samples, llava_inputs, llava_onevision_inputs

from conftest import built

torch.set_num_threads(1)


# ---- DART -----------------------------------------------------------------------------------------------------------

def test_dart_keeps_image_pivots_and_the_least_duplicated_tokens():
    """Six 2-D tokens. L1 norms: t0 = 3 (largest) -> the one image pivot. One text pivot: the text token of largest
    L1 norm, (0, 2). k = 4: 3 slots over 2 pivots -> quotas [2, 1]. The image pivot t0 = (3, 0) takes the two tokens
    least similar to it (cosine): t3 = (-1, 0) (cos -1) and t4 = (0, 1) or t5 = (0, 1.5) (cos 0, tie -> earlier t4).
    The text pivot (0, 2) then takes from t1, t2, t5 the least similar one: t1 = (1, 0.1)'s cosine is about 0.0995,
    t2 = (1, -0.2)'s is negative -> t2. Kept: {0, 2, 3, 4}."""
    tokens = torch.tensor([[[3.0, 0.0], [1.0, 0.1], [1.0, -0.2], [-1.0, 0.0], [0.0, 1.0], [0.0, 1.5]]])
    text = torch.tensor([[[0.1, 0.1], [0.0, 2.0], [0.5, 0.5]]])
    out = tz.DART(tokens=4, image_pivots=1, text_pivots=1).compress(tokens, text=text)
    assert out.index[0].tolist() == [0, 2, 3, 4]
    assert torch.equal(out.tokens[0], tokens[0, [0, 2, 3, 4]])
    # padding text tokens (text_mask False) are never pivots: a text token (-3, 0) of L1 norm 3 would be the pivot
    # and take t1 (cos with (-1, 0) = -0.995, lower than t2's -0.98 and t5's 0); masked out, (0, 2) is the pivot again
    text2 = torch.tensor([[[0.0, 2.0], [-3.0, 0.0]]])
    c = tz.DART(tokens=4, image_pivots=1, text_pivots=1)
    assert c.compress(tokens, text=text2).index[0].tolist() == [0, 1, 3, 4]
    assert c.compress(tokens, text=text2, text_mask=torch.tensor([[True, False]])).index[0].tolist() == [0, 2, 3, 4]
    # no text after the item: the image pivot takes all three slots: t3 (cos -1), t4 and t5 (cos 0)
    alone = tz.DART(tokens=4, image_pivots=1, text_pivots=1).compress(tokens, text=text[:, :0])
    assert alone.index[0].tolist() == [0, 3, 4, 5]
    # k <= image pivots: just the pivots by L1 norm (t0 = 3, then t5 = 1.5)
    assert tz.DART(tokens=2, image_pivots=4).compress(tokens, text=text).index[0].tolist() == [0, 5]


def test_dart_schedule_and_bad_input():
    assert tz.DART(retain=0.25).schedule(16, 8) == [(2, 4)]
    assert tz.DART(retain=0.25).schedule(16, 2) == [(1, 4)]
    assert tz.DART(retain=0.25, layer=3).schedule(16, 8) == [(3, 4)]
    with pytest.raises(ValueError, match="layer"):
        tz.DART(retain=0.5, layer=8).schedule(16, 8)
    for kwargs in ({"image_pivots": -1}, {"text_pivots": 1.5}, {"image_pivots": 0, "text_pivots": 0}):
        with pytest.raises(ValueError, match="pivots"):
            tz.DART(retain=0.5, **kwargs)


# ---- CDPruner -------------------------------------------------------------------------------------------------------

def test_cdpruner_prefers_diverse_relevant_tokens_and_falls_back_when_the_rank_is_spent():
    """Tokens t0 = t1 (duplicates), t2, t3 orthogonal. Relevance (cosine of ``projected`` to the one text token
    (1, 0)): 1, 1, 0.5, 0 -> r = 1, 1, 0.5, ~0. Gains start at r^2: t0 first (tie with t1 -> earlier); t1's gain
    then drops to 0 (a duplicate), so t2 (0.25) beats the more relevant duplicate. At k = 3 the remaining gains (t1:
    0, t3: ~1e-12) are spent: the last pick is the most relevant token left, t1. Without text every r is 1: t0, t2,
    t3."""
    tokens = torch.tensor([[[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]])
    projected = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.5, 0.75 ** 0.5], [0.0, 1.0]]])
    text, mask = torch.tensor([[[3.0, 0.0]]]), torch.tensor([[True]])
    c2, c3 = tz.CDPruner(tokens=2), tz.CDPruner(tokens=3)
    assert c2.compress(tokens, projected=projected, text=text, text_mask=mask).index[0].tolist() == [0, 2]
    assert c3.compress(tokens, projected=projected, text=text, text_mask=mask).index[0].tolist() == [0, 1, 2]
    assert c3.compress(tokens, projected=projected, text=text, text_mask=~mask).index[0].tolist() == [0, 2, 3]


def test_cdpruner_greedy_equals_the_determinant_greedy():
    """The incremental Cholesky update picks, step by step, the token that maximises det(L~_S) (brute force)."""
    from tokenzip.methods.cdpruner import greedy_dpp_map

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(12, 5, generator=g), dim=-1)
    r = torch.rand(12, generator=g) + 0.1
    kernel = (r[:, None] * (x @ x.T) * r[None, :]).double()
    picked = []
    for _ in range(5):
        dets = [float(torch.det(kernel[picked + [j]][:, picked + [j]])) if j not in picked else -1.0
                for j in range(12)]
        picked.append(max(range(12), key=lambda j: dets[j]))
    assert greedy_dpp_map(kernel, 5, r).tolist() == picked


# ---- SCOPE ----------------------------------------------------------------------------------------------------------

def test_scope_multiplies_saliency_by_coverage_gain():
    """t0 = t1 = (1, 0), t2 = (0, 1), t3 = (1, 1)/sqrt2. Coverage gains on the empty set (sums of positive
    cosines): 2.707, 2.707, 1.707, 3.121. Saliency 0.35, 0.4, 0.3, 0.2 -> scores 0.947, 1.083, 0.512, 0.624: t1.
    Then t0 adds nothing (a duplicate: gain 0), t2 adds 1 and t3 adds 1 (0.707 + 0.293): scores 0.3 vs 0.2 -> t2.
    The two most salient tokens would be t0 and t1. alpha = 0 (coverage alone): t3 first, then t0 and t1 both add
    2 * 0.293 = 0.586 > t2's 0.293 -> t0 (the earlier)."""
    tokens = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5 ** 0.5, 0.5 ** 0.5]]])
    attn = torch.tensor([[0.35, 0.4, 0.3, 0.2]])
    assert tz.SCOPE(tokens=2).compress(tokens, cls_attention=attn).index[0].tolist() == [1, 2]
    assert tz.SCOPE(tokens=2, alpha=0.0).compress(tokens, cls_attention=attn).index[0].tolist() == [0, 3]
    with pytest.raises(ValueError, match="alpha"):
        tz.SCOPE(tokens=2, alpha=-1.0)


def test_scope_incremental_gains_equal_recomputed_ones():
    """The gains updated from the rows whose coverage rose pick what recomputing C(S + j) - C(S) in full picks."""
    from tokenzip.methods.scope import scope_select

    g = torch.Generator().manual_seed(0)
    feats, saliency = torch.randn(60, 5, generator=g), torch.rand(60, generator=g)
    sim = ops.cosine_similarity_matrix(feats[None].double())[0]
    covered, picked = torch.zeros(60, dtype=torch.float64), []
    for _ in range(20):
        gain = (sim - covered[:, None]).clamp(min=0).sum(dim=0) * saliency.double()
        gain[picked] = float("-inf")
        picked.append(int(gain.argmax()))
        covered = torch.maximum(covered, sim[:, picked[-1]])
    assert scope_select(feats, saliency, 20).tolist() == picked


# ---- HiPrune --------------------------------------------------------------------------------------------------------

def test_hiprune_anchors_buffers_and_registers():
    """A 4x4 grid, alpha = 1: round(8 / 5) = 2 anchors at k = 8. Object-layer attention ranks token 10 (row 2,
    col 2) then token 3 (row 0, col 3). Anchor 10 brings its neighbours left 9, right 11, up 6, down 14; anchor 3
    brings 2 (left) and 7 (down) only: the flat index 3 + 1 = 4 is the next row, not a neighbour. At k = 10 the two
    registers are the deep layer's most attended of the rest: 4 and 0. At k = 3 one anchor, 10, fills the budget with
    its first two neighbours."""
    tokens = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(0))
    mid = torch.full((1, 16), 0.01)
    mid[0, 10], mid[0, 3] = 0.5, 0.3
    deep = torch.full((1, 16), 0.01)
    deep[0, 10], deep[0, 4], deep[0, 0] = 1.0, 0.9, 0.8  # 10 is already an anchor: not a register again
    c = tz.HiPrune(tokens=8, alpha=1.0)
    assert c.compress(tokens, grid=(4, 4), mid_attention=mid, cls_attention=deep).index[0].tolist() == \
        [2, 3, 6, 7, 9, 10, 11, 14]
    ten = tz.HiPrune(tokens=10, alpha=1.0).compress(tokens, grid=(4, 4), mid_attention=mid, cls_attention=deep)
    assert ten.index[0].tolist() == [0, 2, 3, 4, 6, 7, 9, 10, 11, 14]
    assert tz.HiPrune(tokens=3, alpha=1.0).compress(
        tokens, grid=(4, 4), mid_attention=mid, cls_attention=deep).index[0].tolist() == [9, 10, 11]
    # alpha = 0: registers only, i.e. the deep layer's top k
    assert tz.HiPrune(tokens=3, alpha=0.0).compress(
        tokens, grid=(4, 4), mid_attention=mid, cls_attention=deep).index[0].tolist() == [0, 4, 10]
    with pytest.raises(ValueError, match="alpha"):
        tz.HiPrune(tokens=3, alpha=1.5)


def test_llava_mid_attention_is_the_object_layers_attention_received():
    """The adapter's ``mid_attention`` against eager attention weights: the tiny tower has 3 layers, so the object
    layer is round(3 * 3 / 8) = 1 (1-based), i.e. ``attentions[0]``; mean over heads and every query ([CLS]
    included), the [CLS] column dropped (the default select strategy drops [CLS] from the features)."""
    model = built("llava", "eager")
    inputs = llava_inputs(model, default_samples())
    items = adapter_for(model).encode(inputs, frozenset({"mid_attention", "cls_attention"}))
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"], output_attentions=True, return_dict=True)
    expect = out.attentions[0].mean(dim=(1, 2))[:, 1:]
    assert len(items) == expect.shape[0]
    for i, it in enumerate(items):
        torch.testing.assert_close(it.signals["mid_attention"], expect[i], atol=1e-6, rtol=1e-5)
        assert not torch.allclose(it.signals["mid_attention"], it.signals["cls_attention"])


# ---- TokenCarve -----------------------------------------------------------------------------------------------------

def test_tokencarve_information_contribution_and_rank_sum():
    from tokenzip.methods.tokencarve import borda, information_contribution

    # orthogonal rows: U = I (up to signs), S = (3, 2, 1): row i contributes |U S| row sum = its singular value
    x = torch.tensor([[0.0, 3.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(information_contribution(x), torch.tensor([3.0, 2.0, 1.0]))
    assert borda(torch.tensor([0.1, 0.4, 0.4, 0.2])).tolist() == [1.0, 4.0, 3.0, 2.0]  # tie: the earlier ranks higher


def test_tokencarve_selects_then_merges_the_most_similar_candidate():
    """weight = 1 (attention ranks alone). k = 2, candidates 1.5 -> R = 3 candidates: t0, t3, t5 by attention. A =
    {t0}, B = {t3, t5}; R - k = 1 B token merges: t3 (cosine 0.9 to t0, t5's is 0.1) -> groups {0, 3} (their mean)
    and {5}. With candidates = 1 nothing merges: the top 2 by attention."""
    tokens = torch.tensor([[[1.0, 0.0], [0.0, -1.0], [-1.0, 0.0], [0.9, 0.19 ** 0.5], [0.5, -0.5],
                            [0.1, 0.99 ** 0.5]]])
    att = torch.tensor([[0.5, 0.01, 0.02, 0.3, 0.02, 0.15]])
    out = tz.TokenCarve(tokens=2, weight=1.0).compress(tokens, last_attention=att)
    assert out.groups(0) == [[0, 3], [5]]
    torch.testing.assert_close(out.tokens[0, 0], tokens[0, [0, 3]].mean(0))
    assert torch.equal(out.tokens[0, 1], tokens[0, 5])
    plain = tz.TokenCarve(tokens=2, weight=1.0, candidates=1.0).compress(tokens, last_attention=att)
    assert plain.groups(0) == [[0], [3]]
    for kwargs in ({"weight": 1.5}, {"candidates": 2.5}, {"layer": 0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            tz.TokenCarve(tokens=2, **kwargs)


# ---- AdaFV ----------------------------------------------------------------------------------------------------------

def test_adafv_splits_the_budget_by_the_geometric_mean_objective():
    """k = 4, base share 0.25: one token by text-to-image score (t0), one by [CLS] attention (t3), two left. Rest in
    text-to-image order: t1 (0.3), t2 (0.1), ...; in [CLS] order: t4 (0.2), t5 (0.15), ... Splits (k1 by text): 0 ->
    0 * 0.35 = 0; 1 -> 0.3 * 0.2 = 0.06; 2 -> 0.4 * 0 = 0. So t1 and t4: {0, 1, 3, 4}."""
    from tokenzip.methods.adafv import mixture_select, text_to_image

    t2i = torch.tensor([0.50, 0.30, 0.10, 0.05, 0.02, 0.01, 0.01, 0.01])
    cls = torch.tensor([0.05, 0.02, 0.03, 0.40, 0.20, 0.15, 0.10, 0.05])
    assert sorted(mixture_select(t2i, cls, 4, 0.25).tolist()) == [0, 1, 3, 4]
    # a token high in both rankings is taken once: t0 leads both, so the [CLS] base is the next one, t3
    both = cls.clone()
    both[0] = 0.9
    assert sorted(mixture_select(t2i, both, 4, 0.25).tolist()) == [0, 1, 3, 4]
    # the text-to-image score: softmax over the image tokens at temperature 100 of the cosine, max over text tokens
    proj = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    got = text_to_image(proj, text, torch.tensor([True, True]), 100.0)
    cos = torch.tensor([[0.0, 1.0, 0.5 ** 0.5], [1.0, 0.0, 0.5 ** 0.5]])
    torch.testing.assert_close(got, torch.softmax(100 * cos, dim=-1).max(dim=0).values)
    # end to end: no text -> the [CLS] top k
    tokens = torch.randn(1, 8, 3, generator=torch.Generator().manual_seed(0))
    out = tz.AdaFV(tokens=3).compress(tokens, cls_attention=cls[None], projected=torch.randn(1, 8, 2),
                                      text=torch.randn(1, 2, 2), text_mask=torch.zeros(1, 2, dtype=torch.bool))
    assert out.index[0].tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="base_share"):
        tz.AdaFV(tokens=3, base_share=0.6)


# ---- GlobalCom2 -----------------------------------------------------------------------------------------------------

def test_globalcom2_thumbnail_commands_the_crops():
    """Base view 2x2, crop grid 2x4 (+ newline column): crop 1 = columns 0-1, crop 2 = columns 2-3. k = 6: both
    newlines stay, 4 left of 12 (r = 1/3): the base gets round(4 * 4 / 12) = 1 (its most attended token, 1), the crops
    3. The thumbnail map [[0.1, 0.9], [0.1, 0.9]] resized to 2x4 is [0.1, 0.3, 0.7, 0.9] per row, so crop 2 matters
    more (3.2 vs 0.8); at temperature 0.01 its ratio is 1.5 r against 0.5 r: 2 tokens vs 1. In crop 1 the own
    attention singles out (1, 0) (position 9); in crop 2 (own attention uniform) the thumbnail favours column 3:
    positions 7 and 12."""
    from tokenzip import layout as L

    layout = L.Layout([L.Segment("base", 1, 2, 2), L.Segment("crops", 1, 2, 5, newline=True)])
    region = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2, -1, 1, 1, 2, 2, -1]], dtype=torch.float)
    cls = torch.tensor([[0.1, 0.9, 0.1, 0.9, 0, 0, 1, 1, 0, 1, 0, 1, 1, 0]], dtype=torch.float)
    tokens = torch.randn(1, 14, 3, generator=torch.Generator().manual_seed(0))
    out = tz.GlobalCom2(tokens=6, temperature=0.01).compress(tokens, grid=layout, cls_attention=cls,
                                                            anyres_region=region)
    assert out.index[0].tolist() == [1, 7, 8, 9, 12, 13]
    # not tiled (no crop grid): the top k by attention, the newline kept
    flat = tz.GlobalCom2(tokens=3).compress(tokens[:, :5], cls_attention=cls[:, [0, 1, 2, 3, 8]],
                                            anyres_region=torch.tensor([[0.0, 0, 0, 0, -1]]))
    assert flat.index[0].tolist() == [1, 3, 4]
    with pytest.raises(ValueError, match="temperature"):
        tz.GlobalCom2(tokens=3, temperature=0)


def test_llava_onevision_anyres_region_follows_the_packing():
    """0 on the base view, -1 exactly at the newline markers, and in the 2x2-crop image of sample 0 (an 8x8 crop
    grid from four 4x4 crops) crop j's quadrant in row-major crop order."""
    model = built("llava_onevision")
    items = adapter_for(model).encode(llava_onevision_inputs(model, default_samples()),
                                      frozenset({"anyres_region"}))
    for it in items:
        region = it.signals["anyres_region"]
        base = it.grid.segments[0].h * it.grid.segments[0].w
        assert bool((region[:base] == 0).all())
        assert (region == -1).tolist() == it.extra["newline"].tolist()
    grid = items[0].signals["anyres_region"][16:].view(8, 9)[:, :8]
    quadrants = torch.tensor([[1, 2], [3, 4]]).repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert torch.equal(grid, quadrants.float())
