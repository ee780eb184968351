"""Qwen2-VL / Qwen2.5-VL adapter: kept tokens keep their original 3-D M-RoPE positions (checked against an oracle
that feeds the stock model only the kept tokens), decoding continues at the right positions (generate() and a
manual loop through rope_deltas), the attention signal equals the block's real (eager) attention, and bad inputs
raise clear errors."""

import sys

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.vision_utils import get_vision_window_index

import tokenzip as tz
from tokenzip.adapters.qwen2_vl import Qwen2VLAdapter
from tokenzip.compat import cache_kwarg, output_cache
from tokenzip.testing import (
    IMAGE_TOKEN,
    QWEN_VIDEO_TOKEN,
    QWEN_VISION_END,
    QWEN_VISION_START,
    Sample,
    default_samples,
    left_pad,
    qwen_vl_inputs,
    qwen_vl_positions,
    tiny_qwen2_5_vl,
)

from conftest import built

QWEN = ["qwen2_vl", "qwen2_5_vl"]


def _oracle(model, inputs, stats):
    """The stock model's arguments for ONLY the kept tokens of a single unpadded sample: the original sequence
    restricted to text + the representative placeholder of every output token, the compressed features computed
    here from the merger's output and the method's ``source`` map, and the original 3-D positions of those columns."""
    assert inputs["input_ids"].shape[0] == 1
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                               return_dict=True).pooler_output
    items = [it for ms in stats[0].values() for it in ms.items]
    assert len(items) == len(feats)
    placeholders = (ids == IMAGE_TOKEN).nonzero().flatten()
    keep = ids != IMAGE_TOKEN
    compressed, start = [], 0
    for f, it in zip(feats, items):
        n = f.shape[0]
        keep[placeholders[start + it.index]] = True
        slots = [[p for p in range(n) if it.source[p] == s] for s in range(it.tokens_out)]
        compressed.append(torch.stack([f[members].mean(0) for members in slots]))
        start += n
    rope, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                         image_grid_thw=inputs["image_grid_thw"])
    cols = keep.nonzero().flatten()
    return {"input_ids": inputs["input_ids"][:, cols], "attention_mask": inputs["attention_mask"][:, cols],
            "position_ids": rope[:, :, cols],
            "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=tuple(compressed))}}


def _greedy(model, call, steps):
    """Greedy decoding without a cache, every step re-feeding the whole sequence; a new text token sits at
    (last position + 1) on all three M-RoPE axes."""
    call = dict(call)
    new = []
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(**call).logits[:, -1].argmax(-1)
        new.append(int(nxt))
        pos = call["position_ids"]
        call["input_ids"] = torch.cat([call["input_ids"], nxt[:, None]], dim=1)
        call["attention_mask"] = torch.cat([call["attention_mask"], torch.ones_like(nxt)[:, None]], dim=1)
        call["position_ids"] = torch.cat([pos, pos[..., -1:] + 1], dim=-1)
    return new


@pytest.mark.parametrize("case", QWEN)
@pytest.mark.parametrize("method", ["random", "avgpool"])
def test_compressed_call_equals_oracle_with_original_positions(case, method):
    model = built(case)
    for sample in default_samples():
        inputs = qwen_vl_inputs(model, [sample])
        c = tz.get(method, retain=0.4)
        with c(model), torch.no_grad():
            logits = model(**inputs).logits
        oracle = _oracle(model, inputs, c.last_stats)
        with torch.no_grad():
            ref = model(**oracle).logits
            renumbered = model(**{**oracle, "position_ids": None}).logits  # contiguous 1-D positions instead
        assert logits.shape == ref.shape
        err = (logits - ref).abs().max().item()
        assert err <= 1e-5
        # the positions matter (tiny random weights give small logits): the oracle is not vacuous
        assert (renumbered - ref).abs().max().item() > max(100 * err, 1e-5)


@pytest.mark.parametrize("case", QWEN)
def test_generation_continues_at_original_positions(case):
    model = built(case)
    steps = 6
    for sample in default_samples():
        inputs = qwen_vl_inputs(model, [sample])
        c = tz.get("random", retain=0.4)
        with c(model):
            cached = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
        oracle = _oracle(model, inputs, c.last_stats)
        assert cached[0, inputs["input_ids"].shape[1]:].tolist() == _greedy(model, oracle, steps)

        # a manual cached step that passes no position_ids (nor a mask: stock Qwen-VL then takes positions from
        # the cache length) relies on model.model.rope_deltas
        with c(model), torch.no_grad():
            out = model(**inputs, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.ones(1, oracle["input_ids"].shape[1] + 1, dtype=torch.long)
        with torch.no_grad():
            step = model(input_ids=nxt, **{cache_kwarg(model): output_cache(out)}).logits[:, -1]
        grown = {**oracle, "input_ids": torch.cat([oracle["input_ids"], nxt], 1), "attention_mask": mask,
                 "position_ids": torch.cat([oracle["position_ids"], oracle["position_ids"][..., -1:] + 1], -1)}
        with torch.no_grad():
            ref = model(**grown).logits[:, -1]
        torch.testing.assert_close(step, ref, atol=1e-5, rtol=1e-5)


def _eager_last_block_attention(model, inputs):
    """The last vision block's real attention probabilities (eager kernel), per attention segment, recorded by
    wrapping the modeling module's eager attention function."""
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
            model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    finally:
        mod.eager_attention_forward = orig
    return seen


@pytest.mark.parametrize("case", QWEN)
def test_attention_signal_matches_eager_attention(case):
    model = built(case, "eager")
    inputs = qwen_vl_inputs(model, default_samples())
    items = Qwen2VLAdapter(model).encode(inputs, frozenset({"cls_attention", "keys", "projected"}))
    segments = _eager_last_block_attention(model, inputs)
    grid = inputs["image_grid_thw"]
    received = torch.cat([w.sum(dim=(0, 1)) for w in segments])  # [patches] in the block's order
    per_group = received.view(-1, 4).mean(1)
    visual = model.model.visual
    windowed = hasattr(visual, "fullatt_block_indexes")
    if windowed:
        assert len(visual.blocks) - 1 not in visual.fullatt_block_indexes  # the tiny case windows its last block
        order, _ = get_vision_window_index(grid, 2, visual.window_size, visual.patch_size)
        per_group = per_group[torch.argsort(order)]
        assert len(segments) > grid.shape[0]  # several windows per image
    sizes = (grid.prod(-1) // 4).tolist()
    heads = visual.blocks[-1].attn.num_heads
    for item, part, n_patches in zip(items, per_group.split(sizes), grid.prod(-1).tolist()):
        expected = part / (heads * n_patches)  # mean over heads and all the image's queries
        torch.testing.assert_close(item.signals["cls_attention"], expected, atol=1e-6, rtol=1e-4)
        assert item.signals["keys"].shape == (item.tokens.shape[0], visual.blocks[-1].attn.head_dim)
        assert torch.equal(item.signals["projected"], item.tokens)
    for item, (t, h, w) in zip(items, grid.tolist()):
        assert list(item.grid) == [(h // 2, w // 2)] * t


@pytest.mark.parametrize("case", QWEN)
def test_full_attention_last_block(case):
    """With the released layout (last block full attention) the signal is one segment per image and sums to 1/4
    per image (each merged token averages four patches; the patches' mean received attention sums to 1)."""
    model = built(case) if case == "qwen2_vl" else tiny_qwen2_5_vl("sdpa", fullatt_block_indexes=[2])
    inputs = qwen_vl_inputs(model, default_samples())
    items = Qwen2VLAdapter(model).encode(inputs, frozenset({"cls_attention"}))
    for item in items:
        torch.testing.assert_close(item.signals["cls_attention"].sum(), torch.tensor(0.25), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", QWEN)
def test_mismatched_images_and_prompt_raise(case):
    model = built(case)
    inputs = qwen_vl_inputs(model, default_samples())
    bad = dict(inputs, image_grid_thw=inputs["image_grid_thw"][:-1],
               pixel_values=inputs["pixel_values"][: int(inputs["image_grid_thw"][:-1].prod(-1).sum())])
    with tz.get("random", retain=0.5)(model):
        with pytest.raises(ValueError, match="do not match the prompt"):
            model(**bad)
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            model(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"})
        with pytest.raises(ValueError, match="image_grid_thw"):
            model(**{k: v for k, v in inputs.items() if k != "image_grid_thw"})


def test_explicit_position_ids_of_every_shape_are_kept_by_column():
    model = built("qwen2_vl")
    inputs = qwen_vl_inputs(model, default_samples())
    full = qwen_vl_positions(model, inputs)
    outs = []
    for pos in (full, full[1:]):
        c = tz.get("random", retain=0.4)
        with c(model), torch.no_grad():
            outs.append(model(**inputs, position_ids=pos).logits)
    with c(model), torch.no_grad():
        outs.append(model(**inputs).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0], outs[2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", QWEN)
def test_video_passes_through_uncompressed(case):
    """An image-only method compresses the images; a video in the same prompt is an item it does not name and
    reaches the LLM unchanged (features computed by the adapter, since the model refuses raw pixels next to
    precomputed features). Video compression: tests/test_qwen_video.py."""
    model = built(case)
    img = qwen_vl_inputs(model, [Sample([1, 5], 1, [6], seed=1)])
    v = model.config.vision_config
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    video_grid = torch.tensor([[2, 4, 4]])
    n_video = int(video_grid.prod()) // 4
    ids = img["input_ids"][0].tolist() + [QWEN_VISION_START] + [QWEN_VIDEO_TOKEN] * n_video + [QWEN_VISION_END, 7]
    input_ids, mask = left_pad([ids])
    types = (input_ids == IMAGE_TOKEN).int() + 2 * (input_ids == QWEN_VIDEO_TOKEN).int()
    inputs = dict(img, input_ids=input_ids, attention_mask=mask, mm_token_type_ids=types,
                  pixel_values_videos=torch.randn(int(video_grid.prod()), patch_dim,
                                                  generator=torch.Generator().manual_seed(0)),
                  video_grid_thw=video_grid)
    with torch.no_grad():
        ref = model(**inputs).logits
    with tz.get("divprune", retain=1.0)(model), torch.no_grad():  # image-only (random also takes video)
        same = model(**inputs).logits
    torch.testing.assert_close(same, ref, atol=1e-5, rtol=1e-5)
    seen = []
    lm = model.model.language_model
    h = lm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        with tz.get("divprune", tokens=1)(model), torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    n_image = int((input_ids == IMAGE_TOKEN).sum())
    assert seen == [input_ids.shape[1] - (n_image - 1)]


@pytest.mark.parametrize("case", QWEN)
def test_text_only_sample_in_batch(case):
    """A batch may mix samples with and without images; each row generates what it generates alone."""
    model = built(case)
    s_img = Sample([1, 5, 6], 1, [7, 8], seed=4)
    s_txt = Sample([1, 9, 10, 11, 12, 13], 0, [14, 15], seed=5)
    batch = qwen_vl_inputs(model, [s_txt, s_img])
    ids, mask = left_pad([s_txt.before + s_txt.after])
    alone = [{"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": torch.zeros_like(ids)},
             qwen_vl_inputs(model, [s_img])]
    with tz.get("avgpool", retain=0.5)(model):
        together = model.generate(**batch, max_new_tokens=5, do_sample=False)[:, -5:]
        for row, one in zip(together, alone):
            assert row.tolist() == model.generate(**one, max_new_tokens=5, do_sample=False)[0, -5:].tolist()
