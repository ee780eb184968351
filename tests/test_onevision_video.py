"""LLaVA-OneVision video items (tokenzip/adapters/onevision_video.py): counts and layout against the model, signals
against a brute-force eager computation, the rebuilt call against a hand-built one, images and clips in one prompt,
generate(), bad input, the invariant suite on the "llava_onevision_video" case with test-only video methods (the
registered ones run it through tests/conftest.py), and clips as items of stage "llm" (an LLM-stage method prunes only
the modalities it names; after a pre-LLM method in tz.compose; on precomputed features)."""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import test_invariants as inv
import torch
from test_llm_stage import assert_equals_mask_oracle
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling

import tokenzip as tz
from tokenzip import ops
from tokenzip.adapters import adapter_for
from tokenzip.base import Compressor, MethodInfo
from tokenzip.methods import FastV, ToMe
from tokenzip.testing import (
    CASES,
    IMAGE_TOKEN,
    ONEVISION_FRAMES,
    ONEVISION_VIDEO_TOKEN,
    Sample,
    default_samples,
    left_pad,
    llava_onevision_inputs,
    llava_onevision_video_inputs,
)
from tokenzip.video import onevision_video_pixels, onevision_video_processor, onevision_video_tokens, synthetic_clip

from conftest import built, compatible

CASE = "llava_onevision_video"
ALL = frozenset({"cls_attention", "keys", "projected", "text", "text_mask"})


@dataclass
class VideoTopAttention(Compressor):
    """Test-only: keep the k tokens with the highest cls_attention (asks for every signal the adapter makes)."""

    info: ClassVar[MethodInfo] = MethodInfo(name="test-video-top-attention", family="attention",
                                            modalities=("video",), stage="pre_llm", query_aware=False,
                                            reference="test")
    requires: ClassVar[tuple[str, ...]] = ("cls_attention", "keys", "projected", "text", "text_mask")

    def _compress(self, tokens, k, layout, signals):
        assert layout.num_frames == ONEVISION_FRAMES and layout.segments[-1].kind == "newline"
        assert torch.equal(signals["projected"], tokens)
        return ops.select(tokens, ops.stable_topk(signals["cls_attention"], k))


@dataclass
class VideoToMe(ToMe):
    """Test-only: ToMe (merging, with keys) declared for video."""

    info: ClassVar[MethodInfo] = dataclasses.replace(ToMe.info, name="test-video-tome", modalities=("video",))


@dataclass
class KeepFirst(Compressor):
    """Test-only: keep each item's first k tokens (a known kept set for the hand-built oracle)."""

    info: ClassVar[MethodInfo] = MethodInfo(name="test-keep-first", family="input", modalities=("image", "video"),
                                            stage="pre_llm", query_aware=False, reference="test")

    def _compress(self, tokens, k, layout, signals):
        return ops.select(tokens, torch.arange(k).expand(tokens.shape[0], -1))


LOCAL = [VideoTopAttention, VideoToMe]


def _positions(mask):
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, position_ids=_positions(inputs["attention_mask"])).logits


# ---- the case is paired with video methods only ------------------------------------------------------------------
def test_video_case_takes_video_methods_only():
    video, image = CASES[CASE], CASES["llava_onevision"]
    assert video.modalities == ("video",) and image.modalities == ("image",)
    assert video.stages == ("pre_llm", "llm")
    for m in LOCAL:
        assert compatible(m, video) and not compatible(m, image)
    for m in tz.METHODS:  # every registered method is paired with the video case exactly when it names "video"
        stage = m.info.stage  # (stage "input": the frame selections, tokenzip.base.FrameSelector)
        takes = stage in ("pre_llm", "llm") or (stage == "input" and m.reduces == "frames")
        assert compatible(m, video) == ("video" in m.info.modalities and takes
                                        and set(m(retain=1.0).requires) <= video.produces(stage))
    llm = {m.info.name for m in tz.METHODS if m.info.stage == "llm" and compatible(m, video)}
    assert llm == {"dart", "dycoke_kv", "fastv", "fastv_av", "fitprune", "framefusion", "mustdrop", "pyramiddrop",
                   "sparsevlm", "st3", "tokencarve", "topv", "vscan", "vtw", "zipvl"}


