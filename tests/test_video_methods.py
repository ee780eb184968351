"""Tensor-level tests of the video methods (PLLaVA pooling, SlowFast, DyCoke, EVS, VidCom2) and of tz.PerFrame: the
exact budget over a grid of clip layouts (with LLaVA-OneVision's trailing newline token and Qwen2-VL-style temporal
grids), identity, determinism, batch independence, and each method's own rule on synthetic clips of known content."""

import pytest
import torch

import tokenzip as tz
from tokenzip import ops
from tokenzip.layout import Layout, Segment
from tokenzip.methods.dycoke import DyCoke
from tokenzip.methods.evs import EVS, frame_references
from tokenzip.methods.pllava_pool import PLLaVAPool
from tokenzip.methods.slowfast import SlowFast
from tokenzip.methods.vidcom2 import VidCom2

torch.set_num_threads(1)

D = 8
VIDEO = [PLLaVAPool, SlowFast, DyCoke, EVS, VidCom2]


def clip(t: int, h: int, w: int, newline: bool = False) -> Layout:
    segments = [Segment("frames", t, h, w)] + ([Segment("newline", 1, 1, 1)] if newline else [])
    return Layout(segments)


def per_frame(inner):
    """A PerFrame entry usable like a method class: ``entry(tokens=k)``."""
    def make(**budget):
        return tz.PerFrame(inner(**budget))
    make.__name__ = f"PerFrame({inner.__name__})"
    return make


CONFIGS = [pytest.param(m, id=m.info.name) for m in VIDEO] + [
    pytest.param(per_frame(m), id=f"{m.info.name}@frames") for m in (tz.ToMe, tz.AvgPool, tz.DivPrune, tz.RandomPrune)]

# (T, H, W): one frame, two, LLaVA-OneVision-like (a few frames of a square grid), many small frames, a
# Qwen2-VL-like rectangular grid of temporal patches
SHAPES = [(1, 3, 3), (2, 2, 3), (4, 5, 5), (16, 2, 2), (3, 2, 4)]


