"""What is particular to LLaVA-NeXT and LLaVA-NeXT-Video (the invariants run on them by registration: the
``llava_next`` and ``llava_next_video`` cases): the AnyRes layout with a CLIP [CLS] tower, the [CLS] row kept in every
crop inside the encoder, base-view-only input reduction, and clips pooled 2 x 2 with no newline."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from transformers.image_processing_utils import select_best_resolution

import tokenzip as tz
from tokenzip import ops
from tokenzip.adapters import LlavaNextAdapter, LlavaNextVideoAdapter, adapter_for
from tokenzip.base import Compressor, FrameSelector, MethodInfo
from tokenzip.compat import clip_rows
from tokenzip.testing import (
    IMAGE_TOKEN,
    NEXT_VIDEO_FRAMES,
    NEXT_VIDEO_TOKEN,
    Sample,
    default_samples,
    left_pad,
    llava_next_inputs,
    llava_next_video_inputs,
    next_image_processor,
    next_video_tokens,
    onevision_images,
)

from conftest import built

ALL = frozenset({"cls_attention", "keys", "projected", "text", "text_mask"})
SEEN: list[tuple[torch.Tensor, object, int, torch.Tensor]] = []


@dataclass
class TopAttention(Compressor):
    """Test-only: keep the k tokens with the highest cls_attention, recording what it saw."""

    info: ClassVar[MethodInfo] = MethodInfo(name="test-next-top", family="attention", modalities=("image", "video"),
                                            stage="pre_llm", query_aware=False, reference="test")
    requires: ClassVar[tuple[str, ...]] = ("cls_attention",)

    def _compress(self, tokens, k, layout, signals):
        index = ops.stable_topk(signals["cls_attention"], k)
        SEEN.append((tokens[0].clone(), layout, k, index[0].clone()))
        return ops.select(tokens, index)


@dataclass
class EveryOther(FrameSelector):
    """Test-only frame selection: frames 0, 2, 4, ... (as many as the budget allows)."""

    info: ClassVar[MethodInfo] = MethodInfo(name="test-every-other", family="frames", modalities=("video",),
                                            stage="input", query_aware=False, reference="test")

    def _select(self, frames, k):
        return torch.arange(frames.shape[0])[::2][:k] if k <= (frames.shape[0] + 1) // 2 else torch.arange(k)


def _positions(mask):
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, position_ids=_positions(inputs["attention_mask"])).logits


def _stock_image_features(model, inputs):
    with torch.no_grad():
        return list(model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                   return_dict=True).pooler_output)


def _crops(model, inputs):
    return adapter_for(model).crops_per_image(inputs["pixel_values"], inputs["image_sizes"], None)


# ---- adapters and layout ------------------------------------------------------------------------------------------
def test_adapters_are_found_by_class():
    assert type(adapter_for(built("llava_next"))) is LlavaNextAdapter
    assert type(adapter_for(built("llava_next_video"))) is LlavaNextVideoAdapter


def test_layout_newline_markers_and_signals_follow_the_models_packing():
    model = built("llava_next")
    inputs = llava_next_inputs(model, default_samples())
    items = adapter_for(model).encode(inputs, ALL)
    stock = _stock_image_features(model, inputs)
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size  # 4
    assert [it.sample for it in items] == [0, 1, 1, 2]
    assert len({it.tokens.shape[0] for it in items}) > 1  # different sizes and crop counts across samples
    newline = model.model.image_newline
    for it, ref, (h0, w0) in zip(items, stock, inputs["image_sizes"].tolist()):
        assert torch.equal(it.tokens, ref)
        (bh, bw), (gh, gw1) = it.grid
        assert (bh, bw) == (side, side) and [s.kind for s in it.grid.segments] == ["base", "crops"]
        # the unpadded grid of the best pinpoint: its rows/cols of side-sized crops, cut to the image's aspect
        ph, pw = select_best_resolution((h0, w0), cfg.image_grid_pinpoints)
        full_h, full_w = ph // cfg.vision_config.image_size * side, pw // cfg.vision_config.image_size * side
        assert (gh == full_h and gw1 - 1 <= full_w) or (gw1 - 1 == full_w and gh <= full_h)
        marks = it.extra["newline"]
        assert it.grid.newline_mask() == marks.tolist() and int(marks.sum()) == gh
        assert torch.equal(it.tokens[marks], newline.expand(gh, -1))
        assert torch.all(it.signals["cls_attention"][marks] == 0) and torch.all(it.signals["keys"][marks] == 0)
        assert torch.all(it.signals["cls_attention"][~marks] > 0)


def test_cls_attention_is_each_crops_cls_row_at_the_feature_layer():
    """Brute force from eager attention weights: per crop, the [CLS] query's row over the patches (mean over heads)
    at vision_feature_layer (-2), arranged by the model's own packing."""
    model, eager = built("llava_next"), built("llava_next", "eager")
    inputs = llava_next_inputs(model, default_samples())
    items = adapter_for(model).encode(inputs, ALL)
    crops = _crops(model, inputs)
    px = torch.cat([pv[:c] for pv, c in zip(inputs["pixel_values"], crops)])
    with torch.no_grad():
        out = eager.model.vision_tower(px, output_attentions=True, return_dict=True)
    att = out.attentions[-2]  # the layer whose output is hidden_states[-2]
    cls_row = att[:, :, 0, 1:].mean(1)  # [crops, P]
    packed, _ = model.model.pack_image_features(list(torch.split(cls_row[..., None], crops)), inputs["image_sizes"],
                                                "default", image_newline=torch.zeros(1))
    for it, ref in zip(items, packed):
        torch.testing.assert_close(it.signals["cls_attention"], ref[:, 0], atol=1e-6, rtol=1e-5)


