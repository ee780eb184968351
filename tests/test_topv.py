"""TopV's own algorithm (tokenzip/methods/topv.py) on small cases worked out by hand. The generic checks (exact
budget, determinism, batch independence, the invariants and the LLM-stage masking oracle) come from the
registry-driven suites."""

import math

import pytest
import torch

import tokenzip as tz
from tokenzip.methods.topv import recovery_count, token_coordinates, topv_cost, topv_select, unbalanced_sinkhorn

torch.set_num_threads(1)

EYE = torch.eye(16)  # 16 mutually orthogonal visual tokens on a 4 x 4 grid: cos = 1 with itself, 0 with the others


def test_tokens_identical_to_the_text_take_the_mass_and_one_token_is_recovered_evenly():
    """Text tokens equal to visual tokens 1, 6, 11 and 12: each is cost ~0 to its copy and >= 0.5 (feature term) to
    every other, so those four carry by far the most row mass. k = 5: r = round(0.2 * 5) = 1 recovered, the top
    k - r = 4 are {1, 6, 11, 12}; the other 12 tokens in order are [0, 2, 3, 4, 5, 7, 8, 9, 10, 13, 14, 15] and one
    evenly spaced pick is the centre of one bin of 12, position 6: token 8."""
    method = tz.get("topv", tokens=5)
    text = EYE[[1, 6, 11, 12]]
    importance = method.importance(EYE, text, tz.ops.as_layout((4, 4), 16))
    top4 = set(torch.sort(importance, descending=True).indices[:4].tolist())
    assert top4 == {1, 6, 11, 12}
    assert float(importance[[1, 6, 11, 12]].min()) > 5 * float(importance[[0, 2, 3, 4, 5, 7]].max())
    out = method.compress(EYE.unsqueeze(0), grid=(4, 4), text=text.unsqueeze(0))
    assert out.index[0].tolist() == [1, 6, 8, 11, 12]
    assert torch.equal(out.tokens[0], EYE[[1, 6, 8, 11, 12]])
    # recovery off (k = 4): exactly the four copies
    plain = tz.get("topv", tokens=4, recovery=0.0).compress(EYE.unsqueeze(0), grid=(4, 4), text=text.unsqueeze(0))
    assert plain.index[0].tolist() == [1, 6, 11, 12]


def test_padding_text_is_ignored_and_an_item_without_text_keeps_the_centre():
    """``text_mask`` drops the padded text rows: a padded copy of token 0 does not pull token 0 in. Without any
    real text the one target is the mean of the item's tokens, equally similar to every (orthogonal) token, so its
    anchor is the grid's centre and the spatial terms decide: the four centre cells 5, 6, 9, 10 of the 4 x 4 grid,
    plus one recovered token (the centre of the 12 others, token 8)."""
    method = tz.get("topv", tokens=5)
    text = torch.stack([EYE[1], EYE[6], EYE[11], EYE[12], EYE[0]]).unsqueeze(0)
    mask = torch.tensor([[True, True, True, True, False]])
    out = method.compress(EYE.unsqueeze(0), grid=(4, 4), text=text, text_mask=mask)
    assert out.index[0].tolist() == [1, 6, 8, 11, 12]
    none = method.compress(EYE.unsqueeze(0), grid=(4, 4), text=text, text_mask=torch.zeros_like(mask))
    assert none.index[0].tolist() == [5, 6, 8, 9, 10]
    assert method.compress(EYE.unsqueeze(0), grid=(4, 4), text=text[:, :0]).index[0].tolist() == [5, 6, 8, 9, 10]


def test_sinkhorn_target_marginal_is_exact_and_the_source_marginal_is_relaxed():
    cost = torch.tensor([[0.0, 0.1, 0.9], [0.5, 0.5, 0.5], [1.0, 0.8, 0.0], [0.9, 0.9, 0.9]])
    plan = unbalanced_sinkhorn(cost, epsilon=0.1, rho=0.1, iterations=20)
    assert torch.allclose(plan.sum(0), torch.full((3,), 1 / 3, dtype=plan.dtype))  # every target gets 1 / T
    assert math.isclose(float(plan.sum()), 1.0, rel_tol=1e-9)
    rows = plan.sum(1)
    assert float(rows[0]) > 0.25 and float(rows[2]) > 0.25 and float(rows[3]) < float(rows[1]) < 0.25  # cheap rows gain
    # a huge rho is the balanced problem: every source sends exactly 1 / N
    balanced = unbalanced_sinkhorn(cost, epsilon=0.1, rho=1e9, iterations=300).sum(1)
    assert torch.allclose(balanced, torch.full((4,), 0.25, dtype=balanced.dtype), atol=1e-6)


