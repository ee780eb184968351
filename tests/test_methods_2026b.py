"""One check of each remaining issue-22 method's own algorithm (HoloV, STTM, TopV), on small cases worked out by hand.
The generic tensor-level checks (exact budget, determinism, batch independence) come from tests/test_methods.py."""

import pytest
import torch

import tokenzip as tz
from tokenzip import layout as tzlayout

torch.set_num_threads(1)


# ---- HoloV ----------------------------------------------------------------------------------------------------------

def test_holov_spreads_the_budget_over_crops_by_their_holistic_score():
    """A 4 x 4 grid in 4 crops (2 x 2 quadrants): TL = {0, 1, 4, 5}, TR = {2, 3, 6, 7}, BL = {8, 9, 12, 13},
    BR = {10, 11, 14, 15}. TL, BL, BR hold identical tokens (similarity variance 0: score = attention); TR's tokens
    differ (variance > 0: with alpha = 1 its mean score is twice its mean attention). Mean attention: TL 0.3, TR 0.3,
    BL 0.05, BR 0.05 -> weights 0.3, 0.6, 0.05, 0.05. k = 8, one token per crop at least: BL and BR get 1, TL and TR
    share 6 as 0.3 : 0.6 -> 2 and 4 (all of TR). TL keeps its top 2 by attention (t0 0.6, t4 0.3), BL t9 (0.08),
    BR all 0.05 -> the earliest, t10. With alpha = 0 the weights are 0.3, 0.3 -> 3 and 3: TL t0, t4, t1 and TR
    t2 (0.5), t6 (0.4), t7 (0.2; t3 has 0.1)."""
    tl, bl, br = [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]
    tr = {2: [1.0, 0.0], 3: [0.0, 1.0], 6: [1.0, 1.0], 7: [1.0, -1.0]}
    rows = []
    for i in range(16):
        r, c = divmod(i, 4)
        rows.append(tr[i] if (r < 2 and c >= 2) else tl if (r < 2) else bl if c < 2 else br)
    tokens = torch.tensor([rows])
    attn = torch.zeros(16)
    attn[[0, 1, 4, 5]] = torch.tensor([0.6, 0.2, 0.3, 0.1])
    attn[[2, 3, 6, 7]] = torch.tensor([0.5, 0.1, 0.4, 0.2])
    attn[[8, 9, 12, 13]] = torch.tensor([0.02, 0.08, 0.05, 0.05])
    attn[[10, 11, 14, 15]] = 0.05
    attn = attn[None]
    out = tz.HoloV(tokens=8, alpha=1.0, crops=4).compress(tokens, grid=(4, 4), cls_attention=attn)
    assert out.index[0].tolist() == [0, 2, 3, 4, 6, 7, 9, 10]
    assert torch.equal(out.tokens[0], tokens[0, [0, 2, 3, 4, 6, 7, 9, 10]])
    flat = tz.HoloV(tokens=8, alpha=0.0, crops=4).compress(tokens, grid=(4, 4), cls_attention=attn)
    assert flat.index[0].tolist() == [0, 1, 2, 4, 6, 7, 9, 10]


def test_holov_crop_rule_and_bad_input():
    # the authors' rule: floor(16/9 * N / k) crops, at least one per grid, at most N
    assert tz.HoloV(tokens=64).crop_count(576, 64, 1) == 16
    assert tz.HoloV(tokens=192).crop_count(576, 192, 1) == 5
    assert tz.HoloV(tokens=575).crop_count(576, 575, 3) == 3
    assert tz.HoloV(tokens=1, crops=50).crop_count(10, 1, 1) == 10
    for kwargs in ({"alpha": -0.1}, {"alpha": float("nan")}, {"alpha": True}):
        with pytest.raises(ValueError, match="alpha"):
            tz.HoloV(retain=0.5, **kwargs)
    for crops in (0, 2.5, True):
        with pytest.raises(ValueError, match="crops"):
            tz.HoloV(retain=0.5, crops=crops)


# ---- STTM -----------------------------------------------------------------------------------------------------------

def _sttm_clip():
    """Two 4 x 4 frames, quadrants TL = {0, 1, 4, 5}, TR = {2, 3, 6, 7}, BL = {8, 9, 12, 13}, BR = {10, 11, 14, 15}
    (+16 in frame 1). TL is (1, 0) in frame 0 and (0, 1) in frame 1; TR is (0, 1); BL alternates (1, 0), (0, 1);
    BR is (1, 1) with one (1, 1.2)."""
    frame = torch.zeros(16, 2)
    frame[[0, 1, 4, 5]] = torch.tensor([1.0, 0.0])
    frame[[2, 3, 6, 7]] = torch.tensor([0.0, 1.0])
    frame[[8, 12]] = torch.tensor([1.0, 0.0])
    frame[[9, 13]] = torch.tensor([0.0, 1.0])
    frame[[10, 11, 14]] = torch.tensor([1.0, 1.0])
    frame[15] = torch.tensor([1.0, 1.2])
    second = frame.clone()
    second[[0, 1, 4, 5]] = torch.tensor([0.0, 1.0])
    return torch.cat([frame, second])[None]