def test_retain_one_feeds_the_llm_the_original_features():
    model = built("llava_next")
    inputs = llava_next_inputs(model, default_samples())
    seen = []
    h = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"].clone()), with_kwargs=True)
    try:
        ref = _logits(model, inputs)
        with TopAttention(retain=1.0)(model):
            out = _logits(model, inputs)
    finally:
        h.remove()
    assert torch.equal(seen[0], seen[1]) and torch.equal(out, ref)


def test_prompt_and_images_that_disagree_raise():
    model = built("llava_next")
    inputs = llava_next_inputs(model, default_samples())
    ids = inputs["input_ids"].clone()
    ids[0, -1] = IMAGE_TOKEN  # one placeholder too many in sample 0
    with pytest.raises(ValueError):
        with TopAttention(retain=0.5)(model):
            _logits(model, {**inputs, "input_ids": ids})
    with pytest.raises(ValueError, match="image_sizes"):
        with TopAttention(retain=0.5)(model):
            _logits(model, {k: v for k, v in inputs.items() if k != "image_sizes"})


def test_processor_count_at_the_published_geometry_equals_the_plan():
    """LlavaNextProcessor's own placeholder count (336-px CLIP crops, 14-px patches, the released pinpoints, the
    released processor settings: one additional token, "default" strategy) equals the adapter's plan."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    from tokenzip.testing import _llama_text_config

    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=4)
    cfg = LlavaNextConfig(vision_config=vision, text_config=_llama_text_config(), image_token_index=IMAGE_TOKEN)
    adapter = LlavaNextAdapter(LlavaNextForConditionalGeneration(cfg).eval())
    proc = LlavaNextProcessor.__new__(LlavaNextProcessor)  # only its counting helpers: no tokenizer needed
    proc.patch_size, proc.num_additional_image_tokens = 14, 1
    proc.image_processor = type("Settings", (), {"image_grid_pinpoints": cfg.image_grid_pinpoints})()
    for h, w in [(672, 672), (480, 640), (1000, 300), (336, 336)]:
        n_proc = proc._get_number_of_features(h, w, 336, 336) - 1  # what replace_image_token writes ("default")
        _, marks, _ = adapter.plan(torch.zeros(1, 5, 3, 336, 336), torch.tensor([[h, w]]), None, "default")
        assert int(marks[0].shape[0]) == n_proc
    assert n_proc == 576 + 24 * 24 + 24  # 336 x 336: pinpoint 336 x 672 -> 1 x 2 crops, unpadded to 24 x 24


# ---- stage "encoder": [CLS] stays in every crop row ---------------------------------------------------------------
def test_encoder_stage_keeps_each_crops_cls_and_equals_the_stock_layers():
    """At a cut after layer 1 the method sees the unpadded crop patch tokens; the LLM gets, per crop, the stock
    layers from the cut on that crop's [CLS] + its kept tokens (no mask: all sizes 1), the [CLS] dropped, then the
    projector."""
    model = built("llava_next")
    inputs = llava_next_inputs(model, default_samples())
    core = model.model
    crops = _crops(model, inputs)
    px = torch.cat([pv[:c] for pv, c in zip(inputs["pixel_values"], crops)])
    with torch.no_grad():
        hs = core.vision_tower(px, output_hidden_states=True).hidden_states
    per_crop = 16
    ids = torch.arange(1, sum(crops) * per_crop + 1).view(sum(crops), per_crop, 1)
    packed, _ = core.pack_image_features(list(torch.split(ids, crops)), inputs["image_sizes"], "default",
                                         image_newline=torch.zeros(1, dtype=torch.long))
    cands = [[divmod(int(v) - 1, per_crop) for v in t[:, 0] if v > 0] for t in packed]
    feats = {}

    def grab(m, a, kw):
        feats["f"] = [f.clone() for f in kw["mm_encoder_outputs"]["image"].pooler_output]

    h = core.register_forward_pre_hook(grab, with_kwargs=True)
    SEEN.clear()
    c = tz.InEncoder(TopAttention(retain=0.3), layer=1)
    try:
        with c(model), torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    items = [it for s in c.last_stats for it in s["image"].items]
    layers = adapter_for(model).parts().encoder_layers
    assert len(SEEN) == len(items) == 4
    for (tokens, _, _, _), it, cand, got in zip(SEEN, items, cands, feats["f"]):
        assert torch.equal(tokens, torch.stack([hs[1][r, 1 + p] for r, p in cand]))  # patch tokens, no [CLS]
        where = [cand[int(i)] for i in it.index]
        ref = torch.empty(len(where), got.shape[-1])
        for r in sorted({r for r, _ in where}):
            pos = [j for j, (row, _) in enumerate(where) if row == r]
            x = torch.cat([hs[1][r, :1], hs[1][r, [1 + where[j][1] for j in pos]]])[None]
            with torch.no_grad():
                for layer in layers[1: adapter_for(model).encoder_depth()]:  # up to the feature layer (-2)
                    x = layer(x, None)
                ref[pos] = core.multi_modal_projector(x[0, 1:])
        assert got.shape[0] == c.budget.count(it.tokens_in)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_encoder_stage_refuses_a_config_without_cls_dropping():
    model = built("llava_next")
    model.config.vision_feature_select_strategy = "full"
    try:
        with pytest.raises(ValueError, match="'default' select strategy"):
            tz.InEncoder(TopAttention(retain=0.5), layer=1)(model).__enter__()
    finally:
        model.config.vision_feature_select_strategy = "default"
    assert getattr(model, "_tokenzip_patch", None) is None


# ---- stage "input": crops ------------------------------------------------------------------------------------------
def test_crops_reduction_keeps_the_base_view_tokens():
    model = built("llava_next")
    inputs = llava_next_inputs(model, default_samples())
    stock = _stock_image_features(model, inputs)
    adapter = adapter_for(model)
    items = adapter.input_plan(inputs, "crops")
    base = 16 + 1  # 4 x 4 base view + one newline
    assert [it.achievable for it in items] == [(base, it.tokens) for it in items]
    new, maps = adapter.rescale_inputs(inputs, "crops", items, [base] * len(items))
    feats = new["mm_encoder_outputs"]["image"].pooler_output
    for f, ref in zip(feats, stock):
        # the base views alone go through CLIP as a smaller batch than with their crops: the same arithmetic up to
        # the kernels' summation order (bitwise on 5.25 here, 2e-9 apart on 5.18), so equal to float32 rounding
        torch.testing.assert_close(f[:16], ref[:16], rtol=1e-5, atol=1e-7)
        assert torch.equal(f[16], model.model.image_newline)
    assert int((new["input_ids"] == IMAGE_TOKEN).sum()) == base * len(items)
    with torch.no_grad():
        model(**new)  # the stock model takes the reduced call


# ---- LLaVA-NeXT-Video ---------------------------------------------------------------------------------------------
def test_clip_items_are_the_models_pooled_features_without_newline():
    model = built("llava_next_video")
    inputs = llava_next_video_inputs(model, default_samples())
    items = adapter_for(model).encode(inputs, ALL)
    with torch.no_grad():
        stock = clip_rows(model.model.get_video_features(inputs["pixel_values_videos"], return_dict=True).pooler_output)
    per_clip = next_video_tokens(model, NEXT_VIDEO_FRAMES)
    assert per_clip == NEXT_VIDEO_FRAMES * 9  # 6 x 6 patches pooled 2 x 2 -> 3 x 3 tokens per frame
    assert [it.sample for it in items] == [0, 1, 1, 2] and [it.modality for it in items] == ["video"] * 4
    for it, ref in zip(items, stock):
        assert torch.equal(it.tokens, ref) and it.tokens.shape[0] == per_clip
        assert [(s.kind, s.t, s.h, s.w) for s in it.grid.segments] == [("frames", NEXT_VIDEO_FRAMES, 3, 3)]
        assert not any(it.grid.newline_mask())
        assert it.signals["cls_attention"].shape == (per_clip,) and it.signals["keys"].shape[0] == per_clip


def test_clip_signals_are_each_frames_cls_row_pooled_like_the_features():
    model, eager = built("llava_next_video"), built("llava_next_video", "eager")
    inputs = llava_next_video_inputs(model, default_samples())
    items = adapter_for(model).encode(inputs, ALL)
    v, t = inputs["pixel_values_videos"].shape[:2]
    with torch.no_grad():
        out = eager.model.vision_tower(inputs["pixel_values_videos"].flatten(0, 1), output_attentions=True,
                                       return_dict=True)
    row = out.attentions[-2][:, :, 0, 1:].mean(1)  # [V*T, 36]
    pooled = torch.nn.functional.avg_pool2d(row.view(-1, 1, 6, 6), 2).flatten(1)  # the pooler's 2x2 windows
    ref = pooled.view(v, t * 9)
    for it, r in zip(items, ref):
        torch.testing.assert_close(it.signals["cls_attention"], r, atol=1e-6, rtol=1e-5)


def test_images_and_clips_in_one_prompt_are_compressed_in_sequence_order():
    model = built("llava_next_video")
    samples = [Sample([1, 5], 1, [6], seed=1), Sample([1], 1, [7, 8], seed=2)]
    px = next_image_processor(model)([im for row in onevision_images(samples) for im in row], return_tensors="pt")
    imgs = {"pixel_values": px["pixel_values"], "image_sizes": px["image_sizes"]}
    counts = [int(f.shape[0]) for f in model.model.get_image_features(imgs["pixel_values"], imgs["image_sizes"],
                                                                      return_dict=True).pooler_output]
    clips = llava_next_video_inputs(model, samples)
    per_clip = next_video_tokens(model, NEXT_VIDEO_FRAMES)
    rows = [[1, 5] + [NEXT_VIDEO_TOKEN] * per_clip + [6] + [IMAGE_TOKEN] * counts[0] + [9],
            [1] + [IMAGE_TOKEN] * counts[1] + [7] + [NEXT_VIDEO_TOKEN] * per_clip + [8]]
    ids, mask = left_pad(rows)
    inputs = {"input_ids": ids, "attention_mask": mask, **imgs, "pixel_values_videos": clips["pixel_values_videos"]}
    items = adapter_for(model).encode(inputs, ALL)
    assert [(it.sample, it.modality) for it in items] == [(0, "video"), (0, "image"), (1, "image"), (1, "video")]
    assert [it.tokens.shape[0] for it in items] == [per_clip, counts[0], counts[1], per_clip]
    ref = _logits(model, inputs)
    with TopAttention(retain=1.0)(model):
        assert torch.equal(_logits(model, inputs), ref)
    seen = []
    h = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["attention_mask"].sum(-1)), with_kwargs=True)
    c = TopAttention(retain=0.3)
    try:
        with c(model):
            _logits(model, inputs)
    finally:
        h.remove()
    for i in range(2):  # text + each item's budget
        text = int(mask[i].sum()) - sum(it.tokens.shape[0] for it in items if it.sample == i)
        assert int(seen[0][i]) == text + sum(c.budget.count(it.tokens.shape[0]) for it in items if it.sample == i)


def test_next_video_images_in_the_encoder_stage():
    """NeXT-Video's images take the NeXT encoder stage (the clip case runs before and in the LLM only)."""
    model = built("llava_next_video")
    inputs = llava_next_inputs(model, default_samples())
    ref = _logits(model, inputs)
    with tz.InEncoder(TopAttention(retain=1.0), layer=1)(model):
        assert torch.equal(_logits(model, inputs), ref)
    c = tz.InEncoder(TopAttention(retain=0.3), layer=1)
    with c(model):
        out = _logits(model, inputs)
    items = [it for s in c.last_stats for it in s["image"].items]
    assert [it.tokens_out for it in items] == [c.budget.count(it.tokens_in) for it in items]
    assert out.shape[1] < ref.shape[1]