def test_cost_terms_and_coordinates():
    """Coordinates are cell centres in the unit square, per frame; the three cost terms are each in [0, 1]."""
    coords = token_coordinates(tz.ops.as_layout((2, 2), 4))
    assert coords.tolist() == [[0.25, 0.25], [0.25, 0.75], [0.75, 0.25], [0.75, 0.75]]
    video = token_coordinates(tz.layout.frames(2, 1, 2))  # every frame spans the same square
    assert video.tolist() == [[0.5, 0.25], [0.5, 0.75], [0.5, 0.25], [0.5, 0.75]]
    row = token_coordinates(tz.ops.as_layout(None, 3))  # no grid: one 1 x N row
    assert torch.allclose(row, torch.tensor([[0.5, 1 / 6], [0.5, 0.5], [0.5, 5 / 6]]))
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    # feature only: (1 - cos) / 2 is 0 for the same direction, 1 for the opposite one
    assert topv_cost(x, x[:1], coords[:2], coords[:1], (1.0, 0.0, 0.0)).tolist() == [[0.0], [1.0]]
    # relative distance only: 0 to itself, |(0, 0.5)| / sqrt 2 to the neighbour cell
    rel = topv_cost(x, x[:1], coords[:2], coords[:1], (0.0, 1.0, 0.0))
    assert torch.allclose(rel, torch.tensor([[0.0], [0.5 / math.sqrt(2)]]))
    # centre only: a 2 x 2 cell centre is |(0.25, 0.25)| / sqrt(1/2) = 0.5 from the image centre
    assert torch.allclose(topv_cost(x, x[:1], coords[:2], coords[:1], (0.0, 0.0, 1.0)), torch.full((2, 1), 0.5))
    # a text target sits at its anchor: the similarity-weighted mean of the coordinates, here ~ token 0's cell
    anchored = topv_cost(x, x[:1], coords[:2], None, (0.0, 1.0, 0.0))
    assert float(anchored[0, 0]) < 1e-6


def test_recovery_count_and_evenly_spaced_picks():
    assert [recovery_count(k, 0.2) for k in (1, 2, 3, 5, 7, 8, 10)] == [0, 0, 1, 1, 1, 2, 2]  # round half up
    assert recovery_count(4, 1.0) == 4 and recovery_count(4, 0.0) == 0
    # 20 tokens, importance descending with the index: the top 8 are 0..7; the 12 others 8..19 give 2 evenly spaced
    # picks, the centres of two bins of 6: positions 3 and 9 -> tokens 11 and 17
    importance = torch.arange(20, 0, -1, dtype=torch.float64)
    kept = topv_select(importance, 10, recovery_count(10, 0.2))
    assert sorted(kept.tolist()) == [0, 1, 2, 3, 4, 5, 6, 7, 11, 17]
    # everything recovered: evenly spaced over the whole item
    assert sorted(topv_select(importance, 4, 4).tolist()) == [2, 7, 12, 17]
    # ties go to the earlier token
    assert sorted(topv_select(torch.ones(6, dtype=torch.float64), 3, 0).tolist()) == [0, 1, 2]


def test_uses_hidden_states_only_and_prunes_once_at_layer_two():
    """No attention signal is asked for (SDPA / FlashAttention keep running): only the text hidden states."""
    method = tz.get("topv", retain=0.25)
    assert method.signals_needed() == frozenset({"text", "text_mask"})
    assert method.info.stage == "llm" and method.info.query_aware
    assert method.schedule(576, 32) == [(2, 144)]
    assert method.schedule(576, 2) == [(1, 144)]  # default clamped to L - 1
    assert tz.get("topv", retain=0.5, layer=5).schedule(10, 8) == [(5, 5)]
    with pytest.raises(ValueError, match=r"layer must be in \[1, 7\]"):
        tz.get("topv", retain=0.5, layer=9).schedule(10, 8)


@pytest.mark.parametrize("kwargs,error,words", [
    ({"layer": 0}, ValueError, "layer must be an int >= 1"),
    ({"layer": 1.5}, ValueError, "layer must be an int >= 1"),
    ({"iterations": 0}, ValueError, "iterations must be an int >= 1"),
    ({"iterations": True}, ValueError, "iterations must be an int >= 1"),
    ({"epsilon": 0.0}, ValueError, "epsilon must be > 0"),
    ({"epsilon": "0.1"}, TypeError, "epsilon must be a finite number"),
    ({"rho": -1.0}, ValueError, "rho must be > 0"),
    ({"rho": float("inf")}, TypeError, "rho must be a finite number"),
    ({"spatial_weight": -0.5}, ValueError, "spatial_weight must be >= 0"),
    ({"recovery": 1.5}, ValueError, r"recovery must be >= 0.0 and <= 1.0"),
])
def test_bad_arguments_name_the_argument_and_its_range(kwargs, error, words):
    with pytest.raises(error, match=words):
        tz.get("topv", retain=0.5, **kwargs)


def test_bad_text_signal_is_refused():
    method = tz.get("topv", tokens=2)
    with pytest.raises(ValueError, match="text must be"):
        method.compress(EYE.unsqueeze(0), text=torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="text_mask must be"):
        method.compress(EYE.unsqueeze(0), text=EYE[:2].unsqueeze(0), text_mask=torch.ones(1, 3, dtype=torch.bool))