def budgets(n: int, t: int) -> list[int]:
    return sorted({k for k in (1, 2, 3, t - 1, t, t + 1, n // 4, n // 2, n - 1, n) if 1 <= k <= n})


def check_output(out, tokens, k):
    b, n, _ = tokens.shape
    assert out.tokens.shape == (b, k, tokens.shape[-1])
    assert out.source.shape == (b, n) and out.index.shape == (b, k)
    assert torch.isfinite(out.tokens).all()
    for i in range(b):
        idx, src = out.index[i], out.source[i]
        assert bool((idx[1:] > idx[:-1]).all()), "index must be strictly ascending"
        assert bool((src >= -1).all() and (src < k).all())
        assert torch.equal(src[idx], torch.arange(k)), "every representative maps to its own slot"
        for slot, members in enumerate(out.groups(i)):
            assert members and members[0] == int(idx[slot]), "each group is non-empty; index is its first member"


def frame_counts(out, layout: Layout, row: int = 0) -> list[int]:
    """Output tokens whose representative lies in each frame (markers excluded)."""
    return [int(((out.index[row] >= s) & (out.index[row] < s + h * w)).sum()) for s, h, w in ops.visual_frames(layout)]


@pytest.mark.parametrize("method", CONFIGS)
@pytest.mark.parametrize("newline", [False, True], ids=["plain", "newline"])
def test_exact_budget_over_clip_layouts(method, newline):
    for t, h, w in SHAPES:
        layout = clip(t, h, w, newline)
        n = layout.n
        tokens = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n))
        for k in budgets(n, t):
            out = method(tokens=k).compress(tokens, grid=layout)
            check_output(out, tokens, k)
            if k == n:
                assert torch.equal(out.tokens, tokens) and torch.equal(out.source[0], torch.arange(n))


@pytest.mark.parametrize("method", CONFIGS)
def test_trailing_newline_is_kept_unless_the_budget_is_one_token(method):
    layout = clip(4, 3, 3, newline=True)
    tokens = torch.randn(1, layout.n, D, generator=torch.Generator().manual_seed(5))
    last = layout.n - 1
    for k in (2, 5, 20):
        out = method(tokens=k).compress(tokens, grid=layout)
        assert int(out.index[0, -1]) == last and torch.equal(out.tokens[0, -1], tokens[0, last])
        assert out.groups(0)[-1] == [last], "the newline token stays alone"
    one = method(tokens=1).compress(tokens, grid=layout)
    assert int(one.source[0, last]) == -1 and int(one.index[0, 0]) < last


@pytest.mark.parametrize("method", CONFIGS)
def test_deterministic_and_batch_rows_independent(method):
    layout = clip(6, 3, 3, newline=True)
    tokens = torch.randn(3, layout.n, D, generator=torch.Generator().manual_seed(11))
    tokens[1, 9:18] = tokens[1, :9]  # a repeated frame: ties everywhere
    c = method(retain=0.3)
    batch = c.compress(tokens.clone(), grid=layout)
    again = c.compress(tokens.clone(), grid=layout)
    assert torch.equal(batch.tokens, again.tokens) and torch.equal(batch.source, again.source)
    for i in range(3):
        one = c.compress(tokens[i: i + 1], grid=layout)
        torch.testing.assert_close(batch.tokens[i: i + 1], one.tokens, atol=1e-6, rtol=1e-6)
        assert torch.equal(batch.source[i], one.source[0]) and torch.equal(batch.index[i], one.index[0])


@pytest.mark.parametrize("method", CONFIGS)
def test_items_of_different_frame_counts(method):
    """Each call is one item: a 3-frame and a 7-frame clip each meet their own budget."""
    for t in (3, 7):
        layout = clip(t, 3, 3, newline=True)
        tokens = torch.randn(1, layout.n, D, generator=torch.Generator().manual_seed(t))
        c = method(retain=0.25)
        check_output(c.compress(tokens, grid=layout), tokens, c.budget.count(layout.n))


# ---- synthetic clips of known content ---------------------------------------------------------------------------
def static_clip(t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """``[1, t*h*w, D]``: one plain background frame (one colour plus texture) repeated ``t`` times (nothing
    moves)."""
    g = torch.Generator().manual_seed(seed)
    frame = torch.randn(D, generator=g) + 0.2 * torch.randn(h * w, D, generator=g)
    return frame.repeat(t, 1).unsqueeze(0)


def with_object(video: torch.Tensor, frame: int, pos: int, size: int, seed: int = 1) -> torch.Tensor:
    obj = torch.randn(D, generator=torch.Generator().manual_seed(seed)) * 3
    video[0, frame * size + pos] = obj
    return video


def test_evs_keeps_the_first_frame_and_a_moving_token():
    t, h, w = 6, 3, 3
    s = h * w
    video = static_clip(t, h, w)
    for f in range(t):  # one object moving right, one cell per frame
        with_object(video, f, f, s)
    out = EVS(tokens=s + 2 * (t - 1)).compress(video, grid=clip(t, h, w))
    kept = set(out.index[0].tolist())
    assert set(range(s)) <= kept, "the paper keeps the whole first frame"
    for f in range(1, t):
        assert f * s + f in kept, f"the object's new place in frame {f}"
        assert f * s + f - 1 in kept, f"the place it left in frame {f}"


def test_evs_ranks_globally_by_change_since_the_previous_frame():
    t, h, w = 3, 2, 2
    video = static_clip(t, h, w)
    video[0, 4 + 1] += 0.5  # a small change in frame 1
    video[0, 8 + 3] = -video[0, 8 + 3]  # a large change in frame 2
    out = EVS(tokens=5).compress(video, grid=clip(t, h, w))
    assert out.index[0].tolist() == [0, 1, 2, 3, 11]
    out = EVS(tokens=7).compress(video, grid=clip(t, h, w))
    assert out.index[0].tolist() == [0, 1, 2, 3, 5, 9, 11], "then the small change; frame 2 pos 1 changed back"


def test_references_follow_the_papers():
    frames = [(i * 4, 2, 2) for i in range(9)]
    assert frame_references(frames) == [None, 0, 1, 2, 3, 4, 5, 6, 7]
    # DyCoke: groups of four (f1 anchor, f2->f1, f3->f1, f4->f3); the last, partial group follows the same rule
    assert frame_references(frames, 4) == [None, 0, 0, 2, None, 4, 4, 6, None]
    # a new grid starts anew
    assert frame_references([(0, 2, 2), (4, 2, 2), (8, 3, 3), (17, 3, 3)]) == [None, 0, None, 2]


def test_dycoke_keeps_the_least_similar_tokens_of_compared_frames():
    t, h, w = 8, 3, 3
    s = h * w
    video = static_clip(t, h, w)
    for f in range(t):
        with_object(video, f, f, s)
    layout = clip(t, h, w, newline=False)
    anchors = 2 * s  # frames 0 and 4 are kept whole
    out = DyCoke(tokens=anchors + 2 * 6).compress(video, grid=layout)
    kept = set(out.index[0].tolist())
    assert set(range(s)) | set(range(4 * s, 5 * s)) <= kept
    assert frame_counts(out, layout) == [s, 2, 2, 2, s, 2, 2, 2], "the compared frames share the rest equally"
    for f in (1, 2, 3, 5, 6, 7):
        assert f * s + f in kept, f"frame {f} keeps the moving object"


def test_dycoke_compares_the_third_frame_with_the_first():
    t, h, w = 4, 2, 2
    video = static_clip(t, h, w)
    video[0, 1 * 4 + 2] = -video[0, 2]  # frame 2 differs from frame 1 at position 2 ...
    video[0, 2 * 4 + 2] = -video[0, 2]  # ... and so does frame 3, which equals frame 2 there
    out = DyCoke(tokens=4 + 3).compress(video, grid=clip(t, h, w))
    kept = out.index[0].tolist()
    # f3 (frame index 2) is ranked against f1 (index 0), so its changed token is kept even though f2 shows it too
    assert 2 * 4 + 2 in kept and 1 * 4 + 2 in kept


@pytest.mark.parametrize("method,k", [(EVS, 16 + 9), (DyCoke, 4 * 16 + 12), (VidCom2, 25)])
def test_event_recall(method, k):
    """An event present in 2 of 16 frames keeps at least one of its tokens at a ~10 % budget."""
    t, h, w = 16, 4, 4
    s = h * w
    video = static_clip(t, h, w)
    for f in (5, 6):
        with_object(video, f, 10, s)
    out = method(tokens=k).compress(video, grid=clip(t, h, w))
    assert {5 * s + 10, 6 * s + 10} & set(out.index[0].tolist())


def test_vidcom2_gives_unique_frames_more_tokens():
    t, h, w = 8, 3, 3
    s = h * w
    video = static_clip(t, h, w) + 0.05 * torch.randn(1, t * s, D, generator=torch.Generator().manual_seed(3))
    video[0, 5 * s: 6 * s] = torch.randn(s, D, generator=torch.Generator().manual_seed(4))  # a scene cut
    layout = clip(t, h, w)
    out = VidCom2(tokens=24).compress(video, grid=layout)
    counts = frame_counts(out, layout)
    assert sum(counts) == 24 and min(counts) >= 1
    assert counts[5] == max(counts) and counts[5] > sorted(counts)[-2]


def test_pllava_pools_within_frames_and_over_time_with_a_stride():
    t, h, w = 4, 4, 4
    layout = clip(t, h, w)
    video = torch.arange(t, dtype=torch.float).repeat_interleave(h * w).view(1, -1, 1).expand(1, -1, D).clone()
    out = PLLaVAPool(tokens=16).compress(video, grid=layout)  # time kept: 2x2 per frame
    assert frame_counts(out, layout) == [4, 4, 4, 4]
    assert all(len({m // 16 for m in g}) == 1 for g in out.groups(0)), "no region mixes frames"
    assert torch.equal(out.tokens[0, :, 0], torch.arange(4.0).repeat_interleave(4))
    out = PLLaVAPool(tokens=8, temporal_stride=2).compress(video, grid=layout)
    assert all({m // 16 for m in g} in ({0, 1}, {2, 3}) for g in out.groups(0))
    assert torch.equal(out.tokens[0, :, 0], torch.tensor([0.5] * 4 + [2.5] * 4))
    one = PLLaVAPool(tokens=2).compress(video, grid=layout)  # fewer tokens than frames: time pooled too
    assert one.tokens[0, :, 0].tolist() == [0.5, 2.5]


def test_slowfast_gives_slow_frames_detail_times_the_tokens():
    t, h, w = 8, 4, 4
    layout = clip(t, h, w)
    video = torch.randn(1, layout.n, D, generator=torch.Generator().manual_seed(0))
    c = SlowFast(tokens=40, slow_frames=2, detail=4.0)
    assert c.slow(8) == [2, 6]
    out = c.compress(video, grid=layout)
    counts = frame_counts(out, layout)
    # weights 4*16 for the two slow frames and 16 for the six fast ones: shares 11.43 and 2.86
    assert counts == [3, 3, 11, 3, 3, 3, 11, 3]
    assert all(len({m // 16 for m in g}) == 1 for g in out.groups(0))
    # a slow frame cannot take more than its own tokens: the rest goes to the fast frames
    full = SlowFast(tokens=60, slow_frames=2, detail=100.0).compress(video, grid=layout)
    assert frame_counts(full, layout) == [5, 5, 16, 5, 5, 4, 16, 4]


def test_single_frame_degenerates_to_the_frame_rule():
    layout = clip(1, 4, 4)
    x = torch.randn(1, 16, D, generator=torch.Generator().manual_seed(2))
    assert torch.equal(PLLaVAPool(tokens=4).compress(x, grid=layout).tokens,
                       tz.AvgPool(tokens=4).compress(x, grid=(4, 4)).tokens)
    assert torch.equal(SlowFast(tokens=4).compress(x, grid=layout).tokens,
                       tz.AvgPool(tokens=4).compress(x, grid=(4, 4)).tokens)
    assert EVS(tokens=4).compress(x, grid=layout).index[0].tolist() == [2, 6, 10, 14]  # evenly spaced
    assert DyCoke(tokens=4).compress(x, grid=layout).index[0].tolist() == [2, 6, 10, 14]


# ---- PerFrame ---------------------------------------------------------------------------------------------------
def test_per_frame_shares_the_budget_and_never_mixes_frames():
    layout = clip(5, 3, 3, newline=True)
    x = torch.randn(1, layout.n, D, generator=torch.Generator().manual_seed(9))
    c = tz.PerFrame(tz.ToMe(tokens=13))
    assert c.info.name == "tome@frames" and c.info.stage == "pre_llm" and "video" in c.info.modalities
    out = c.compress(x, grid=layout)
    assert frame_counts(out, layout) == [3, 3, 2, 2, 2], "12 over 5 frames: the remainder to the earliest"
    assert all(len({m // 9 for m in g}) == 1 for g in out.groups(0))
    # each frame is exactly the method run on that frame alone
    for f, kk in enumerate([3, 3, 2, 2, 2]):
        alone = tz.ToMe(tokens=kk).compress(x[:, f * 9: (f + 1) * 9], grid=(3, 3))
        got = [slot for slot in range(12) if f * 9 <= int(out.index[0, slot]) < (f + 1) * 9]
        torch.testing.assert_close(out.tokens[0, got], alone.tokens[0])
    assert torch.equal(tz.PerFrame(tz.ToMe(tokens=5)).compress(x[:, :9], grid=(3, 3)).tokens,
                       tz.ToMe(tokens=5).compress(x[:, :9], grid=(3, 3)).tokens)


def test_per_frame_cuts_per_token_signals_to_the_frame():
    layout = clip(3, 2, 2)
    x = torch.randn(1, 12, D)
    attn = torch.tensor([[0.0, 9.0, 1.0, 2.0, 5.0, 0.0, 0.0, 1.0, 0.0, 0.0, 3.0, 4.0]])
    out = tz.PerFrame(tz.ClsTopK(tokens=3)).compress(x, grid=layout, cls_attention=attn)
    assert out.index[0].tolist() == [1, 4, 11], "the top token of each frame, not the top 3 overall"
    with pytest.raises(ValueError, match="cls_attention"):
        tz.PerFrame(tz.ClsTopK(tokens=3)).compress(x, grid=layout)


def test_per_frame_refuses_what_it_cannot_wrap():
    with pytest.raises(TypeError, match="method"):
        tz.PerFrame("tome")
    with pytest.raises(TypeError, match="method"):
        tz.PerFrame(tz.PerFrame(tz.ToMe(retain=0.5)))
    with pytest.raises(ValueError, match="stage"):
        tz.PerFrame(tz.FastV(retain=0.5))
    with pytest.raises(ValueError, match="images"):
        tz.PerFrame(tz.VadPrune(retain=0.5))


@pytest.mark.parametrize("cls,kwargs,word", [
    (DyCoke, {"window": 1}, "window"), (DyCoke, {"window": 2.5}, "window"),
    (SlowFast, {"slow_frames": 0}, "slow_frames"), (SlowFast, {"detail": 0.5}, "detail"),
    (SlowFast, {"detail": float("inf")}, "detail"), (PLLaVAPool, {"temporal_stride": 0}, "temporal_stride"),
    (VidCom2, {"temperature": 0.0}, "temperature"), (VidCom2, {"low_variance_channels": 1.5}, "low_variance"),
])
def test_bad_parameters(cls, kwargs, word):
    with pytest.raises(ValueError, match=word):
        cls(retain=0.5, **kwargs)


def test_split_weighted_is_exact_capped_and_floored():
    assert ops.split_weighted([4, 4, 4], [1, 1, 1], 12) == [4, 4, 4]
    assert ops.split_weighted([4, 4, 4], [1, 1, 1], 7) == [3, 2, 2]
    assert ops.split_weighted([4, 4, 4], [100, 1, 1], 8) == [4, 2, 2], "a full part passes its excess on"
    assert ops.split_weighted([4, 4, 4], [100, 0, 0], 6) == [4, 1, 1], "at least one each while k allows"
    assert ops.split_weighted([4, 4, 4], [0, 0, 1], 2) == [0, 0, 2]
    assert ops.split_weighted([3, 5], [0, 0], 4) == [2, 2], "all-zero weights: in proportion to size"
    for k in range(1, 30):
        alloc = ops.split_weighted([5, 9, 1, 14], [0.3, 2.0, 7.0, 1.0], k)
        assert sum(alloc) == min(k, 29) and all(0 <= a <= s for a, s in zip(alloc, [5, 9, 1, 14]))


def test_per_frame_runs_through_the_patch_on_anyres_images():
    """On a real (tiny) LLaVA-OneVision, an AnyRes image's base view and crop grid are the frames: retain=1 is
    lossless and every item meets its budget exactly."""
    from tokenzip.testing import CASES, default_samples

    from conftest import built

    model = built("llava_onevision")
    inputs = CASES["llava_onevision"].make_inputs(model, default_samples())
    with torch.no_grad():
        ref = model(**inputs).logits
        with tz.PerFrame(tz.ToMe(retain=1.0))(model):
            same = model(**inputs).logits
        c = tz.PerFrame(tz.ToMe(retain=0.3))
        with c(model):
            model(**inputs)
    assert (same - ref).abs().max().item() <= 1e-4
    items = [it for stats in c.last_stats for ms in stats.values() for it in ms.items]
    assert items and all(it.tokens_out == c.budget.count(it.tokens_in) for it in items)
    assert any(len(it.grid.segments) > 1 for it in items), "an AnyRes item with several frames was compressed"
