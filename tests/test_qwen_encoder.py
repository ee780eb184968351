"""Qwen2-VL / Qwen2.5-VL stage "encoder" (``tz.InEncoder``): compression between vision blocks, one merge unit (a 2x2
group of patches, one LLM token) per method token. The features are checked against the stock vision blocks run on
the kept patches with bookkeeping derived here independently (window geometry, segments), the window bookkeeping
against the model's own functions, and the LLM positions against the full sequence's ``get_rope_index``."""

import math
import sys

import pytest
import torch
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

import tokenzip as tz
from tokenzip.adapters.qwen2_vl import Qwen2VLAdapter
from tokenzip.testing import IMAGE_TOKEN, default_samples, qwen_vl_inputs, qwen_vl_positions

from conftest import built

QWEN = ["qwen2_vl", "qwen2_5_vl"]


def _compress(model, inputs, method, layer):
    """The adapter's steps as the patch runs them: items at the cut, the method (a registered encoder-stage method
    as it is, with its own cut), the rebuilt call."""
    adapter = Qwen2VLAdapter(model)
    c = method if isinstance(method, tz.InEncoder) else tz.InEncoder(method, layer=layer)
    adapter.set_encoder_layer(c.layer, step=c.step)
    needs = c.signals_needed()
    items = adapter.encode(inputs, needs)
    outs = [c.compress(it.tokens.unsqueeze(0), grid=it.grid, k=it.extra.get("k"),
                       **{name: s.unsqueeze(0) for name, s in it.signals.items() if name in needs}) for it in items]
    return items, outs, adapter.rebuild(inputs, items, outs)


def _stock_after(model, pixel_values, grid, cut):
    """``[P/4, 4, D]`` patch states after ``cut`` blocks of the stock ViT (its own forward), raster unit order."""
    visual = model.model.visual
    seen = []
    handle = visual.blocks[cut - 1].register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            visual(pixel_values, grid_thw=grid)
    finally:
        handle.remove()
    units = seen[0].view(-1, 4, seen[0].shape[-1])
    if hasattr(visual, "fullatt_block_indexes"):  # the model's window order -> raster
        order, _ = get_vision_window_index(grid, 2, visual.window_size, visual.patch_size)
        units = units[torch.argsort(order)]
    return units


