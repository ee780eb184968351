"""Qwen2-VL / Qwen2.5-VL video items (tokenzip/adapters/qwen_video.py): every kept token carries exactly the M-RoPE
position the model's own ``get_rope_index`` gives it in the uncompressed sequence (Qwen2.5-VL with
``second_per_grid_ts != 1`` and the text after a clip included), the compressed call equals a hand-built oracle,
images and clips in one prompt, a batch with clips of two lengths, generate(), signals against the eager attention,
stages "llm" and "encoder" on clips, the input builder (tokenzip.video.qwen_video_pixels) against the stock image
processor, and bad input. The invariant suite runs every video method on the "qwen2_vl_video" / "qwen2_5_vl_video"
cases through tests/conftest.py."""

import ast
import dataclasses
import inspect
import sys
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from test_llm_stage import assert_equals_mask_oracle
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.vision_utils import get_vision_window_index

import tokenzip as tz
from tokenzip import ops
from tokenzip.adapters import adapter_for
from tokenzip.base import Compressor, MethodInfo
from tokenzip.methods import FastV
from tokenzip.testing import (
    CASES,
    IMAGE_TOKEN,
    QWEN_VIDEO_TOKEN,
    QWEN_VISION_END,
    QWEN_VISION_START,
    Sample,
    default_samples,
    left_pad,
    qwen_clip_settings,
    qwen_vl_inputs,
    qwen_vl_media_positions,
    qwen_vl_video_inputs,
)
from tokenzip.video import QwenVideoSettings, qwen_video_inputs, qwen_video_pixels, synthetic_clip

from conftest import built

VIDEO = ["qwen2_vl_video", "qwen2_5_vl_video"]
IMAGE_CASE = {"qwen2_vl_video": "qwen2_vl", "qwen2_5_vl_video": "qwen2_5_vl"}
ALL = frozenset({"cls_attention", "keys", "projected", "text", "text_mask"})
TOKEN = {"image": IMAGE_TOKEN, "video": QWEN_VIDEO_TOKEN}


@dataclass
class KeepEveryThird(Compressor):
    """Test-only: keep every third token of each item, last first (a known, unsorted kept set on every modality)."""

    info: ClassVar[MethodInfo] = MethodInfo(name="test-every-third", family="input", modalities=("image", "video"),
                                            stage="pre_llm", query_aware=False, reference="test")

    def _compress(self, tokens, k, layout, signals):
        n = tokens.shape[1]
        picks = torch.arange(0, n, 3)[:k].flip(0)
        picks = torch.cat([picks, torch.tensor([i for i in range(n) if i % 3][: k - picks.numel()],
                                               dtype=torch.long)])
        return ops.select(tokens, picks.expand(tokens.shape[0], -1))


# ---- what the language model receives -----------------------------------------------------------------------------
def _capture_lm(model, run):
    """The language model's ``position_ids`` and ``attention_mask`` during ``run()`` (first call)."""
    seen = []
    h = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["position_ids"], kw["attention_mask"])), with_kwargs=True)
    try:
        run()
    finally:
        h.remove()
    return seen[0]


def _expected_columns(inputs, stats, b):
    """The full-sequence column each real slot of sample ``b``'s compressed sequence takes its position from: text
    its own; the ``j``-th kept placeholder of an item the placeholder at the output's representative ``index[j]``."""
    ids, mask = inputs["input_ids"][b], inputs["attention_mask"][b].bool()
    items = [it for ms in stats[b].values() for it in ms.items]
    where = {m: (ids == t).nonzero().flatten().tolist() for m, t in TOKEN.items()}
    runs = {m: [it for it in items if it.modality == m] for m in TOKEN}
    done = {m: 0 for m in TOKEN}  # placeholders of the modality passed so far
    cols = []
    for col in mask.nonzero().flatten().tolist():
        modality = next((m for m, t in TOKEN.items() if int(ids[col]) == t), None)
        if modality is None:
            cols.append(col)
            continue
        start, n = 0, done[modality]  # which item of the modality this placeholder belongs to
        for it in runs[modality]:
            if n < start + it.tokens_in:
                break
            start += it.tokens_in
        j = n - start
        if j < it.tokens_out:
            cols.append(where[modality][start + int(it.index[j])])
        done[modality] += 1
    return cols


