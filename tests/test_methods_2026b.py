"""One check of each remaining issue-22 method's own algorithm (HoloV, STTM, TopV), on small cases worked out by hand.
The generic tensor-level checks (exact budget, determinism, batch independence) come from tests/test_methods.py."""

import pytest
import torch

import tokenzip as tz

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