# ---- the invariant suite, on the test-only video methods ---------------------------------------------------------
@pytest.mark.parametrize("method", LOCAL, ids=lambda m: m.info.name)
@pytest.mark.parametrize("check", ["test_retain_one_is_lossless", "test_cached_generation_equals_uncached",
                                   "test_padded_batch_equals_singles", "test_sdpa_and_eager_choose_the_same_tokens",
                                   "test_model_restored_after_exit_and_exception", "test_selection_is_deterministic"])
def test_invariants_on_video(check, method):
    getattr(inv, check)(method, CASE)


@pytest.mark.parametrize("method", LOCAL, ids=lambda m: m.info.name)
@pytest.mark.parametrize("budget", [{"retain": 0.3}, {"tokens": 3}])
def test_exact_budget_on_video(method, budget):
    inv.test_llm_sees_exact_budget(method, CASE, budget)


# ---- counts and layout -------------------------------------------------------------------------------------------
def test_items_counts_and_layout_are_the_models():
    model = built(CASE)
    inputs = llava_onevision_video_inputs(model, default_samples())
    items = adapter_for(model).encode(inputs, ALL)
    assert [it.sample for it in items] == [0, 1, 1, 2] and {it.modality for it in items} == {"video"}
    with torch.no_grad():
        ref = model.model.get_video_features(inputs["pixel_values_videos"], return_dict=True).pooler_output
    n = ONEVISION_FRAMES * 4 * 4 + 1  # 98 px / 14 px patches: 7x7, pooled to 4x4 per frame, + one newline
    assert ref.shape[1] == n == onevision_video_tokens(model.config, ONEVISION_FRAMES)
    for it, f in zip(items, ref):
        torch.testing.assert_close(it.tokens, f, atol=0, rtol=0)
        assert [(s.kind, s.t, s.h, s.w) for s in it.grid.segments] == [("frames", ONEVISION_FRAMES, 4, 4),
                                                                       ("newline", 1, 1, 1)]
        assert it.grid.n == n and it.extra["newline"].tolist() == [False] * (n - 1) + [True]
        assert torch.equal(it.tokens[-1], model.model.image_newline)


def test_placeholder_count_at_384_px():
    """A real-size SigLIP grid (384 px, 14 px patches: 27x27) gives 196 tokens per frame + 1, as the processor
    counts (``T * 14 * 14 + 1``)."""
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=384, patch_size=14, vision_use_head=False)
    text = Qwen2Config(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                               video_token_index=ONEVISION_VIDEO_TOKEN)
    model = LlavaOnevisionForConditionalGeneration._from_config(cfg).eval()
    with torch.no_grad():
        out = model.model.get_video_features(torch.randn(1, 2, 3, 384, 384), vision_feature_layer=-1,
                                             vision_feature_select_strategy="full", return_dict=True)
    assert out.pooler_output.shape[1] == 2 * 196 + 1 == onevision_video_tokens(model.config, 2)


