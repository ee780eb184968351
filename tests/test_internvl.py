"""InternVL adapter: what is particular to the model. The <img>/</img> markers stay and only the IMG_CONTEXT runs
shrink; the features go to the model as one tensor; signals per pixel-shuffled token (against a brute-force eager
computation); tile dropping keeps the thumbnail's own tokens; video clips (frames as single tiles) are one item with
a frames layout and kept tokens stay in their frame's run; the encoder stage compresses whole 2x2 patch groups; bad
input is refused clearly."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import tokenzip as tz
from tokenzip import ops
from tokenzip.adapters import adapter_for
from tokenzip.adapters.internvl import InternVLAdapter
from tokenzip.base import Compressor, MethodInfo
from tokenzip.testing import (
    IMAGE_TOKEN,
    INTERNVL_IMG_END,
    INTERNVL_IMG_START,
    INTERNVL_TILES,
    default_samples,
    internvl_inputs,
    internvl_tile_tokens,
    internvl_video_inputs,
)

from conftest import built


def _positions(mask):
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _run_lengths(ids):
    """Lengths of the IMG_CONTEXT runs of one row, in order."""
    out, n = [], 0
    for t in ids.tolist() + [-1]:
        if t == IMAGE_TOKEN:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


def _capture(model):
    """The keyword arguments the stock InternVLModel receives (after tokenzip rebuilt the call)."""
    seen = []
    handle = model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    return seen, handle


@dataclass
class TopAttention(Compressor):
    """Test-only method: the k tokens of highest cls_attention (checks the signals' shapes on the way)."""

    info: ClassVar[MethodInfo] = MethodInfo(name="test-internvl-top", family="attention", modalities=("image", "video"),
                                            stage="pre_llm", query_aware=False, reference="test")
    requires: ClassVar[tuple[str, ...]] = ("cls_attention", "keys", "projected")

    def _compress(self, tokens, k, layout, signals):
        assert signals["keys"].shape[:2] == tokens.shape[:2]
        assert torch.equal(signals["projected"], tokens)
        return ops.select(tokens, ops.stable_topk(signals["cls_attention"], k))


def test_markers_stay_and_features_are_one_tensor():
    model = built("internvl")
    inputs = internvl_inputs(model, default_samples())
    seen, handle = _capture(model)
    try:
        with tz.get("visionzip", retain=0.3)(model):
            model(**inputs)
    finally:
        handle.remove()
    kw = seen[0]
    assert kw.get("pixel_values") is None
    pooled = kw["mm_encoder_outputs"]["image"].pooler_output
    assert isinstance(pooled, torch.Tensor) and pooled.dim() == 3 and pooled.shape[0] == 1
    ids = kw["input_ids"]
    assert pooled.shape[1] == int((ids == IMAGE_TOKEN).sum())
    for b in range(ids.shape[0]):
        before = inputs["input_ids"][b]
        for marker in (INTERNVL_IMG_START, INTERNVL_IMG_END):
            assert int((ids[b] == marker).sum()) == int((before == marker).sum())
        # each <img> block keeps its budget, between its own markers
        budget = tz.get("visionzip", retain=0.3).budget
        assert _run_lengths(ids[b]) == [budget.count(n) for n in _run_lengths(before)]
        real = ids[b][kw["attention_mask"][b].bool()].tolist()
        starts = [i for i, t in enumerate(real) if t == INTERNVL_IMG_START]
        for s in starts:
            assert real[s + 1] == IMAGE_TOKEN


def test_retain_one_feeds_the_models_own_features():
    model = built("internvl")
    inputs = internvl_inputs(model, default_samples())
    seen, handle = _capture(model)
    try:
        with tz.get("random", retain=1.0)(model):
            model(**inputs)
    finally:
        handle.remove()
    with torch.no_grad():
        ref = model.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
    torch.testing.assert_close(seen[0]["mm_encoder_outputs"]["image"].pooler_output[0], ref.flatten(0, 1),
                               atol=0, rtol=0)


def test_items_layouts_and_group_signals():
    """One item per image with a crops/base layout; cls_attention per token is the [CLS] row's attention (eager
    recomputation) summed over the 2x2 patch group the pixel shuffle stacks into it."""
    model = built("internvl", "eager")
    inputs = internvl_inputs(model, default_samples())
    adapter = adapter_for(model)
    assert isinstance(adapter, InternVLAdapter)
    items = adapter.encode(inputs, frozenset({"cls_attention", "keys", "projected"}))
    tiles = [INTERNVL_TILES[(s.seed + j) % 3] for s in default_samples() for j in range(s.n_items)]
    per_tile = internvl_tile_tokens(model)
    assert [it.tokens.shape[0] for it in items] == [t * per_tile for t in tiles]
    assert [it.sample for it in items] == [0, 1, 1, 2]
    for it, t in zip(items, tiles):
        kinds = [s.kind for s in it.grid.segments]
        assert kinds == (["image"] if t == 1 else ["crops"] * (t - 1) + ["base"])
        assert it.grid.n == it.tokens.shape[0]
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"], output_attentions=True, return_dict=True)
    cls_row = out.attentions[-1][:, :, 0, 1:].mean(1)  # [tiles, P]
    side = model.config.vision_config.image_size[0] // model.config.vision_config.patch_size[0]
    half = side // 2
    expected = cls_row.view(-1, half, 2, half, 2).sum(dim=(2, 4)).flatten(1)  # 2x2 blocks, row-major
    got = torch.cat([it.signals["cls_attention"] for it in items]).view(-1, half * half)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    with TopAttention(retain=0.25)(model):  # every signal reaches a method, shapes checked there
        model(**inputs)


def test_tile_dropping_keeps_the_thumbnail():
    model = built("internvl")
    inputs = internvl_inputs(model, default_samples())
    per_tile = internvl_tile_tokens(model)
    seen, handle = _capture(model)
    c = tz.get("crops", retain=0.3)
    try:
        with c(model):
            model(**inputs)
    finally:
        handle.remove()
    kw = seen[0]
    tiles = [INTERNVL_TILES[(s.seed + j) % 3] for s in default_samples() for j in range(s.n_items)]
    # images of several tiles keep their thumbnail (the last tile); a one-tile image is not an input item
    assert kw["pixel_values"].shape[0] == len(tiles)
    ends = torch.tensor(tiles).cumsum(0) - 1
    torch.testing.assert_close(kw["pixel_values"], inputs["pixel_values"][ends], atol=0, rtol=0)
    stats = [(it.tokens_in, it.tokens_out) for s in c.last_stats for ms in s.values() for it in ms.items]
    assert stats == [(t * per_tile, per_tile) for t in tiles if t > 1]
    for b in range(inputs["input_ids"].shape[0]):
        assert _run_lengths(kw["input_ids"][b]) == [per_tile] * len(_run_lengths(inputs["input_ids"][b]))
    # the thumbnail tokens are the uncompressed call's own
    with torch.no_grad():
        full = model.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
        thumbs = model.model.get_image_features(kw["pixel_values"], return_dict=True).pooler_output
    torch.testing.assert_close(thumbs, full[ends], atol=1e-6, rtol=1e-5)
    # the call keeps pixels: a pre-LLM method can follow
    with tz.compose(tz.get("crops", retain=0.3), tz.get("visionzip", retain=0.5))(model):
        out = model(**inputs, position_ids=_positions(inputs["attention_mask"]))
    assert torch.isfinite(out.logits).all()


def test_video_clip_is_one_item_and_tokens_stay_in_their_frames():
    model = built("internvl")
    inputs = internvl_video_inputs(model, default_samples())
    adapter = adapter_for(model)
    items = adapter.encode(inputs, frozenset())
    assert [it.modality for it in items] == ["video"] * 4
    per_tile = internvl_tile_tokens(model)
    for it in items:
        (seg,) = it.grid.segments
        assert seg.kind == "frames" and seg.t * per_tile == it.tokens.shape[0]
    # without mm_token_type_ids every frame is a one-tile image
    plain = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    assert all(it.modality == "image" and it.tokens.shape[0] == per_tile for it in adapter.encode(plain, frozenset()))
    c = tz.get("random", retain=0.3)
    seen, handle = _capture(model)
    try:
        with c(model):
            model(**inputs)
    finally:
        handle.remove()
    ids = seen[0]["input_ids"]
    stats = [it for s in c.last_stats for ms in s.values() for it in ms.items]
    for b in range(ids.shape[0]):
        mine = [it for it, item in zip(stats, items) if item.sample == b]
        expected = []
        for it in mine:  # each frame's run holds the kept tokens whose source is in that frame
            frames = it.grid.segments[0].t
            expected += torch.bincount(it.index // per_tile, minlength=frames).tolist()
        assert [n for n in _run_lengths(ids[b])] == [n for n in expected if n > 0]
        # every frame keeps its markers, also one that keeps no token
        assert int((ids[b] == INTERNVL_IMG_START).sum()) == int((inputs["input_ids"][b] == INTERNVL_IMG_START).sum())


def test_partly_marked_block_and_mismatched_tiles_are_refused():
    model = built("internvl")
    inputs = internvl_inputs(model, default_samples())
    with tz.get("random", retain=0.5)(model):
        bad = dict(inputs, pixel_values=inputs["pixel_values"][:-1])
        with pytest.raises(ValueError, match="pixel_values has"):
            model(**bad)
        types = (inputs["input_ids"] == IMAGE_TOKEN).long()
        types[0, (inputs["input_ids"][0] == IMAGE_TOKEN).nonzero()[0, 0]] = 2
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            model(**inputs, mm_token_type_ids=types)


def test_encoder_stage_groups_and_cuts():
    """Inside the ViT the candidates are the 2x2 groups in the pixel shuffle's channel order: at the last layer's
    input (a cut before it) with every group kept, they give the model's own features; a bad cut names the range."""
    model = built("internvl")
    inputs = internvl_inputs(model, default_samples())
    adapter = adapter_for(model)
    adapter.set_encoder_layer(2, step=None)
    try:
        items = adapter.encode(inputs, frozenset())
        with torch.no_grad():
            hidden = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True,
                                              return_dict=True).hidden_states[2]
            side = model.config.vision_config.image_size[0] // model.config.vision_config.patch_size[0]
            shuffled = model.model.pixel_shuffle(hidden[:, 1:].reshape(hidden.shape[0], side, side, -1))
        torch.testing.assert_close(torch.cat([it.tokens for it in items]), shuffled.flatten(0, 2), atol=1e-5,
                                   rtol=1e-5)
    finally:
        adapter.release()
    with pytest.raises(ValueError, match="layer must be"):
        adapter.set_encoder_layer(3)


@pytest.mark.parametrize("case,method", [("internvl", "tome"), ("internvl_video", "random"),
                                         ("internvl_video", "tome")])
def test_encoder_schedule_keeps_the_budget_and_is_exact_at_retain_one(case, method):
    """A schedule of cuts (layers 1 and 2): retain=1 gives the stock logits; at retain 0.3 every item of a modality
    the method takes reaches its budget (ToMe takes no video: clips pass whole through every cut) and the LLM gets
    that many features."""
    model = built(case)
    inputs = {"internvl": internvl_inputs, "internvl_video": internvl_video_inputs}[case](model, default_samples())
    pos = _positions(inputs["attention_mask"])
    with torch.no_grad():
        ref = model(**inputs, position_ids=pos).logits
    with tz.InEncoder(tz.get(method, retain=1.0), layer=(1, 2))(model):
        with torch.no_grad():
            out = model(**inputs, position_ids=pos).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    inner = tz.get(method, retain=0.3)
    c = tz.InEncoder(inner, layer=(1, 2))
    seen, handle = _capture(model)
    try:
        with c(model):
            model(**inputs)
    finally:
        handle.remove()
    items = [it for s in c.last_stats for ms in s.values() for it in ms.items]
    assert [it.tokens_out for it in items] == [inner.budget.count(it.tokens_in) if it.modality in inner.info.modalities
                                               else it.tokens_in for it in items]
    assert seen[0]["mm_encoder_outputs"]["image"].pooler_output.shape[1] == sum(it.tokens_out for it in items)