def test_frame_selection_keeps_the_kept_frames_tokens():
    model = built("llava_next_video")
    inputs = llava_next_video_inputs(model, default_samples())
    adapter = adapter_for(model)
    plan = adapter.input_plan(inputs, "frames")
    assert [it.achievable for it in plan] == [tuple(9 * j for j in range(1, NEXT_VIDEO_FRAMES + 1))] * 4
    for it in plan:
        it.keep = torch.tensor([0, 2, 4])
    new, maps = adapter.rescale_inputs(inputs, "frames", plan, [27] * 4)
    assert new["pixel_values_videos"].shape[1] == 3
    assert int((new["input_ids"] == NEXT_VIDEO_TOKEN).sum()) == 27 * 4
    with torch.no_grad():
        full = clip_rows(model.model.get_video_features(inputs["pixel_values_videos"], return_dict=True).pooler_output)
        kept = clip_rows(model.model.get_video_features(new["pixel_values_videos"], return_dict=True).pooler_output)
    for (source, index), f, k in zip(maps, full, kept):
        torch.testing.assert_close(k, f[index], atol=1e-5, rtol=1e-5)
        assert int((source >= 0).sum()) == 27
    c = EveryOther(retain=0.5)
    with c(model):
        _logits(model, inputs)


def test_clips_in_the_encoder_stage_are_refused_clearly():
    model = built("llava_next_video")
    inputs = llava_next_video_inputs(model, default_samples())
    with pytest.raises(ValueError, match="before the LLM only"):
        with tz.InEncoder(TopAttention(retain=0.5), layer=1)(model):
            _logits(model, inputs)
    assert getattr(model, "_tokenzip_patch", None) is None


def test_bad_video_input_is_a_clear_error():
    model = built("llava_next_video")
    inputs = llava_next_video_inputs(model, default_samples())
    with pytest.raises(ValueError, match="pixel_values_videos must be"):
        with TopAttention(retain=0.5)(model):
            _logits(model, {**inputs, "pixel_values_videos": inputs["pixel_values_videos"][..., :40]})