# ---- signals -------------------------------------------------------------------------------------------------------
def test_signals_match_brute_force_eager():
    """cls_attention / keys: eager attention weights at the feature layer per frame (mean over heads and queries),
    interpolated from the 7x7 patch grid to 4x4 with explicit bilinear weights (half-pixel centres, clamped at the
    border, as the model's ``apply_pooling``), frames in order, 0 for the newline."""
    model, eager = built(CASE), built(CASE, "eager")
    inputs = llava_onevision_video_inputs(model, default_samples())
    items = adapter_for(model).encode(inputs, ALL)
    px = inputs["pixel_values_videos"].flatten(0, 1)
    tower = eager.model.vision_tower
    got = {}
    h = tower.encoder.layers[-1].self_attn.k_proj.register_forward_hook(lambda m, a, o: got.setdefault("k", o))
    try:
        with torch.no_grad():
            out = tower(px, output_attentions=True, return_dict=True)
    finally:
        h.remove()
    att = out.attentions[-1]  # [V*T, heads, 16, 16]: vision_feature_layer -1
    received = att.mean(dim=(1, 2))
    keys = got["k"].view(*got["k"].shape[:2], att.shape[1], -1).mean(dim=2)

    weights = torch.zeros(4, 7, dtype=torch.float64)  # output row i <- input rows, 7 -> 4
    for i in range(4):
        src = max((i + 0.5) * 7 / 4 - 0.5, 0.0)
        lo = int(src)
        hi = min(lo + 1, 6)
        weights[i, lo] += 1 - (src - lo)
        weights[i, hi] += src - lo

    def pool(x):  # [V*T, 49, C] on a 7x7 grid -> [V, T*16, C]
        g = torch.einsum("ia,jb,fabc->fijc", weights, weights, x.double().view(x.shape[0], 7, 7, -1))
        return g.reshape(len(items), -1, x.shape[-1]).float()

    ref_att, ref_keys = pool(received[..., None])[..., 0], pool(keys)
    for i, it in enumerate(items):
        torch.testing.assert_close(it.signals["cls_attention"][:-1], ref_att[i], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(it.signals["keys"][:-1], ref_keys[i], atol=1e-5, rtol=1e-5)
        assert it.signals["cls_attention"][-1] == 0 and torch.all(it.signals["keys"][-1] == 0)
        assert it.signals["text"].shape[0] == int(it.signals["text_mask"].sum())


# ---- the rebuilt call ----------------------------------------------------------------------------------------------
def test_rebuilt_call_equals_hand_built_features():
    """Keeping each clip's first k tokens gives the logits of the stock model fed by hand: the first k placeholders
    of each clip and its first k features."""
    model = built(CASE)
    samples = default_samples()
    inputs = llava_onevision_video_inputs(model, samples)
    c = KeepFirst(tokens=5)
    with c(model):
        got = _logits(model, inputs)
    with torch.no_grad():
        feats = model.model.get_video_features(inputs["pixel_values_videos"], return_dict=True).pooler_output
    rows = [s.before + [ONEVISION_VIDEO_TOKEN] * (5 * s.n_items) + s.after for s in samples]
    ids, mask = left_pad(rows)
    pre = BaseModelOutputWithPooling(pooler_output=feats[:, :5])
    ref = _logits(model, {"input_ids": ids, "attention_mask": mask, "mm_encoder_outputs": {"video": pre}})
    assert got.shape == ref.shape
    for b in range(len(samples)):
        real = mask[b].bool()
        torch.testing.assert_close(got[b][real], ref[b][real], atol=1e-5, rtol=1e-5)


def _mixed_inputs(model):
    """Images (the image case's builder) and clips in one prompt per sample: image placeholders, then text, then
    video placeholders (sample 1 has two images and two clips)."""
    samples = default_samples()
    imgs = llava_onevision_inputs(model, samples)
    vids = llava_onevision_video_inputs(model, samples)
    rows = []
    for b, s in enumerate(samples):
        im = imgs["input_ids"][b][imgs["attention_mask"][b].bool()].tolist()
        vi = vids["input_ids"][b][vids["attention_mask"][b].bool()].tolist()
        image_part = [t for t in im if t == IMAGE_TOKEN]
        video_part = [t for t in vi if t == ONEVISION_VIDEO_TOKEN]
        rows.append(s.before + image_part + [30, 31] + video_part + s.after)
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": imgs["pixel_values"],
            "image_sizes": imgs["image_sizes"], "batch_num_images": imgs["batch_num_images"],
            "pixel_values_videos": vids["pixel_values_videos"]}


@pytest.mark.parametrize("method", [VideoTopAttention, tz.RandomPrune, KeepFirst],
                         ids=["video-only", "image-only", "both"])