def assert_positions_are_the_full_sequence_columns(model, inputs, c):
    """Every real slot the LLM gets carries exactly the column of the uncompressed sequence's M-RoPE positions
    (the model's own ``get_rope_index`` on the full sequence) that it stands for."""
    got_pos, got_mask = _capture_lm(model, lambda: _forward(model, inputs))
    full = qwen_vl_media_positions(model, inputs)[1:]  # [3, B, L] from the model's get_rope_index
    for b in range(inputs["input_ids"].shape[0]):
        want = full[:, b, _expected_columns(inputs, c.last_stats, b)]
        got = got_pos[-3:, b, got_mask[b].bool()]
        assert torch.equal(got, want), f"sample {b}"


def _forward(model, inputs, **extra):
    with torch.no_grad():
        return model(**inputs, **extra).logits


# ---- items, counts, layout -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", VIDEO)
def test_items_are_the_models_clip_features_with_a_frames_layout(case):
    model = built(case)
    inputs = qwen_vl_video_inputs(model, default_samples())
    items = adapter_for(model).encode(inputs, ALL)
    with torch.no_grad():
        ref = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                             return_dict=True).pooler_output
    grid = inputs["video_grid_thw"].tolist()
    assert [it.sample for it in items] == [0, 1, 1, 2] and {it.modality for it in items} == {"video"}
    assert sorted({t for t, _, _ in grid}) == [2, 3]  # clips of two lengths in one batch
    for it, f, (t, h, w) in zip(items, ref, grid):
        torch.testing.assert_close(it.tokens, f, atol=0, rtol=0)
        assert [(s.kind, s.t, s.h, s.w) for s in it.grid.segments] == [("frames", t, h // 2, w // 2)]
        assert it.grid.num_frames == t and torch.equal(it.signals["projected"], it.tokens)
        assert it.signals["text"].shape[0] == int(it.signals["text_mask"].sum())


def _eager_last_block_attention(model, inputs):
    """The last vision block's real attention probabilities (eager kernel) per attention segment, during the
    model's own ``get_video_features``."""
    mod = sys.modules[type(model.model.visual.blocks[-1].attn).__module__]
    orig = mod.eager_attention_forward
    seen = []

    def record(module, *args, **kwargs):
        out, weights = orig(module, *args, **kwargs)
        if module is model.model.visual.blocks[-1].attn:
            seen.append(weights[0].float())
        return out, weights

    mod.eager_attention_forward = record
    try:
        with torch.no_grad():
            model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    finally:
        mod.eager_attention_forward = orig
    return seen


@pytest.mark.parametrize("case", VIDEO)
def test_cls_attention_is_the_eager_attention_per_temporal_grid(case):
    """cls_attention = attention received in the last block (eager probabilities, mean over heads), mean over the
    patch queries of the token's temporal grid, averaged over the 2x2 group, in raster order."""
    model = built(case, "eager")
    inputs = qwen_vl_video_inputs(model, default_samples())
    items = adapter_for(model).encode(inputs, ALL)
    segments = _eager_last_block_attention(model, inputs)
    grid = inputs["video_grid_thw"]
    per_group = torch.cat([w.sum(dim=(0, 1)) for w in segments]).view(-1, 4).mean(1)
    visual = model.model.visual
    if hasattr(visual, "fullatt_block_indexes"):  # windows: undo the model's window order
        order, _ = get_vision_window_index(grid, 2, visual.window_size, visual.patch_size)
        per_group = per_group[torch.argsort(order)]
        assert len(segments) > int(grid[:, 0].sum())  # several windows per temporal grid
    else:
        assert len(segments) == int(grid[:, 0].sum())  # one full-attention segment per temporal grid
    heads = visual.blocks[-1].attn.num_heads
    for item, part, (t, h, w) in zip(items, per_group.split((grid.prod(-1) // 4).tolist()), grid.tolist()):
        torch.testing.assert_close(item.signals["cls_attention"], part / (heads * h * w), atol=1e-6, rtol=1e-4)
        if not hasattr(visual, "fullatt_block_indexes"):  # each temporal grid's queries spread 1 over its patches
            sums = item.signals["cls_attention"].view(t, -1).sum(1)
            torch.testing.assert_close(sums, torch.full((t,), 0.25), atol=1e-5, rtol=0)
        assert item.signals["keys"].shape == (item.tokens.shape[0], visual.blocks[-1].attn.head_dim)


# ---- positions -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", VIDEO)
@pytest.mark.parametrize("method", ["dycoke", "vidcom2", "test-every-third"])
def test_kept_video_tokens_keep_their_full_sequence_positions(case, method):
    """A padded batch with clips of two lengths (t = 2 and 3): every slot the LLM gets has exactly the position
    column of the uncompressed sequence it stands for, the text after each clip included."""
    model = built(case)
    inputs = qwen_vl_video_inputs(model, default_samples())
    c = KeepEveryThird(retain=0.3) if method == "test-every-third" else tz.get(method, retain=0.3)
    with c(model):
        assert_positions_are_the_full_sequence_columns(model, inputs, c)
    assert any(it.tokens_out < it.tokens_in for s in c.last_stats for ms in s.values() for it in ms.items)


def test_qwen2_5_vl_temporal_positions_follow_second_per_grid_ts():
    """The case's Qwen2.5-VL clips have second_per_grid_ts 1 and 2/3: the full-sequence temporal index of grid g is
    start + floor(g * tokens_per_second * second_per_grid_ts) (the model's, not re-derived), and the kept tokens of
    a compressed call carry those values."""
    model = built("qwen2_5_vl_video")
    inputs = qwen_vl_video_inputs(model, [Sample([1, 5], 1, [6, 7], seed=1), Sample([1, 5], 1, [6, 7], seed=2)])
    spg = inputs["second_per_grid_ts"].tolist()
    assert spg[0] == 1.0 and abs(spg[1] - 2 / 3) < 1e-6
    full = qwen_vl_media_positions(model, inputs)[1:]
    tps = model.config.vision_config.tokens_per_second
    for b, (t, h, w) in enumerate(inputs["video_grid_thw"].tolist()):
        cols = (inputs["input_ids"][b] == QWEN_VIDEO_TOKEN).nonzero().flatten()
        temporal = full[0, b, cols].view(t, -1)
        start = int(full[0, b, cols[0]])
        assert temporal[:, 0].tolist() == [start + int(g * tps * spg[b]) for g in range(t)]
        after = int(cols[-1]) + 2  # the first text token after <vision_end>
        assert full[:, b, after].tolist() == [start + max(h, w) // 2 + 1] * 3  # the model's rule in 5.23-5.24
    c = tz.get("dycoke", retain=0.3)
    with c(model):
        assert_positions_are_the_full_sequence_columns(model, inputs, c)


def _oracle(model, inputs, stats):
    """The stock model fed ONLY the kept tokens of one unpadded sample: text + the representative placeholder of
    every output token, the compressed features computed here from the model's own features and the method's
    ``source`` map, and the full-sequence positions of those columns."""
    assert inputs["input_ids"].shape[0] == 1
    ids = inputs["input_ids"][0]
    feats = {}
    with torch.no_grad():
        if "pixel_values" in inputs:
            feats["image"] = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                            return_dict=True).pooler_output
        feats["video"] = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                                        return_dict=True).pooler_output
    items = [it for ms in stats[0].values() for it in ms.items]
    keep = (ids != IMAGE_TOKEN) & (ids != QWEN_VIDEO_TOKEN)
    compressed = {m: [] for m in feats}
    cursor = {m: 0 for m in feats}
    for it in items:
        f = feats[it.modality][len(compressed[it.modality])]
        placeholders = (ids == TOKEN[it.modality]).nonzero().flatten()
        keep[placeholders[cursor[it.modality] + it.index]] = True
        slots = [[p for p in range(f.shape[0]) if it.source[p] == s] for s in range(it.tokens_out)]
        compressed[it.modality].append(torch.stack([f[members].mean(0) for members in slots]))
        cursor[it.modality] += f.shape[0]
    cols = keep.nonzero().flatten()
    return {"input_ids": inputs["input_ids"][:, cols], "attention_mask": inputs["attention_mask"][:, cols],
            "position_ids": qwen_vl_media_positions(model, inputs)[1:][:, :, cols],
            "mm_encoder_outputs": {m: BaseModelOutputWithPooling(pooler_output=tuple(v))
                                   for m, v in compressed.items() if v}}


@pytest.mark.parametrize("case", VIDEO)
@pytest.mark.parametrize("method", ["dycoke", "llava_scissor"])
def test_compressed_call_equals_oracle(case, method):
    """Dropping (DyCoke) and merging (LLaVA-Scissor) methods: logits equal the hand-built oracle, and the
    positions matter (the oracle with contiguous positions differs)."""
    model = built(case)
    for sample in default_samples():
        inputs = qwen_vl_video_inputs(model, [sample])
        c = tz.get(method, retain=0.4)
        with c(model):
            logits = _forward(model, inputs)
        oracle = _oracle(model, inputs, c.last_stats)
        ref = _forward(model, oracle)
        renumbered = _forward(model, {**oracle, "position_ids": None})
        err = (logits - ref).abs().max().item()
        assert logits.shape == ref.shape and err <= 1e-5
        assert (renumbered - ref).abs().max().item() > max(100 * err, 1e-5)


def _greedy(model, call, steps):
    call = dict(call)
    new = []
    for _ in range(steps):
        nxt = _forward(model, call)[:, -1].argmax(-1)
        new.append(int(nxt))
        pos = call["position_ids"]
        call["input_ids"] = torch.cat([call["input_ids"], nxt[:, None]], dim=1)
        call["attention_mask"] = torch.cat([call["attention_mask"], torch.ones_like(nxt)[:, None]], dim=1)
        call["position_ids"] = torch.cat([pos, pos[..., -1:] + 1], dim=-1)
    return new


@pytest.mark.parametrize("case", VIDEO)
def test_generate_continues_at_the_original_positions(case):
    """generate() on a batch with clips of two lengths: every row equals its greedy oracle (cache-free decoding of
    the kept tokens at their original positions) and generates what it generates alone."""
    model = built(case)
    samples = default_samples()
    steps = 5
    batch = qwen_vl_video_inputs(model, samples)
    c = tz.get("dycoke", retain=0.4)
    with c(model):
        together = model.generate(**batch, max_new_tokens=steps, do_sample=False)
    assert torch.equal(together[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    for b, s in enumerate(samples):
        one = qwen_vl_video_inputs(model, [s])
        with c(model):
            alone = model.generate(**one, max_new_tokens=steps, do_sample=False)
        assert alone[0, -steps:].tolist() == together[b, -steps:].tolist() == _greedy(
            model, _oracle(model, one, c.last_stats), steps)


# ---- images and clips in one prompt --------------------------------------------------------------------------------
def _mixed_inputs(model):
    """Per sample: its images (vision_start, placeholders, vision_end), text, then its clips; sample 1 has two of
    each, clips of two lengths in the batch."""
    samples = default_samples()
    imgs, vids = qwen_vl_inputs(model, samples), qwen_vl_video_inputs(model, samples)
    rows = []
    for b, s in enumerate(samples):
        def media(inputs, b=b):
            row = inputs["input_ids"][b][inputs["attention_mask"][b].bool()].tolist()
            return row[len(s.before): len(row) - len(s.after)]
        rows.append(s.before + media(imgs) + [30, 31] + media(vids) + s.after)
    ids, mask = left_pad(rows)
    out = {"input_ids": ids, "attention_mask": mask,
           "mm_token_type_ids": (ids == IMAGE_TOKEN).int() + 2 * (ids == QWEN_VIDEO_TOKEN).int(),
           "pixel_values": imgs["pixel_values"], "image_grid_thw": imgs["image_grid_thw"],
           "pixel_values_videos": vids["pixel_values_videos"], "video_grid_thw": vids["video_grid_thw"]}
    if "second_per_grid_ts" in vids:
        out["second_per_grid_ts"] = vids["second_per_grid_ts"]
    return out


@pytest.mark.parametrize("case", VIDEO)
@pytest.mark.parametrize("method", ["dycoke", "random", "test-every-third"], ids=["video-only", "image-only", "both"])
def test_images_and_clips_in_one_prompt(case, method):
    model = built(IMAGE_CASE[case])
    inputs = _mixed_inputs(model)
    make = (lambda **b: KeepEveryThird(**b)) if method == "test-every-third" else (lambda **b: tz.get(method, **b))
    ref = _forward(model, inputs)
    with make(retain=1.0)(model):
        torch.testing.assert_close(_forward(model, inputs), ref, atol=1e-5, rtol=1e-5)
    c = make(retain=0.3)
    with c(model):
        assert_positions_are_the_full_sequence_columns(model, inputs, c)
    items = adapter_for(model).encode(inputs, frozenset())
    assert [(it.sample, it.modality) for it in items] == [(0, "image"), (0, "video"), (1, "image"), (1, "image"),
                                                          (1, "video"), (1, "video"), (2, "image"), (2, "video")]
    stats = [it for s in c.last_stats for ms in s.values() for it in ms.items]
    assert [(st.modality, st.tokens_in) for st in stats] == [(it.modality, it.tokens.shape[0]) for it in items]
    for st in stats:
        compressed = st.modality in c.info.modalities
        assert st.tokens_out == (c.budget.count(st.tokens_in) if compressed else st.tokens_in)


# ---- stage "llm" ---------------------------------------------------------------------------------------------------
@dataclass
class ImageOnlyFastV(FastV):
    """Test-only: FastV declared for images only (the LLM stage must leave the clips whole)."""

    info: ClassVar[MethodInfo] = dataclasses.replace(FastV.info, name="test-image-fastv", modalities=("image",))


def test_llm_items_are_the_clip_runs_with_their_layout():
    model = built("qwen2_5_vl_video")
    inputs = qwen_vl_video_inputs(model, default_samples())
    items = adapter_for(model).llm_items(inputs)
    grid = inputs["video_grid_thw"].tolist()
    assert [(it.sample, it.modality) for it in items] == [(0, "video"), (1, "video"), (1, "video"), (2, "video")]
    for it, (t, h, w) in zip(items, grid):
        assert [(s.kind, s.t, s.h, s.w) for s in it.grid.segments] == [("frames", t, h // 2, w // 2)]
    for b in range(3):
        runs = torch.cat([it.positions for it in items if it.sample == b])
        assert torch.equal(runs, (inputs["input_ids"][b] == QWEN_VIDEO_TOKEN).nonzero().flatten())
    mixed = _mixed_inputs(model)
    got = [(it.sample, it.modality, it.positions.numel()) for it in adapter_for(model).llm_items(mixed)]
    want = [(it.sample, it.modality, it.tokens.shape[0]) for it in adapter_for(model).encode(mixed, frozenset())]
    assert got == want


@pytest.mark.parametrize("method", [ImageOnlyFastV, FastV], ids=["image-only", "image-and-video"])
def test_llm_stage_compresses_only_the_methods_modalities(method):
    model = built("qwen2_vl")
    inputs = _mixed_inputs(model)
    c = method(retain=0.3, layer=1)
    with c(model):
        out = _forward(model, inputs)
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    items = adapter_for(model).encode(inputs, frozenset())
    for b, per_sample in enumerate(c.last_stats):
        for modality in ("image", "video"):
            want = [it.tokens.shape[0] for it in items if it.sample == b and it.modality == modality]
            got = per_sample[modality].items if modality in per_sample else []
            if modality in method.info.modalities:
                assert [(it.tokens_in, it.tokens_out) for it in got] == [(n, c.budget.count(n)) for n in want]
            else:
                assert got == []
    assert_equals_mask_oracle(model, c, inputs, out, gen, lambda: _forward(model, inputs))


def test_compose_video_pre_llm_then_fastv():
    """DyCoke before the LLM, then FastV on the clips it shortened (the runs come from the per-clip features)."""
    model = built("qwen2_5_vl_video")
    inputs = qwen_vl_video_inputs(model, default_samples())
    pre, llm = tz.get("dycoke", retain=0.5), tz.get("fastv", retain=0.5, layer=1)
    with tz.compose(pre, llm)(model):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    sizes = [int(n) // 4 for n in inputs["video_grid_thw"].prod(-1).tolist()]
    seen = [it for part in llm.last_stats for it in part["video"].items]
    assert [it.tokens_in for it in seen] == [pre.budget.count(n) for n in sizes]
    assert [it.tokens_out for it in seen] == [llm.budget.count(pre.budget.count(n)) for n in sizes]


# ---- stage "encoder" -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", VIDEO)
def test_encoder_stage_on_clips_and_images(case):
    """One cut: clips are compressed inside the ViT per temporal grid (their own ViT pass), images next to them
    in theirs; retain=1 is lossless on a mixed prompt; kept tokens keep their full-sequence positions."""
    model = built(IMAGE_CASE[case])
    inputs = _mixed_inputs(model)
    ref = _forward(model, inputs)
    with tz.InEncoder(KeepEveryThird(retain=1.0), layer=1)(model):
        torch.testing.assert_close(_forward(model, inputs), ref, atol=1e-5, rtol=1e-5)
    c = tz.InEncoder(tz.get("dycoke", retain=0.3), layer=1)
    with c(model):
        assert_positions_are_the_full_sequence_columns(model, inputs, c)
    videos = [it for s in c.last_stats for it in s["video"].items]
    assert [it.tokens_out for it in videos] == [c.budget.count(it.tokens_in) for it in videos]
    assert all(it.tokens_in == it.tokens_out for s in c.last_stats for it in s["image"].items)  # video-only method


def test_encoder_schedule_with_clips_is_a_clear_error():
    model = built("qwen2_5_vl_video")
    inputs = qwen_vl_video_inputs(model, default_samples())
    with tz.InEncoder(tz.get("dycoke", retain=0.3), layer=(1, 2))(model):
        with pytest.raises(ValueError, match="one cut"):
            _forward(model, inputs)


# ---- the input builder ---------------------------------------------------------------------------------------------
def test_settings_defaults_are_the_video_processors():
    """The processor cannot be imported here (torchvision): its class attributes, read from its source file."""
    import transformers.models.qwen2_vl as pkg
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    path = inspect.getfile(pkg).replace("__init__.py", "video_processing_qwen2_vl.py")
    tree = ast.parse(open(path).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    attrs = {t.id: n.value for n in cls.body if isinstance(n, ast.Assign) for t in n.targets
             if isinstance(t, ast.Name)}
    s = QwenVideoSettings()
    size = eval(compile(ast.Expression(attrs["size"]), path, "eval"))  # a literal dict of products
    assert (s.min_pixels, s.max_pixels) == (size["shortest_edge"], size["longest_edge"])
    for name in ("patch_size", "temporal_patch_size", "merge_size", "max_video_tokens"):
        assert getattr(s, name) == ast.literal_eval(attrs[name]), name
    assert ast.unparse(attrs["resample"]) == "PILImageResampling.BICUBIC" and s.resample == 3
    assert (ast.unparse(attrs["image_mean"]), ast.unparse(attrs["image_std"])) == ("OPENAI_CLIP_MEAN",
                                                                                   "OPENAI_CLIP_STD")
    assert s.image_mean == tuple(OPENAI_CLIP_MEAN) and s.image_std == tuple(OPENAI_CLIP_STD)


@pytest.mark.parametrize("size,exact", [((56, 84), True), ((60, 90), False)], ids=["no-resize", "resize"])
def test_two_identical_frames_give_the_image_processors_patches(size, exact):
    """The stock PIL image processor duplicates an image along temporal_patch_size: a clip of that frame twice
    must give its patches. Without a resize (the frame already fits) they agree to float rounding; with one, the
    only difference is PIL's bicubic against torch's antialiased bicubic (at most one grey level, on < 1 %)."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    frame = synthetic_clip(3, *size, seed=1).frames[1]
    s = QwenVideoSettings(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    pixels, grid = qwen_video_pixels([np.stack([frame, frame])], s)
    proc = Qwen2VLImageProcessorPil(size={"shortest_edge": s.min_pixels, "longest_edge": s.max_pixels})
    ref = proc(Image.fromarray(frame), return_tensors="pt")
    assert grid.tolist() == ref["image_grid_thw"].tolist() and pixels.shape == ref["pixel_values"].shape
    diff = (pixels - ref["pixel_values"]).abs()
    if exact:
        assert diff.max().item() < 1e-5
    else:
        grey = diff * 255 * torch.tensor(s.image_std).repeat_interleave(2 * 14 * 14)  # back to 8-bit levels
        assert grey.max().item() <= 1.01 and (grey > 0.5).float().mean().item() < 0.01


def test_odd_frame_counts_repeat_the_last_frame_and_patches_are_in_the_models_order():
    clip = synthetic_clip(5, 32, 40, seed=3).frames
    s = QwenVideoSettings(min_pixels=64, max_pixels=48 * 48, patch_size=4)
    odd, grid = qwen_video_pixels([clip], s)
    even, _ = qwen_video_pixels([np.concatenate([clip, clip[-1:]])], s)
    assert grid.tolist() == [[3, 8, 10]] and torch.equal(odd, even)
    # patch (t, block row, block col, r, c): its values are (C, temporal, 4, 4) of frames 2t, 2t+1 at that place
    x = (torch.as_tensor(clip).permute(0, 3, 1, 2).float() - 255 * torch.tensor(s.image_mean)[:, None, None]) / (
        255 * torch.tensor(s.image_std)[:, None, None])
    t, by, bx, r, c = 1, 2, 3, 1, 0
    row = ((t * 4 + by) * 5 + bx) * 4 + r * 2 + c
    y0, x0 = (2 * by + r) * 4, (2 * bx + c) * 4
    want = x[2 * t: 2 * t + 2, :, y0: y0 + 4, x0: x0 + 4].permute(1, 0, 2, 3).flatten()
    torch.testing.assert_close(odd[row], want, atol=1e-5, rtol=0)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "hello": 5, "world": 6, "<|vision_start|>": QWEN_VISION_START,
             "<|vision_end|>": QWEN_VISION_END, "<|video_pad|>": QWEN_VIDEO_TOKEN}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                   extra_special_tokens={"video_token": "<|video_pad|>"})


@pytest.mark.parametrize("case", VIDEO)
def test_qwen_video_inputs_run_on_the_model(case):
    model = built(case)
    clips = [synthetic_clip(n, 30, 40, seed=n).frames for n in (3, 6, 4)]
    texts = ["hello <|vision_start|> <|video_pad|> <|vision_end|> world",
             "<|vision_start|> <|video_pad|> <|vision_end|> <|vision_start|> <|video_pad|> <|vision_end|> hello"]
    settings = qwen_clip_settings(model)
    qwen25 = case == "qwen2_5_vl_video"
    if qwen25:
        with pytest.raises(ValueError, match="fps"):
            qwen_video_inputs(model, _tokenizer(), texts, clips, settings=settings)
    inputs = qwen_video_inputs(model, _tokenizer(), texts, clips, fps=[2.0, 4.0, 1.0], settings=settings)
    assert inputs["video_grid_thw"].tolist() == [[2, 8, 10], [3, 8, 10], [2, 8, 10]]
    with torch.no_grad():
        feats = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                               return_dict=True).pooler_output
    assert (inputs["input_ids"] == QWEN_VIDEO_TOKEN).sum(1).tolist() == [feats[0].shape[0],
                                                                         feats[1].shape[0] + feats[2].shape[0]]
    assert torch.equal(inputs["mm_token_type_ids"], 2 * (inputs["input_ids"] == QWEN_VIDEO_TOKEN).int())
    if qwen25:
        assert inputs["second_per_grid_ts"].tolist() == [1.0, 0.5, 2.0]
    else:
        assert "second_per_grid_ts" not in inputs
    ref = _forward(model, inputs)
    with tz.get("dycoke", retain=1.0)(model):
        torch.testing.assert_close(_forward(model, inputs), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="marker"):
        qwen_video_inputs(model, _tokenizer(), texts, clips[:2], fps=2.0, settings=settings)


# ---- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", VIDEO)
def test_bad_video_input_is_a_clear_error(case):
    model = built(case)
    inputs = qwen_vl_video_inputs(model, default_samples())
    with tz.get("dycoke", retain=0.5)(model):
        with pytest.raises(ValueError, match="video_grid_thw is required"):
            _forward(model, {k: v for k, v in inputs.items() if k != "video_grid_thw"})
        short = {**inputs, "input_ids": inputs["input_ids"].clone()}
        short["input_ids"][0, -8] = 5  # one video placeholder of sample 0 too few
        with pytest.raises(ValueError, match="the videos do not match the prompt"):
            _forward(model, short)
        with pytest.raises(ValueError, match="pixel_values_videos has"):
            _forward(model, {**inputs, "pixel_values_videos": inputs["pixel_values_videos"][:-4]})
        with pytest.raises(ValueError, match="second_per_grid_ts must hold one"):
            _forward(model, {**inputs, "second_per_grid_ts": torch.tensor([1.0, 1.0])})
    with pytest.raises(ValueError, match="uint8"):
        qwen_video_pixels([np.zeros((2, 8, 8, 3), dtype=np.float32)])


def test_case_pairs_every_video_method_in_every_stage():
    from conftest import compatible

    case = CASES["qwen2_5_vl_video"]
    assert case.modalities == ("video",) and case.stages == ("pre_llm", "encoder", "llm")
    assert CASES["qwen2_5_vl"].modalities == ("image",)
    for m in tz.METHODS:
        stage = m.info.stage
        stage_ok = m.reduces in case.adapter.input_reductions if stage == "input" else stage in case.stages
        assert compatible(m, case) == ("video" in m.info.modalities and stage_ok
                                       and set(m(retain=1.0).requires) <= case.produces(stage))
    assert {m.info.name for m in tz.METHODS if m.info.stage == "input" and compatible(m, case)} >= {
        "uniform_frames", "frame_dedup_pixel"}
    assert {m.info.name for m in tz.METHODS if m.info.stage == "llm" and compatible(m, case)} == {
        "dart", "dycoke_kv", "fastv", "fastv_av", "fitprune", "framefusion", "mustdrop", "pyramiddrop", "sparsevlm",
        "st3", "tokencarve", "topv", "vscan", "vtw", "zipvl"}


# ---- stage "input", reduction "frames": the unit is one temporal grid ----------------------------------------------
@dataclass
class KeepLastGrids(tz.base.FrameSelector):
    """Test-only: keep the last k units (a known, non-prefix choice)."""

    info: ClassVar[MethodInfo] = MethodInfo(name="test-last-grids", family="input", modalities=("video",),
                                            stage="input", query_aware=False, reference="test")

    def _select(self, frames, k):
        return torch.arange(frames.shape[0] - k, frames.shape[0])


def _frames_columns(inputs, stats, b):
    """Sample ``b``'s kept full-sequence columns under a frame selection: text, and each clip's kept tokens
    (``index``: the original placeholders of the kept grids, in order)."""
    ids, mask = inputs["input_ids"][b], inputs["attention_mask"][b].bool()
    where = (ids == QWEN_VIDEO_TOKEN).nonzero().flatten()
    kept, start = set(), 0
    for it in (it for ms in stats[b].values() for it in ms.items):
        kept |= set(where[start + it.index].tolist())
        start += it.tokens_in
    return [c for c in mask.nonzero().flatten().tolist() if int(ids[c]) != QWEN_VIDEO_TOKEN or c in kept]


@pytest.mark.parametrize("case", VIDEO)
@pytest.mark.parametrize("method", ["uniform_frames", "test-last-grids"])
def test_frame_selection_keeps_whole_grids_at_their_full_sequence_positions(case, method):
    """Clips of 2 and 3 grids keep whole temporal grids; a kept grid's tokens are the ones the full clip gives it
    (the ViT attends within a grid), and every kept slot carries the full sequence's position (Qwen2.5-VL:
    second_per_grid_ts != 1 in the batch), the text after each clip too."""
    model = built(case)
    inputs = qwen_vl_video_inputs(model, default_samples())
    c = KeepLastGrids(retain=0.5) if method == "test-last-grids" else tz.get(method, retain=0.5)
    seen = []
    lm = model.model.language_model
    h = lm.register_forward_pre_hook(lambda m, a, kw: seen.append((kw["inputs_embeds"], kw["position_ids"],
                                                                    kw["attention_mask"])), with_kwargs=True)
    try:
        with c(model):
            _forward(model, inputs)
    finally:
        h.remove()
    embeds, pos, mask = seen[0]
    full = qwen_vl_media_positions(model, inputs)[1:]
    with torch.no_grad():
        feats = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                               return_dict=True).pooler_output
    clips = iter(feats)
    for b, per_sample in enumerate(c.last_stats):
        cols = _frames_columns(inputs, c.last_stats, b)
        assert torch.equal(pos[-3:, b, mask[b].bool()], full[:, b, cols]), f"sample {b}"
        got = embeds[b, mask[b].bool()][[int(inputs["input_ids"][b, col]) == QWEN_VIDEO_TOKEN for col in cols]]
        want = []
        for it in per_sample["video"].items:
            per_grid = it.grid.segments[0].h * it.grid.segments[0].w
            assert it.tokens_out % per_grid == 0 and it.tokens_out == c.target(it.tokens_in, tuple(
                j * per_grid for j in range(1, it.grid.num_frames + 1)))
            assert torch.equal(it.index.view(-1, per_grid) % per_grid, torch.arange(per_grid).expand(
                it.tokens_out // per_grid, -1))  # whole grids
            want.append(next(clips)[it.index])
        torch.testing.assert_close(got, torch.cat(want), atol=1e-5, rtol=1e-5)
    if method == "test-last-grids":  # a non-prefix choice: the kept grids are the last ones
        it = c.last_stats[0]["video"].items[0]
        assert int(it.index[0]) == it.tokens_in - it.tokens_out


@pytest.mark.parametrize("case", VIDEO)
def test_frame_selection_then_a_pre_llm_method_and_generate(case):
    """tz.compose(frame selection, DyCoke): the pre-LLM method runs on the kept grids and every slot keeps its
    full-sequence position; generate() returns the caller's prompt."""
    model = built(case)
    inputs = qwen_vl_video_inputs(model, default_samples())
    frames, pre = KeepLastGrids(retain=0.7), tz.get("dycoke", retain=0.5)
    with tz.compose(frames, pre)(model):
        got_pos, got_mask = _capture_lm(model, lambda: _forward(model, inputs))
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    full = qwen_vl_media_positions(model, inputs)[1:]
    for b in range(inputs["input_ids"].shape[0]):
        ids = inputs["input_ids"][b]
        where = (ids == QWEN_VIDEO_TOKEN).nonzero().flatten()
        kept, start = [], 0
        for fit, pit in zip(frames.last_stats[b]["video"].items, pre.last_stats[b]["video"].items):
            # DyCoke's slot j stands at the kept-grid token pit.index[j], i.e. original token fit.index[...]
            kept.append(where[start + fit.index[pit.index]])
            start += fit.tokens_in
        video_cols = set(where.tolist())
        # sequence order: text columns and each clip's kept slots where its placeholders were
        slots = []
        clip_starts = []
        start = 0
        for fit in frames.last_stats[b]["video"].items:
            clip_starts.append(int(where[start]))
            start += fit.tokens_in
        clip_of = iter(kept)
        for col in inputs["attention_mask"][b].nonzero().flatten().tolist():
            if col not in video_cols:
                slots.append(col)
            elif col in clip_starts:
                slots += next(clip_of).tolist()
        assert len(slots) == int(got_mask[b].sum())
        assert torch.equal(got_pos[-3:, b, got_mask[b].bool()], full[:, b, slots]), f"sample {b}"