def _windows(model, units, w2):
    """Window id of each unit (raster index in an image of ``w2`` units per row), from the window geometry:
    ``window_size / patch_size / 2`` units per window side, windows row-major."""
    visual = model.model.visual
    side = visual.window_size // visual.patch_size // 2
    per_row = math.ceil(w2 / side)
    return torch.tensor([(u // w2 // side) * per_row + (u % w2) // side for u in units.tolist()])


def _stock_rest(model, patches, units, grid, cut):
    """The stock blocks ``cut`` ... last and the merger on one image's kept ``patches`` ``[k, 4, D]`` standing at
    ``units`` (raster, ascending), with rotary rows, segments and window order derived here."""
    visual = model.model.visual
    _, h, w = grid[0].tolist()
    pos = get_vision_position_ids(grid, 2).view(-1, 4, 2)[units].flatten(0, 1)
    cos, sin = visual.rotary_pos_emb(patches, pos)
    k = units.shape[0]
    cu_full = torch.tensor([0, 4 * k], dtype=torch.int32)
    full, cu_window = set(range(len(visual.blocks))), None
    order = torch.arange(k)
    if hasattr(visual, "fullatt_block_indexes"):
        win = _windows(model, units, w // 2)
        order = torch.sort(win, stable=True).indices  # windows in order, raster inside each
        _, counts = torch.unique_consecutive(win[order], return_counts=True)
        cu_window = torch.cat([torch.zeros(1, dtype=torch.int32), (4 * counts).cumsum(0).int()])
        full = set(visual.fullatt_block_indexes)
    x = patches[order].flatten(0, 1)
    pe = (cos.view(k, 4, -1)[order].flatten(0, 1), sin.view(k, 4, -1)[order].flatten(0, 1))
    with torch.no_grad():
        for i in range(cut, len(visual.blocks)):
            x = visual.blocks[i](x, cu_seqlens=cu_full if i in full else cu_window, position_embeddings=pe)
        return visual.merger(x)[torch.argsort(order)]


@pytest.mark.parametrize("case", QWEN)
@pytest.mark.parametrize("method", ["random", "tome"])
def test_features_equal_stock_blocks_on_the_kept_patches(case, method):
    model = built(case)
    inputs = qwen_vl_inputs(model, default_samples())
    items, outs, call = _compress(model, inputs, tz.get(method, retain=0.4), 1)
    feats = call["mm_encoder_outputs"]["image"].pooler_output
    grid = inputs["image_grid_thw"]
    starts = torch.cat([torch.zeros(1, dtype=torch.long), grid.prod(-1).cumsum(0)])
    assert len(feats) == len(items) == grid.shape[0]
    merged = 0
    for i, (item, out) in enumerate(zip(items, outs)):
        g = grid[i: i + 1]
        after = _stock_after(model, inputs["pixel_values"][starts[i]: starts[i + 1]], g, 1)
        torch.testing.assert_close(item.tokens, after.mean(1), atol=1e-5, rtol=1e-5)  # the method's tokens
        groups = out.groups()
        merged += sum(len(m) > 1 for m in groups)
        patches = torch.stack([after[m].mean(0) for m in groups])  # a kept unit keeps its four patches
        ref = _stock_rest(model, patches, out.index[0], g, 1)
        assert feats[i].shape == (out.tokens.shape[1], model.config.text_config.hidden_size)
        torch.testing.assert_close(feats[i], ref, atol=1e-5, rtol=1e-5)
    assert (merged > 0) == (method == "tome")


@pytest.mark.parametrize("case", QWEN)
def test_cut_zero_runs_every_block_on_the_kept_patches_at_their_rotary_positions(case):
    """Cut 0 (where PixelPrune cuts): at retain=1 the tower's output is the uncut tower's; at a budget every block
    runs on the kept units' patch embeddings only, each with the rotary rows the uncut tower gives its four patches (the
    rows block 0 receives, and the features, equal the stock blocks run with rows derived here)."""
    model = built(case)
    inputs = qwen_vl_inputs(model, default_samples())
    visual, grid, pixels = model.model.visual, inputs["image_grid_thw"], inputs["pixel_values"]
    with torch.no_grad():
        uncut = visual(pixels, grid_thw=grid).pooler_output
    _, _, call = _compress(model, inputs, tz.get("random", retain=1.0), 0)
    torch.testing.assert_close(torch.cat(call["mm_encoder_outputs"]["image"].pooler_output), uncut, atol=1e-5,
                               rtol=1e-5)

    seen = []
    handle = visual.blocks[0].register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["position_embeddings"][0].view(-1, 4, kw["position_embeddings"][0].shape[-1])),
        with_kwargs=True)
    try:
        items, outs, call = _compress(model, inputs, tz.get("random", tokens=3), 0)
    finally:
        handle.remove()
    feats = call["mm_encoder_outputs"]["image"].pooler_output
    cos_uncut, _ = visual.rotary_pos_emb(pixels, get_vision_position_ids(grid, 2))
    cos_uncut = cos_uncut.view(-1, 4, cos_uncut.shape[-1])  # raster unit order, all images
    kept = torch.cat([it.extra["units"].units[out.index[0]] for it, out in zip(items, outs)])  # global units
    assert len(seen) == 1 and seen[0].shape[0] == kept.shape[0] == 3 * len(items)
    rows = sorted(map(tuple, seen[0].flatten(1).tolist()))  # block order: the model's window order on Qwen2.5-VL
    assert rows == sorted(map(tuple, cos_uncut[kept].flatten(1).tolist()))
    if not hasattr(visual, "fullatt_block_indexes"):  # Qwen2-VL keeps raster order in the blocks
        torch.testing.assert_close(seen[0], cos_uncut[kept])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), grid.prod(-1).cumsum(0)])
    for i, out in enumerate(outs):
        with torch.no_grad():
            embedded = visual.patch_embed(pixels[starts[i]: starts[i + 1]])
        embedded = embedded.view(-1, 4, embedded.shape[-1])
        units = out.index[0]
        ref = _stock_rest(model, embedded[units], units, grid[i: i + 1], 0)
        torch.testing.assert_close(feats[i], ref, atol=1e-5, rtol=1e-5)