def test_images_and_clips_in_one_prompt(method):
    model = built("llava_onevision")  # the image case's model (56-px crops) takes its clips too
    inputs = _mixed_inputs(model)
    ref = _logits(model, inputs)
    with method(retain=1.0)(model):
        torch.testing.assert_close(_logits(model, inputs), ref, atol=1e-5, rtol=1e-5)
    c = method(retain=0.3)
    with c(model):
        _logits(model, inputs)
    items = adapter_for(model).encode(inputs, frozenset())
    # sequence order within each sample: images (placeholders first), then clips
    assert [(it.sample, it.modality) for it in items] == [(0, "image"), (0, "video"), (1, "image"), (1, "image"),
                                                          (1, "video"), (1, "video"), (2, "image"), (2, "video")]
    stats = [it for s in c.last_stats for ms in s.values() for it in ms.items]
    assert len(stats) == len(items)
    for st, it in zip(stats, items):
        assert st.modality == it.modality and st.tokens_in == it.tokens.shape[0]
        compressed = it.modality in method.info.modalities
        assert st.tokens_out == (c.budget.count(st.tokens_in) if compressed else st.tokens_in)


def test_generate_with_clips_returns_the_callers_prompt():
    model = built(CASE)
    inputs = llava_onevision_video_inputs(model, default_samples())
    with VideoTopAttention(retain=0.3)(model):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


# ---- stage "llm": each clip is an item of the LLM sequence ---------------------------------------------------------
@dataclass
class ImageOnlyFastV(FastV):
    """Test-only: FastV declared for images only (the LLM stage must leave the clips whole)."""

    info: ClassVar[MethodInfo] = dataclasses.replace(FastV.info, name="test-image-fastv", modalities=("image",))


def _llm_stats(c):
    return [it for s in c.last_stats for ms in s.values() for it in ms.items]


def test_llm_items_are_the_clip_runs_with_their_layout():
    model = built(CASE)
    inputs = llava_onevision_video_inputs(model, default_samples())
    items = adapter_for(model).llm_items(inputs)
    assert [(it.sample, it.modality) for it in items] == [(0, "video"), (1, "video"), (1, "video"), (2, "video")]
    n = ONEVISION_FRAMES * 4 * 4 + 1
    for b in range(3):
        runs = [it.positions for it in items if it.sample == b]
        assert all(r.numel() == n for r in runs)
        assert torch.equal(torch.cat(runs), (inputs["input_ids"][b] == ONEVISION_VIDEO_TOKEN).nonzero().flatten())
    for it in items:
        assert [(s.kind, s.t, s.h, s.w) for s in it.grid.segments] == [("frames", ONEVISION_FRAMES, 4, 4),
                                                                       ("newline", 1, 1, 1)]
    mixed_model = built("llava_onevision")
    mixed = _mixed_inputs(mixed_model)
    got = [(it.sample, it.modality, it.positions.numel()) for it in adapter_for(mixed_model).llm_items(mixed)]
    want = [(it.sample, it.modality, it.tokens.shape[0]) for it in adapter_for(mixed_model).encode(mixed, frozenset())]
    assert got == want  # sequence order, images and clips mixed, the same runs as before the LLM


@pytest.mark.parametrize("method", [ImageOnlyFastV, FastV], ids=["image-only", "image-and-video"])
def test_llm_stage_compresses_only_the_methods_modalities(method):
    """Images and clips in one prompt: an LLM-stage method prunes the items of the modalities it names, each to its
    budget, and nothing else: logits and greedy tokens equal the stock model with exactly those tokens masked."""
    model = built("llava_onevision")
    inputs = _mixed_inputs(model)
    c = method(retain=0.3, layer=1)
    with c(model):
        out = _logits(model, inputs)
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    items = adapter_for(model).encode(inputs, frozenset())  # the runs the LLM sees, with their sizes
    for b, per_sample in enumerate(c.last_stats):
        for modality in ("image", "video"):
            want = [it.tokens.shape[0] for it in items if it.sample == b and it.modality == modality]
            got = per_sample[modality].items if modality in per_sample else []
            if modality in method.info.modalities:
                assert [it.tokens_in for it in got] == want
                assert [it.tokens_out for it in got] == [c.budget.count(n) for n in want]
            else:
                assert got == []
    assert {it.modality for it in _llm_stats(c)} == set(method.info.modalities)
    assert_equals_mask_oracle(model, c, inputs, out, gen, lambda: _logits(model, inputs))


