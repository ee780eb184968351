"""LLaVA-OneVision adapter: newline markers, layout, signal mapping (against a brute-force eager computation),
retain=1 exactness, images of different sizes in one batch, the real processor's prompts, bad input."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import select_best_resolution

import tokenzip as tz
from tokenzip import ops
from tokenzip.adapters import adapter_for
from tokenzip.adapters.llava_onevision import LlavaOnevisionAdapter
from tokenzip.base import Compressor, MethodInfo
from tokenzip.testing import (
    IMAGE_TOKEN,
    ONEVISION_VIDEO_TOKEN,
    Sample,
    default_samples,
    left_pad,
    llava_onevision_inputs,
    onevision_image_processor,
    onevision_images,
    tiny_llava_onevision,
)

from conftest import built

ALL = frozenset({"cls_attention", "keys", "projected", "text", "text_mask"})
# one image per sample, all tiled: 112x112 -> 88 tokens, 112x56 -> 56, 112x84 -> 72 (unpadded), 56x112 -> 52
MIXED = [Sample([1, 5], 1, [6, 7], seed=1), Sample([1], 1, [8], seed=2), Sample([1, 9, 10], 1, [11], seed=3),
         Sample([1, 12], 1, [13, 14, 15], seed=4)]


@dataclass
class TopAttention(Compressor):
    """Test-only method: keep the k tokens with the highest cls_attention (uses every signal kind)."""

    info: ClassVar[MethodInfo] = MethodInfo(name="test-top-attention", family="attention", modalities=("image",),
                                            stage="pre_llm", query_aware=False, reference="test")
    requires: ClassVar[tuple[str, ...]] = ("cls_attention", "keys", "projected", "text", "text_mask")

    def _compress(self, tokens, k, layout, signals):
        assert signals["keys"].shape[:2] == tokens.shape[:2]
        assert torch.equal(signals["projected"], tokens)
        return ops.select(tokens, ops.stable_topk(signals["cls_attention"], k))


@pytest.fixture(scope="module")
def squeezed():
    """A model whose ``anyres_max_1`` makes pack_image_features bilinearly down-scale the crop grid."""
    return tiny_llava_onevision("sdpa", vision_aspect_ratio="anyres_max_1")


def _positions(mask):
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, position_ids=_positions(inputs["attention_mask"])).logits


def _brute_pack(model, per_crop, image_sizes, crops, newline):
    """Independent re-derivation of LLaVA-OneVision's packing with explicit loops: base crop, then the crop grid
    (row of crops, row of patches), unpadded, optionally down-scaled, each row closed by ``newline``."""
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    crop_px = cfg.vision_config.image_size
    out, start = [], 0
    for (h0, w0), c in zip(image_sizes.tolist(), crops):
        t = per_crop[start: start + c]
        start += c
        if c == 1:
            out.append(torch.cat([t[0], newline[None]]))
            continue
        bh, bw = select_best_resolution((h0, w0), cfg.image_grid_pinpoints)
        nh, nw = bh // crop_px, bw // crop_px
        gh, gw = nh * side, nw * side
        grid = torch.empty(gh, gw, t.shape[-1], dtype=t.dtype)
        for r in range(gh):
            for col in range(gw):
                grid[r, col] = t[1 + (r // side) * nw + col // side, (r % side) * side + col % side]
        if w0 / h0 > gw / gh:  # wider than the grid: padding rows top and bottom
            pad = (gh - int(round(h0 * gw / w0, 7))) // 2
            grid = grid[pad: gh - pad]
        else:
            pad = (gw - int(round(w0 * gh / h0, 7))) // 2
            grid = grid[:, pad: gw - pad]
        max_crops = int(cfg.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = (grid.shape[0] * grid.shape[1] / (max_crops * side * side)) ** 0.5
        if ratio > 1.1:
            size = [int(grid.shape[0] // ratio), int(grid.shape[1] // ratio)]
            grid = F.interpolate(grid.permute(2, 0, 1)[None], size, mode="bilinear")[0].permute(1, 2, 0)
        rows = [torch.cat([row, newline[None]]) for row in grid]
        out.append(torch.cat([t[0]] + rows))
    return out


def _brute_force_signals(model_eager, inputs):
    """cls_attention / keys from eager attention weights (output_attentions) at the feature layer, per crop."""
    core = model_eager.model
    tower = core.vision_tower
    px = inputs["pixel_values"]
    crops = LlavaOnevisionAdapter(model_eager).crops_per_image(px, inputs["image_sizes"],
                                                               inputs.get("batch_num_images"))
    flat = torch.cat([px[i, :c] for i, c in enumerate(crops)])
    layer = tower.encoder.layers[-1].self_attn  # vision_feature_layer = -1
    got = {}
    h = layer.k_proj.register_forward_hook(lambda m, a, o: got.setdefault("k", o))
    try:
        with torch.no_grad():
            out = tower(flat, output_attentions=True, output_hidden_states=True, return_dict=True)
    finally:
        h.remove()
    att = out.attentions[-1]  # [crops, heads, P, P]
    heads = att.shape[1]
    received = att.mean(dim=(1, 2))
    keys = got["k"].view(*got["k"].shape[:2], heads, -1).mean(dim=2)
    feats = core.multi_modal_projector(out.hidden_states[-1])
    return crops, received, keys, feats


# ---- layout and newline markers -----------------------------------------------------------------------------------
def test_layout_and_newline_markers():
    model = built("llava_onevision")
    inputs = llava_onevision_inputs(model, default_samples())
    items = adapter_for(model).encode(inputs, ALL)
    # sample 0: 112x112 tiled (2x2 crops -> 8x8 + newline column); sample 1: two images, not tiled (multi-image);
    # sample 2: 112x84 tiled and unpadded to 8x6 + newline column
    assert [list(it.grid) for it in items] == [[(4, 4), (8, 9)], [(4, 4), (1, 1)], [(4, 4), (1, 1)], [(4, 4), (8, 7)]]
    assert [[s.kind for s in it.grid.segments] for it in items] == [["base", "crops"], ["base", "newline"],
                                                                     ["base", "newline"], ["base", "crops"]]
    for it in items:  # the layout's newline markers are the adapter's
        assert it.grid.newline_mask() == it.extra["newline"].tolist()
    assert [it.sample for it in items] == [0, 1, 1, 2]
    newline = model.model.image_newline
    for it in items:
        n = it.tokens.shape[0]
        assert n == sum(h * w for h, w in it.grid) == it.tokens_in
        marks = it.extra["newline"]
        (bh, bw), (gh, gw) = it.grid
        expect = torch.zeros(n, dtype=torch.bool)
        expect[bh * bw + gw - 1:: gw] = True  # the last column of the second grid
        assert torch.equal(marks, expect)
        assert torch.equal(it.tokens[marks], newline.expand(int(marks.sum()), -1))
        assert not torch.equal(it.tokens[~marks][:1], newline[None])
        # markers carry no attention and zero keys; real patches all get some attention
        assert torch.all(it.signals["cls_attention"][marks] == 0)
        assert torch.all(it.signals["keys"][marks] == 0)
        assert torch.all(it.signals["cls_attention"][~marks] > 0)


def test_attention_method_skips_newline_markers():
    model = built("llava_onevision")
    inputs = llava_onevision_inputs(model, default_samples())
    c = TopAttention(retain=0.5)
    with c(model):
        _logits(model, inputs)
    items = adapter_for(model).encode(inputs, ALL)
    stats = [it for s in c.last_stats for ms in s.values() for it in ms.items]
    assert len(stats) == len(items)
    for st, it in zip(stats, items):
        assert st.tokens_out == c.budget.count(it.tokens_in)
        assert not bool(it.extra["newline"][st.index].any())  # markers (attention 0) lose every top-k


# ---- signal mapping -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("squeeze", [False, True], ids=["anyres_max_9", "anyres_max_1-interpolated"])
def test_signals_match_brute_force_eager(squeeze, squeezed):
    if squeeze:
        model = squeezed
        eager = tiny_llava_onevision("eager", vision_aspect_ratio="anyres_max_1")
    else:
        model, eager = built("llava_onevision"), built("llava_onevision", "eager")
    inputs = llava_onevision_inputs(model, MIXED, batch_num_images=False)
    items = adapter_for(model).encode(inputs, ALL)
    crops, received, keys, feats = _brute_force_signals(eager, inputs)
    sizes = inputs["image_sizes"]
    d_k = keys.shape[-1]
    ref_att = _brute_pack(model, received[..., None], sizes, crops, torch.zeros(1))
    ref_keys = _brute_pack(model, keys, sizes, crops, torch.zeros(d_k))
    with torch.no_grad():
        ref_feats = _brute_pack(model, feats, sizes, crops, model.model.image_newline)
    for it, a, k, f in zip(items, ref_att, ref_keys, ref_feats):
        assert it.tokens.shape[0] == a.shape[0]
        # the features too: the brute-force arrangement is the model's
        torch.testing.assert_close(it.tokens, f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(it.signals["cls_attention"], a[:, 0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(it.signals["keys"], k, atol=1e-5, rtol=1e-5)
    if squeeze:  # 112x112 in 2x2 crops of 4x4 -> 8x8, down-scaled by 2 -> 4x4 + newline column
        assert list(items[0].grid) == [(4, 4), (4, 5)]


def test_vision_tower_runs_once_per_call():
    model = built("llava_onevision")
    inputs = llava_onevision_inputs(model, default_samples())
    calls = []
    h = model.model.vision_tower.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with TopAttention(retain=0.3)(model):
            _logits(model, inputs)
            assert len(calls) == 1
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
            assert len(calls) == 2
    finally:
        h.remove()


# ---- exactness ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tiled_only", [False, True], ids=["processor-batch_num_images", "all-tiled"])
def test_retain_one_feeds_the_llm_the_original_features(tiled_only):
    model = built("llava_onevision")
    samples = MIXED if tiled_only else default_samples()
    inputs = llava_onevision_inputs(model, samples, batch_num_images=not tiled_only)
    seen = []
    h = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"].clone()), with_kwargs=True)
    try:
        ref = _logits(model, inputs)
        with TopAttention(retain=1.0)(model):
            out = _logits(model, inputs)
    finally:
        h.remove()
    assert torch.equal(seen[0], seen[1])
    assert torch.equal(out, ref)


def test_retain_one_exact_when_interpolated(squeezed):
    inputs = llava_onevision_inputs(squeezed, MIXED, batch_num_images=False)
    ref = _logits(squeezed, inputs)
    with tz.METHODS[0](retain=1.0)(squeezed):
        assert torch.equal(_logits(squeezed, inputs), ref)


# ---- different sizes in one batch ---------------------------------------------------------------------------------
def test_different_size_images_in_one_batch():
    model = built("llava_onevision")
    batch = llava_onevision_inputs(model, MIXED, batch_num_images=False)
    assert (batch["input_ids"] == IMAGE_TOKEN).sum(1).tolist() == [88, 56, 72, 52]
    c = TopAttention(retain=0.4)
    with c(model):
        logits = _logits(model, batch)
        batch_src = [[it.source.tolist() for it in s["image"].items] for s in c.last_stats]
        assert [s["image"].tokens_in for s in c.last_stats] == [88, 56, 72, 52]
        assert [s["image"].tokens_out for s in c.last_stats] == [35, 22, 29, 21]
        for i, s in enumerate(MIXED):
            one = llava_onevision_inputs(model, [s], batch_num_images=False)
            single = _logits(model, one)[0]
            torch.testing.assert_close(logits[i, -single.shape[0]:], single, atol=1e-4, rtol=1e-4)
            assert [it.source.tolist() for it in c.last_stats[0]["image"].items] == batch_src[i]


# ---- the real processor's prompts ---------------------------------------------------------------------------------
def _processor(model, aspect="anyres_max_9"):
    """A real LlavaOnevisionProcessor over a tiny offline word-level tokenizer. The video processor needs
    torchvision, which is not installed; the subclass only skips the processor's attribute-class check."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaOnevisionProcessor, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, IMAGE_TOKEN)] + ["<image>", "<video>"]
    assert words.index("<image>") == IMAGE_TOKEN and words.index("<video>") == ONEVISION_VIDEO_TOKEN
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", additional_special_tokens=["<image>", "<video>"])

    class Processor(LlavaOnevisionProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            return type(argument)

    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    return Processor(image_processor=onevision_image_processor(model), tokenizer=tok, num_image_tokens=side * side,
                     vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                     vision_aspect_ratio=aspect)


@pytest.mark.parametrize("squeeze", [False, True], ids=["anyres_max_9", "anyres_max_1"])
def test_real_processor_prompts(squeeze, squeezed):
    model = squeezed if squeeze else built("llava_onevision")
    proc = _processor(model, model.config.vision_aspect_ratio)
    texts = ["w5 <image> w6 w7", "w8 <image> <image> w9", "w10 w11 w12 <image>"]
    inputs = dict(proc(text=texts, images=onevision_images(default_samples()), return_tensors="pt", padding=True))
    assert int(inputs["attention_mask"][:, -1].min()) == 0  # the tokenizer pads on the right
    items = adapter_for(model).encode(inputs, frozenset())
    counts = (inputs["input_ids"] == IMAGE_TOKEN).sum(1).tolist()
    per_sample = [0] * len(texts)
    for it in items:
        per_sample[it.sample] += it.tokens_in
    assert per_sample == counts
    ref = _logits(model, inputs)
    with tz.METHODS[0](retain=1.0)(model):
        assert torch.equal(_logits(model, inputs), ref)
    with TopAttention(retain=0.25)(model):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


# ---- videos next to images ----------------------------------------------------------------------------------------
def test_video_in_the_same_call_passes_through():
    model = built("llava_onevision")
    inputs = llava_onevision_inputs(model, [Sample([1, 5], 1, [6], seed=1)])
    frames = 2
    videos = torch.randn(1, frames, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        n_video = model.model.get_video_features(videos, return_dict=True).pooler_output.shape[1]
    ids = inputs["input_ids"][0].tolist()
    ids = ids[:2] + [ONEVISION_VIDEO_TOKEN] * n_video + ids[2:]
    inputs["input_ids"], inputs["attention_mask"] = left_pad([ids])
    inputs["pixel_values_videos"] = videos
    ref = _logits(model, inputs)
    with TopAttention(retain=1.0)(model):
        assert torch.equal(_logits(model, inputs), ref)
    with TopAttention(retain=0.3)(model):
        out = _logits(model, inputs)
    assert out.shape[1] == ref.shape[1] - (88 - 26)


# ---- bad input ----------------------------------------------------------------------------------------------------
def test_mismatched_prompt_and_images_raise():
    model = built("llava_onevision")
    inputs = llava_onevision_inputs(model, default_samples())
    ids = inputs["input_ids"].clone()
    ids[0, (ids[0] == IMAGE_TOKEN).nonzero()[0]] = 5  # one placeholder short
    with TopAttention(retain=0.5)(model), pytest.raises(ValueError, match="do not match the prompt"):
        _logits(model, {**inputs, "input_ids": ids})
    no_sizes = {k: v for k, v in inputs.items() if k != "image_sizes"}
    with TopAttention(retain=0.5)(model), pytest.raises(ValueError, match="image_sizes"):
        _logits(model, no_sizes)
    with TopAttention(retain=0.5)(model), pytest.raises(ValueError, match="batch_num_images"):
        _logits(model, {**inputs, "batch_num_images": torch.tensor([1, 1, 1])})
    with TopAttention(retain=0.5)(model), pytest.raises(ValueError, match="pixel_values"):
        _logits(model, {**inputs, "pixel_values": inputs["pixel_values"][:3]})
    with TopAttention(retain=0.5)(model), pytest.raises(ValueError, match="not both"):
        model(**inputs, mm_encoder_outputs={"image": object()})


def test_real_geometry_processor_counts():
    """SigLIP-384/14 crops (27x27 patches, odd side) and the default pinpoints with anyres_max_9, narrow towers: the
    processor's placeholder count equals the model's feature count, the layout tiles it, retain=1 is exact."""
    from PIL import Image
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=384, patch_size=14, vision_use_head=False)
    text = Qwen2Config(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192, pad_token_id=0)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                               video_token_index=ONEVISION_VIDEO_TOKEN, pad_token_id=0)
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration._from_config(cfg).eval()
    proc = _processor(model)
    proc.image_processor = LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384},
                                                           image_grid_pinpoints=cfg.image_grid_pinpoints)
    g = torch.Generator().manual_seed(0)
    images = [[Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())]
              for h, w in [(480, 640), (1000, 333)]]
    inputs = dict(proc(text=["w5 <image> w6", "<image> w7"], images=images, return_tensors="pt", padding=True))
    items = adapter_for(model).encode(inputs, frozenset({"cls_attention"}))
    assert [it.tokens_in for it in items] == (inputs["input_ids"] == IMAGE_TOKEN).sum(1).tolist()
    # 480x640 -> 768x768 pinpoint, 2x2 crops, 54x54 patches, unpadded to 40 rows (7 cut top and bottom);
    # 1000x333 -> 1152x384, 3x1 crops, 81x27 patches, nothing to cut ((27 - 26) // 2 == 0)
    assert [list(it.grid) for it in items] == [[(27, 27), (40, 55)], [(27, 27), (81, 28)]]
    for it in items:
        (bh, bw), (gh, gw) = it.grid
        assert (bh, bw) == (27, 27) and int(it.extra["newline"].sum()) == gh
        assert it.signals["cls_attention"].shape == (it.tokens_in,)
    ref = _logits(model, inputs)
    with tz.METHODS[0](retain=1.0)(model):
        assert torch.equal(_logits(model, inputs), ref)