def test_unit_pixels_tile_the_image_the_processor_patchified():
    """``unit_pixels`` puts each unit's four patches back into one pixel block: the blocks of the ``(h/2, w/2)`` grid,
    tiled row-major, give back the image the model's own processor patchified (every temporal frame a copy)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model = built("qwen2_vl")
    embed = model.model.visual.patch_embed
    c, t, p = embed.in_channels, embed.temporal_patch_size, embed.patch_size
    gh, gw = 4, 6
    image = torch.randn(c, gh * p, gw * p, generator=torch.Generator().manual_seed(3))
    flat, _, _ = Qwen2VLImageProcessorPil().patchify(image.numpy(), p, 2, t)
    blocks = Qwen2VLAdapter(model)._unit_pixels(torch.from_numpy(flat.copy()))
    assert blocks.shape == (gh * gw // 4, c * t, 2 * p, 2 * p)
    tiled = blocks.view(gh // 2, gw // 2, c, t, 2 * p, 2 * p).permute(2, 3, 0, 4, 1, 5).reshape(c, t, gh * p, gw * p)
    for frame in range(t):
        torch.testing.assert_close(tiled[:, frame], image)


@pytest.mark.parametrize("case", QWEN)
def test_later_blocks_see_four_patches_per_kept_token(case):
    model = built(case)
    inputs = qwen_vl_inputs(model, default_samples())
    seen = []
    visual = model.model.visual
    handles = [blk.register_forward_pre_hook(lambda m, a, kw, i=i: seen.append((i, a[0].shape[0], kw["cu_seqlens"])),
                                             with_kwargs=True) for i, blk in enumerate(visual.blocks)]
    c = tz.InEncoder(tz.get("random", tokens=3), layer=1)
    try:
        with c(model), torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    kept = sum(it.tokens_out for s in c.last_stats for ms in s.values() for it in ms.items)
    total = int(inputs["image_grid_thw"].prod(-1).sum())
    assert [i for i, _, _ in seen] == list(range(len(visual.blocks)))
    assert seen[0][1] == total
    for _, n, cu in seen[1:]:
        assert n == 4 * kept == int(cu[-1])
        assert bool(((cu[1:] - cu[:-1]) % 4 == 0).all())


def test_window_bookkeeping_matches_the_model_and_the_window_geometry():
    model = built("qwen2_5_vl")
    visual = model.model.visual
    # the tiny config has a full-attention and a windowed block after cut 1
    assert 1 in visual.fullatt_block_indexes and 2 not in visual.fullatt_block_indexes
    inputs = qwen_vl_inputs(model, default_samples())
    grid = inputs["image_grid_thw"]
    adapter = Qwen2VLAdapter(model)
    hidden = visual.patch_embed(inputs["pixel_values"])
    plan = adapter._unit_plan(grid, hidden)
    every = torch.arange(hidden.shape[0] // 4)
    packed = adapter._pack(plan, every)
    order, cu_window = get_vision_window_index(grid, 2, visual.window_size, visual.patch_size)
    assert torch.equal(packed.order, order)  # all units: exactly the model's window order and segments
    assert torch.equal(packed.cu_window, cu_window)
    assert torch.equal(packed.cu_full, get_vision_cu_seqlens(grid))
    # a subset: windows keep their order, each segment holds one window's kept units, raster inside
    g = torch.Generator().manual_seed(0)
    kept = torch.sort(every[torch.randperm(every.shape[0], generator=g)[: every.shape[0] // 3]]).values
    packed = adapter._pack(plan, kept)
    in_blocks = kept[packed.order]
    sizes = (grid.prod(-1) // 4).tolist()
    offsets = [0] + torch.tensor(sizes).cumsum(0).tolist()
    image = torch.bucketize(in_blocks, torch.tensor(offsets[1:]), right=True)
    keys = []
    for u, i in zip(in_blocks.tolist(), image.tolist()):
        local = torch.tensor([u - offsets[i]])
        keys.append((i, int(_windows(model, local, int(grid[i, 2]) // 2)), u))
    assert keys == sorted(keys)
    segments = (packed.cu_window[1:] - packed.cu_window[:-1]) // 4
    _, counts = torch.unique_consecutive(torch.tensor([k[:2] for k in keys]), dim=0, return_counts=True)
    assert segments.tolist() == counts.tolist()
    per_image = [n for n in torch.bincount(image).tolist() if n]  # an image left without units has no segment
    assert ((packed.cu_full[1:] - packed.cu_full[:-1]) // 4).tolist() == per_image


def _eager_attention(model, inputs, block):
    """Block ``block``'s real attention probabilities (eager kernel), per attention segment."""
    attn = model.model.visual.blocks[block].attn
    mod = sys.modules[type(attn).__module__]
    orig = mod.eager_attention_forward
    seen = []

    def record(module, *args, **kwargs):
        out, weights = orig(module, *args, **kwargs)
        if module is attn:
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
def test_signals_at_the_cut_are_the_cut_blocks_attention(case):
    model = built(case, "eager")
    inputs = qwen_vl_inputs(model, default_samples())
    adapter = Qwen2VLAdapter(model)
    adapter.set_encoder_layer(1)
    items = adapter.encode(inputs, frozenset({"cls_attention", "keys", "text"}))
    grid = inputs["image_grid_thw"]
    received = torch.cat([w.sum(dim=(0, 1)) for w in _eager_attention(model, inputs, 0)]).view(-1, 4).mean(1)
    visual = model.model.visual
    if hasattr(visual, "fullatt_block_indexes"):
        assert 0 not in visual.fullatt_block_indexes  # block 0 is windowed in the tiny case
        order, _ = get_vision_window_index(grid, 2, visual.window_size, visual.patch_size)
        received = received[torch.argsort(order)]
    heads = visual.blocks[0].attn.num_heads
    for item, part, n, (t, h, w) in zip(items, received.split((grid.prod(-1) // 4).tolist()),
                                        grid.prod(-1).tolist(), grid.tolist()):
        torch.testing.assert_close(item.signals["cls_attention"], part / (heads * n), atol=1e-6, rtol=1e-4)
        assert item.signals["keys"].shape == (item.tokens.shape[0], visual.blocks[0].attn.head_dim)
        assert "text" in item.signals and "projected" not in item.signals
        assert list(item.grid) == [(h // 2, w // 2)] * t


@pytest.mark.parametrize("case", QWEN)
@pytest.mark.parametrize("schedule", [False, True])
def test_llm_positions_are_the_full_sequences(case, schedule):
    """Each output token carries the M-RoPE position the full sequence gives its representative placeholder: the
    first original unit of its group (through every cut of a schedule)."""
    model = built(case)
    layer = tuple(range(1, len(model.model.visual.blocks))) if schedule else 1
    for sample in default_samples():
        inputs = qwen_vl_inputs(model, [sample])
        full = qwen_vl_positions(model, inputs)
        items, outs, call = _compress(model, inputs, tz.get("tome", retain=0.4), layer)
        ids = inputs["input_ids"][0]
        placeholders = (ids == IMAGE_TOKEN).nonzero().flatten()
        keep = ids != IMAGE_TOKEN
        start = 0
        for it, out in zip(items, outs):
            source = it.extra["units"].state.source[0]  # original unit -> unit at the last cut
            final = torch.where(source >= 0, out.source[0][source.clamp(min=0)], -1)
            first = [int((final == j).nonzero()[0]) for j in range(out.tokens.shape[1])]
            keep[placeholders[start + torch.tensor(first)]] = True
            start += it.tokens_in
        assert torch.equal(call["position_ids"][1:], full[1:, :, keep.nonzero().flatten()])
        assert call["input_ids"].shape[1] == int(keep.sum())


@pytest.mark.parametrize("case", QWEN)
def test_schedule_is_lossless_at_retain_one_and_meets_the_budget(case):
    model = built(case)
    depth = len(model.model.visual.blocks)
    layer = tuple(range(1, depth))
    inputs = qwen_vl_inputs(model, default_samples())
    pos = qwen_vl_positions(model, inputs)
    with torch.no_grad():
        ref = model(**inputs, position_ids=pos).logits
    with tz.InEncoder(tz.get("tome", retain=1.0), layer=layer)(model), torch.no_grad():
        same = model(**inputs, position_ids=pos).logits
    torch.testing.assert_close(same, ref, atol=1e-5, rtol=1e-5)
    c = tz.InEncoder(tz.get("tome", retain=0.3), layer=layer)
    with c(model), torch.no_grad():
        model(**inputs, position_ids=pos)
    for s in c.last_stats:
        for it in s["image"].items:
            assert it.tokens_out == c.budget.count(it.tokens_in)


@pytest.mark.parametrize("case", QWEN)
def test_bad_cuts_raise_naming_the_range(case):
    model = built(case)
    depth = len(model.model.visual.blocks)
    for layer in (depth, (1, depth)):  # cut 0 (before the first block) is one of the valid cuts here
        with pytest.raises(ValueError, match=rf"\[0, {depth - 1}\]"):
            tz.InEncoder(tz.get("random", retain=0.5), layer=layer)(model)
    for layer in (0, (0, 1)):  # no block has attended yet at cut 0: no attention signals there
        with pytest.raises(TypeError, match=r"requires signals \['cls_attention'\].*cannot produce at encoder cut"):
            tz.InEncoder(tz.get("cls_topk", retain=0.5), layer=layer)(model)
    # optional ones are simply absent there: ToMe merges on the patch embeddings at cut 0, on keys at cut 1
    with tz.InEncoder(tz.get("tome", retain=0.5), layer=(0, 1))(model), torch.no_grad():
        model(**qwen_vl_inputs(model, default_samples()))
    with pytest.raises(TypeError, match="projected"):
        needs_projected = next(m for m in tz.METHODS if m.info.stage == "pre_llm" and "projected" in
                               m(retain=0.5).requires)
        tz.InEncoder(needs_projected(retain=0.5), layer=1)(model)


@pytest.mark.parametrize("method", ["tome", "prumerge_plus"])
def test_merged_units_average_members_per_sub_position_around_the_methods_token(method):
    """A kept unit keeps its four patches bit for bit; a merged group's patches are its members' patches averaged
    sub-position by sub-position, shifted so that their mean is the method's token (PruMerge+ weights its
    members by attention, so there the shift is not zero)."""
    model = built("qwen2_5_vl")
    inputs = qwen_vl_inputs(model, default_samples())
    items, outs, _ = _compress(model, inputs, tz.get(method, retain=0.4), 1)
    shifted = 0.0
    for it, out in zip(items, outs):
        before = it.extra["units"].patches
        after = it.extra["units"].after(out).patches
        torch.testing.assert_close(after.mean(1), out.tokens[0], atol=1e-6, rtol=1e-5)
        for j, members in enumerate(out.groups()):
            if len(members) == 1:
                assert torch.equal(after[j], before[members[0]])
                continue
            plain = before[members].mean(0)
            shift = out.tokens[0, j] - plain.mean(0)
            torch.testing.assert_close(after[j], plain + shift, atol=1e-6, rtol=1e-5)
            shifted = max(shifted, shift.abs().max().item())
    assert (shifted > 1e-4) == (method == "prumerge_plus")