def test_compose_video_pre_llm_then_fastv():
    """A registered video method before the LLM, then FastV on the clips it shortened: each clip's run is sized from
    the kept counts the rebuild records (``ClipFeatures.clip_tokens``)."""
    model = built(CASE)
    inputs = llava_onevision_video_inputs(model, default_samples())
    pre, llm = tz.get("dycoke", retain=0.5), tz.get("fastv", retain=0.5, layer=1)
    c = tz.compose(pre, llm)
    n = ONEVISION_FRAMES * 4 * 4 + 1
    with c(model):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        logits = _logits(model, inputs)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert logits.shape[1] < inputs["input_ids"].shape[1]  # the pre-LLM part shortened the prompt
    kept = pre.budget.count(n)
    clips = _llm_stats(c)
    assert len(clips) == 4 and {it.modality for it in clips} == {"video"}
    for it in clips:
        assert (it.tokens_in, it.tokens_out) == (n, llm.budget.count(kept)) == (n, c.effective(n, 3))
        assert [k for _, k in it.stages] == [it.tokens_out]  # FastV's one stage ran on the clip
        assert len(it.index) == it.tokens_out and it.index.tolist() == sorted(it.index.tolist())
    for part in llm.last_stats:  # what the LLM stage saw: the shortened runs
        assert [it.tokens_in for it in part["video"].items] == [kept] * len(part["video"].items)


def test_llm_stage_on_the_models_own_precomputed_clip_features():
    """Features the caller precomputed in the model's ``[clips, N, D]`` form: one item per row, checked against the
    masking oracle."""
    model = built(CASE)
    samples = default_samples()
    inputs = llava_onevision_video_inputs(model, samples)
    with torch.no_grad():
        feats = model.model.get_video_features(inputs["pixel_values_videos"], return_dict=True).pooler_output
    rows = [s.before + [ONEVISION_VIDEO_TOKEN] * (9 * s.n_items) + s.after for s in samples]
    ids, mask = left_pad(rows)
    pre = {"input_ids": ids, "attention_mask": mask,
           "mm_encoder_outputs": {"video": BaseModelOutputWithPooling(pooler_output=feats[:, :9])}}
    c = FastV(retain=0.4, layer=1)
    with c(model):
        out = _logits(model, pre)
        gen = model.generate(**pre, max_new_tokens=4, do_sample=False)
    clips = _llm_stats(c)
    assert [(it.tokens_in, it.tokens_out) for it in clips] == [(9, c.budget.count(9))] * 4
    assert_equals_mask_oracle(model, c, pre, out, gen, lambda: _logits(model, pre))


# ---- bad input -----------------------------------------------------------------------------------------------------
def test_bad_video_input_is_a_clear_error():
    model = built(CASE)
    inputs = llava_onevision_video_inputs(model, default_samples())
    c = VideoTopAttention(retain=0.5)
    with c(model):
        with pytest.raises(ValueError, match=r"pixel_values_videos must be a \[clips, frames, 3, 98, 98\]"):
            _logits(model, {**inputs, "pixel_values_videos": inputs["pixel_values_videos"][:, :, :, :28]})
        short = {**inputs, "input_ids": inputs["input_ids"].clone()}
        short["input_ids"][0, -7] = 5  # one video placeholder of sample 0 too few
        with pytest.raises(ValueError, match="the videos do not match the prompt"):
            _logits(model, short)
        with pytest.raises(ValueError, match="not both"):
            _logits(model, {**inputs, "mm_encoder_outputs": {"video": BaseModelOutputWithPooling()}})


