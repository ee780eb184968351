"""SmolVLM / Idefics3: one item per tile, markers kept, encoder signals over a tile's real patches only, the
Idefics3 class. The generic invariants run on the ``smolvlm`` case by registration."""

import pytest
import torch

from tokenzip.adapters import adapter_for
from tokenzip.methods.fastv import FastV
from tokenzip.methods.visionzip import VisionZip
from tokenzip.testing import IMAGE_TOKEN, default_samples, smolvlm_inputs, tiny_smolvlm

from conftest import built

CASE = "smolvlm"


def _positions(mask):
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, position_ids=_positions(inputs["attention_mask"])).logits


def test_each_tile_is_an_item_and_markers_stay():
    """Every tile (the global image included) keeps exactly its budget; the row/column markers, the
    <fake_token_around_image> / <global-img> tokens and the newlines are all still in the prompt, in order."""
    model = built(CASE)
    inputs = smolvlm_inputs(model, default_samples())
    seen = {}
    hook = model.model.register_forward_pre_hook(lambda m, a, kw: seen.update(ids=kw["input_ids"],
                                                                              mask=kw["attention_mask"]),
                                                 with_kwargs=True)
    k = 3
    c = VisionZip(tokens=k)
    try:
        with c(model):
            _logits(model, inputs)
    finally:
        hook.remove()
    tiles = [[it.tokens_in for ms in s.values() for it in ms.items] for s in c.last_stats]
    assert [len(t) for t in tiles] == [3, 4, 1]  # different tile counts per sample
    tokens = (model.config.vision_config.image_size // model.config.vision_config.patch_size // 2) ** 2
    assert all(n == tokens for t in tiles for n in t)
    for b in range(inputs["input_ids"].shape[0]):
        before = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
        after = seen["ids"][b][seen["mask"][b].bool()]
        assert torch.equal(before[before != IMAGE_TOKEN], after[after != IMAGE_TOKEN])
        runs = torch.diff(torch.cat([torch.tensor([0]), (after == IMAGE_TOKEN).long(), torch.tensor([0])]))
        lengths = ((runs == -1).nonzero().flatten() - (runs == 1).nonzero().flatten()).tolist()
        assert lengths == [k] * len(tiles[b])


def test_signals_cover_only_real_patches():
    """The attention each token receives (VisionZip's signal) is computed over each tile's real patches: equal to
    the eager tower's own attention weights (which mask padded patches out), averaged over each token's 2 x 2
    patches, with padded patches counting 0."""
    model = built(CASE, "eager")
    inputs = smolvlm_inputs(model, default_samples())
    adapter = adapter_for(model)
    items = adapter.encode(inputs, frozenset({"cls_attention"}))
    core = model.model
    captured = {}
    tower = core.vision_model
    hook = tower.register_forward_pre_hook(lambda m, a, kw: captured.update(p=kw["patch_attention_mask"]),
                                           with_kwargs=True)
    out = {}
    last = tower.encoder.layers[-1].self_attn
    h2 = last.register_forward_hook(lambda m, a, o: out.update(w=o[1]))
    try:
        with torch.no_grad():
            core.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"])
    finally:
        hook.remove()
        h2.remove()
    weights, valid = out["w"], captured["p"].flatten(1)  # [tiles, H, P2, P2], [tiles, P2]
    assert not bool(valid.all()), "the test inputs must hold a tile with padded patches"
    side = 4
    for i, item in enumerate(items):
        v = valid[i]
        received = torch.zeros(valid.shape[1])
        received[v] = weights[i][:, v][:, :, v].sum(dim=(0, 1)) / (weights.shape[1] * int(v.sum()))
        pooled = torch.nn.functional.avg_pool2d(received.view(1, 1, 2 * side, 2 * side), 2).flatten()
        torch.testing.assert_close(item.signals["cls_attention"], pooled, atol=1e-6, rtol=1e-5)


def test_idefics3_class():
    """Idefics3ForConditionalGeneration takes the same adapter: lossless at retain 1, and exact per-tile budgets
    before and inside the LLM."""
    model = tiny_smolvlm(idefics3=True)
    assert type(adapter_for(model)).__name__ == "SmolVLMAdapter"
    inputs = smolvlm_inputs(model, default_samples())
    ref = _logits(model, inputs)
    with VisionZip(retain=1.0)(model):
        torch.testing.assert_close(_logits(model, inputs), ref, atol=1e-5, rtol=1e-5)
    for c in (VisionZip(tokens=4), FastV(tokens=4, layer=1)):
        with c(model):
            out = _logits(model, inputs)
            gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape[0] == 3 and gen.shape[1] >= inputs["input_ids"].shape[1] + 1
        assert all(it.tokens_out == 4 for s in c.last_stats for ms in s.values() for it in ms.items)


def test_prompt_that_does_not_match_the_tiles_is_refused():
    model = built(CASE)
    inputs = smolvlm_inputs(model, default_samples())
    inputs["pixel_values"] = inputs["pixel_values"].clone()
    inputs["pixel_values"][0, 2] = 0  # sample 0's global image becomes a padding tile: 3 runs, 2 tiles
    with pytest.raises(ValueError, match="placeholder runs"):
        with VisionZip(retain=0.5)(model):
            _logits(model, inputs)
    with pytest.raises(ValueError, match="pixel_values must be"):
        with VisionZip(retain=0.5)(model):
            _logits(model, {**smolvlm_inputs(model, default_samples()),
                            "pixel_values": inputs["pixel_values"].flatten(0, 1)})


def test_crops_input_stage_keeps_global_tiles_and_markers():
    """Input stage ("crops"): an image under its tiled count keeps only its global tile; the other tiles are never
    encoded (the tower sees the global tiles only), their runs leave the prompt and their markers stay; the global
    tile's tokens equal the uncompressed call's. A pre-LLM method can follow (the call keeps pixels)."""
    import tokenzip as tz

    model = built(CASE)
    inputs = smolvlm_inputs(model, default_samples())
    adapter = adapter_for(model)
    plan = adapter.input_plan(inputs, "crops")
    assert [(p.sample, p.tokens) for p in plan] == [(0, 48), (1, 48), (1, 16), (2, 16)]
    tower_batches, lm_inputs = [], {}
    h1 = model.model.vision_model.register_forward_pre_hook(
        lambda m, a, kw: tower_batches.append(kw["pixel_values"].shape[0]), with_kwargs=True)
    h2 = model.model.register_forward_pre_hook(lambda m, a, kw: lm_inputs.update(ids=kw["input_ids"]),
                                               with_kwargs=True)
    c = tz.get("crops", retain=0.3)
    try:
        with c(model):
            _logits(model, inputs)
    finally:
        h1.remove()
        h2.remove()
    assert tower_batches == [4]  # one global tile per image
    ids = lm_inputs["ids"]
    for b in range(ids.shape[0]):
        before = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
        after = ids[b][ids[b] != 0]
        assert torch.equal(before[before != IMAGE_TOKEN], after[after != IMAGE_TOKEN])
    assert [[(it.tokens_in, it.tokens_out) for ms in s.values() for it in ms.items] for s in c.last_stats] == \
        [[(48, 16)], [(48, 16), (16, 16)], [(16, 16)]]
    new, maps = adapter.rescale_inputs(inputs, "crops", plan, [16] * len(plan))
    with torch.no_grad():
        full = adapter.encode(inputs, frozenset())
        small = adapter.encode(new, frozenset())
    assert len(small) == 4
    for got, ref in zip([it.tokens for it in small], [full[i].tokens for i in (2, 5, 6, 7)]):  # the global tiles
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert [m[1].tolist() for m in maps] == [list(range(32, 48)), list(range(32, 48)), list(range(16)),
                                             list(range(16))]
    pipeline = tz.compose(tz.get("crops", retain=0.5), VisionZip(tokens=4))
    with pipeline(model):
        _logits(model, inputs)
    assert all(it.tokens_out == 4 for s in pipeline.last_stats for ms in s.values() for it in ms.items)