def test_sttm_quadtree_then_temporal_merging():
    """root_level = 0: the search starts at the quadrants. TL, TR and BR are uniform enough (every child's cosine
    similarity to the quadrant mean >= 0.85) and stop as one token each; BL's children are at cosine 0.71 to its mean
    (0.5, 0.5): it splits into its 4 tokens. Each frame: 7 nodes, 14 in all. Temporal pairs (overlapping nodes of
    frames 0 and 1): TR-TR, BR-BR and the 4 BL tokens at cosine 1, TL-TL at cosine 0. k = 8: the 6 strongest pairs
    merge. k = 7: TL-TL too, its token the mean of the two nodes, (0.5, 0.5)."""
    clip = _sttm_clip()
    layout = tzlayout.frames(2, 4, 4)
    out = tz.STTM(tokens=8, root_level=0).compress(clip, grid=layout)
    assert out.index[0].tolist() == [0, 2, 8, 9, 10, 12, 13, 16]
    groups = out.groups(0)
    assert groups[1] == [2, 3, 6, 7, 18, 19, 22, 23] and groups[2] == [8, 24] and groups[7] == [16, 17, 20, 21]
    expected = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1], [1, 1.05], [1, 0], [0, 1], [0, 1]])
    torch.testing.assert_close(out.tokens[0], expected)
    seven = tz.STTM(tokens=7, root_level=0).compress(clip, grid=layout)
    assert seven.index[0].tolist() == [0, 2, 8, 9, 10, 12, 13]
    assert seven.groups(0)[0] == [0, 1, 4, 5, 16, 17, 20, 21]
    torch.testing.assert_close(seven.tokens[0, 0], torch.tensor([0.5, 0.5]))


def test_sttm_raises_the_spatial_threshold_to_fit_the_budget_and_checks_its_settings():
    """One frame: the quadtree at 0.85 leaves 7 tokens. k = 10 needs more: the threshold rises past BR's score (its
    lowest child cosine, about 0.997: below TL's and TR's 1), so BR splits into its 4 tokens: TL and TR (2) + BL's
    4 + BR's 4 = 10."""
    frame = _sttm_clip()[:, :16]
    out = tz.STTM(tokens=10, root_level=0).compress(frame, grid=tzlayout.frames(1, 4, 4))
    assert out.index[0].tolist() == [0, 2, 8, 9, 10, 11, 12, 13, 14, 15]
    for kwargs in ({"threshold": 1.5}, {"threshold": "x"}, {"root_level": -1}, {"root_level": 1.0}):
        with pytest.raises(ValueError):
            tz.STTM(retain=0.5, **kwargs)


# ---- PixelPrune -----------------------------------------------------------------------------------------------------
def _pixelprune_grid():
    """A 3 x 3 grid of units of two pixels each (``[1, 9, 1, 1, 2]``), both pixels equal to the value shown except
    unit (2, 1) = (1, 1.5)::

        5 5 7
        5 5 7
        1 1 7
    """
    values = torch.tensor([5, 5, 7, 5, 5, 7, 1, 1, 7], dtype=torch.float32)
    pixels = values.view(1, 9, 1, 1, 1).repeat(1, 1, 1, 1, 2)
    pixels[0, 7, 0, 0, 1] = 1.5
    return pixels


def test_pixelprune_predicts_from_left_above_and_the_edge_test_and_keeps_the_worst_predicted():
    """Errors (largest absolute pixel error of the prediction), worked by hand: (0, 0) is the anchor (inf); the
    first row predicts from the left: 0 and |7 - 5| = 2; the first column from above: 0 and |1 - 5| = 4; inside,
    (1, 1): left = above = above-left = 5, prediction left, 0; (1, 2): above-left 5 equals left 5 but not above 7, so
    the edge runs between the rows and the prediction is above (7): 0 (left would miss by 2); (2, 1): above-left 5
    differs from left 1, prediction left (1, 1): max(0, 0.5) = 0.5; (2, 2): prediction left (1, 1.5): max(6, 5.5) =
    6. The k largest are kept; among equal errors (the exact duplicates, 0) the earlier unit is kept."""
    from tokenzip.methods.pixelprune import prediction_error

    pixels = _pixelprune_grid()
    grid = tzlayout.grid(3, 3)
    err = prediction_error(pixels, grid)
    assert err[0].tolist() == [float("inf"), 0, 2, 0, 0, 0, 4, 0.5, 6]
    assert int((err > 0).sum()) == 5  # the units the paper keeps at tau = 0
    tokens = torch.arange(9, dtype=torch.float32).view(1, 9, 1).repeat(1, 1, 3)
    five = tz.PixelPrune(tokens=5).compress(tokens, grid=grid, unit_pixels=pixels)
    assert five.index[0].tolist() == [0, 2, 6, 7, 8]
    torch.testing.assert_close(five.tokens[0, :, 0], torch.tensor([0.0, 2, 6, 7, 8]))
    assert tz.PixelPrune(tokens=6).compress(tokens, grid=grid, unit_pixels=pixels).index[0].tolist() == \
        [0, 1, 2, 6, 7, 8]
    # tau = 4: above-left 5 and above 7 now match too (|5 - 7| <= 4), so (1, 2) is predicted from the left: error 2
    assert prediction_error(pixels, grid, tau=4.0)[0].tolist() == [float("inf"), 0, 2, 0, 0, 2, 4, 0.5, 6]
    # every grid (frame) has its own anchor
    two = prediction_error(torch.full((1, 4, 1, 1, 1), 3.0), tzlayout.frames(2, 1, 2))
    assert two[0].tolist() == [float("inf"), 0, float("inf"), 0]


def test_pixelprune_runs_before_the_first_block_and_checks_tau():
    c = tz.PixelPrune(retain=0.5, tau=0.1)
    assert c.layers == (0,) and c.info.stage == "encoder" and c.requires == ("unit_pixels",)
    assert c == tz.PixelPrune(retain=0.5, tau=0.1) and c != tz.PixelPrune(retain=0.5)
    for tau in (-0.1, float("nan"), "0", True):
        with pytest.raises(ValueError, match="tau must be a float >= 0"):
            tz.PixelPrune(retain=0.5, tau=tau)