def test_clips_of_different_lengths_are_refused_with_the_reason():
    clips = [synthetic_clip(4, 32, 32).frames, synthetic_clip(5, 32, 32).frames]
    with pytest.raises(ValueError, match="same number of frames"):
        onevision_video_pixels(clips, onevision_video_processor(56))


def test_model_restored_after_video_call():
    model = built(CASE)
    inputs = llava_onevision_video_inputs(model, [Sample([1, 5], 1, [6], seed=4)])
    ref = _logits(model, inputs)
    with VideoToMe(retain=0.3)(model):
        _logits(model, inputs)
    torch.testing.assert_close(_logits(model, inputs), ref, atol=0, rtol=0)


# ---- contact sheet -------------------------------------------------------------------------------------------------
def test_frame_overlays_dim_dropped_and_colour_groups_across_frames():
    from tokenzip.contact_sheet import contact_sheet, frame_overlays
    from tokenzip.output import ItemStats

    model = built("llava_onevision")  # 56-px frames: 2x2 tokens each
    layout = adapter_for(model).video_layout(3)  # 3 frames of 2x2 + newline: 13 tokens
    frames = synthetic_clip(3, 32, 32, seed=5).frames
    # frame 0: token 0 kept alone, 1 dropped, 2 and 3 merged with frame 1's tokens 6, 7 (slot 1); frame 2 dropped
    source = torch.tensor([0, -1, 1, 1, 2, 3, 1, -1, -1, -1, -1, -1, 4])
    stats = ItemStats("video", 13, 5, source, torch.tensor([0, 2, 4, 5, 12]), layout)
    tinted, colour = frame_overlays(frames, stats, dim=0.5, tint=0.5)
    x = frames.astype(np.float32) / 255
    np.testing.assert_allclose(tinted[0, :16, :16], x[0, :16, :16])  # kept as itself: unchanged
    np.testing.assert_allclose(tinted[0, :16, 16:], 0.5 * x[0, :16, 16:])  # dropped: dimmed
    np.testing.assert_allclose(tinted[2], 0.5 * x[2], rtol=1e-6)
    assert set(colour) == {1}  # the one merged group, one colour on both frames it covers
    import matplotlib

    c = np.asarray(matplotlib.colormaps["tab10"].colors[colour[1]], dtype=np.float32)
    np.testing.assert_allclose(tinted[0, 16:, :], 0.5 * x[0, 16:, :] + 0.5 * c, rtol=1e-6)
    np.testing.assert_allclose(tinted[1, 16:, :16], 0.5 * x[1, 16:, :16] + 0.5 * c, rtol=1e-6)  # token 6
    np.testing.assert_allclose(tinted[1, 16:, 16:], 0.5 * x[1, 16:, 16:], rtol=1e-6)  # token 7 dropped
    pic = contact_sheet(frames, stats, timestamps=[0.0, 0.5, 1.0], ncols=3)
    assert pic.size[0] > pic.size[1] > 0
    with pytest.raises(ValueError, match="2 frames, frames holds 3|has 3 frames, frames holds 2"):
        frame_overlays(frames[:2], stats)


def test_video_contact_sheet_runs_a_method_on_a_real_clip():
    import test_video_io as io

    from tokenzip.contact_sheet import video_contact_sheet

    path = io._clip("carphone_pristine")
    model = built(CASE)
    method = VideoToMe(retain=0.3)
    pic, stats = video_contact_sheet(method, model, io._tokenizer(), path, num_frames=4,
                                     video_processor=onevision_video_processor(98))
    assert stats.modality == "video" and stats.tokens_in == 4 * 16 + 1
    assert stats.tokens_out == method.budget.count(65)
    assert pic.size[0] > 0
    with pytest.raises(TypeError, match="not video"):
        video_contact_sheet(tz.get("avgpool", retain=0.3), model, io._tokenizer(), path, num_frames=4)
