"""LLaVA-OneVision encoder stage (tz.InEncoder inside the SigLIP tower): the candidates (the crop tokens the model's
packing keeps, in its packed order), per-crop rows with the padding + proportional-attention mask, the features
against the stock tower layers run on the kept tokens, images kept whole, a down-scaled image, schedules, bad cuts.
The references use the stock tower's own hidden states and layers, matched by value, not the adapter's mapping."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import tokenzip as tz
from tokenzip import layout as L
from tokenzip import ops
from tokenzip.adapters import adapter_for
from tokenzip.base import Compressor, MethodInfo
from tokenzip.encoder import schedule_counts
from tokenzip.testing import default_samples, llava_onevision_inputs, tiny_llava_onevision

from conftest import built

CASE = "llava_onevision"
SEEN: list[tuple[torch.Tensor, L.Layout, int, torch.Tensor]] = []  # what Recorder saw: tokens, layout, k, kept


@dataclass
class Recorder(Compressor):
    """Test-only selection: keeps the ``k`` tokens with the highest ``cls_attention`` and records its inputs."""

    info: ClassVar[MethodInfo] = MethodInfo(name="test-recorder", family="attention", modalities=("image",),
                                            stage="pre_llm", query_aware=False, reference="test")
    requires: ClassVar[tuple[str, ...]] = ("cls_attention",)

    def _compress(self, tokens, k, layout, signals):
        index = ops.stable_topk(signals["cls_attention"], k)
        SEEN.append((tokens[0].clone(), layout, k, index[0].clone()))
        return ops.select(tokens, index)


@pytest.fixture(scope="module")
def squeezed():
    """``anyres_max_1``: pack_image_features bilinearly down-scales the crop grid of the tiled images."""
    return tiny_llava_onevision("sdpa", vision_aspect_ratio="anyres_max_1")


def _inputs(model, tiled_only=False):
    return llava_onevision_inputs(model, default_samples(), batch_num_images=not tiled_only)


def _stock(model, inputs):
    """The stock tower's hidden states ``[crops, P, D]`` per layer, each image's crop rows, and the stock packed
    LLM features per image."""
    core = model.model
    crops, _, _ = adapter_for(model).plan(inputs["pixel_values"], inputs["image_sizes"],
                                          inputs.get("batch_num_images"), "full")
    pixels = torch.cat([pv[:n] for pv, n in zip(inputs["pixel_values"], crops)])
    with torch.no_grad():
        hs = core.vision_tower(pixels, output_hidden_states=True).hidden_states
        feats = core.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                        batch_num_images=inputs.get("batch_num_images"),
                                        return_dict=True).pooler_output
    starts = torch.tensor([0] + crops).cumsum(0).tolist()
    return hs, [list(range(a, b)) for a, b in zip(starts[:-1], starts[1:])], list(feats)


def _candidates(model, inputs):
    """Per image, the (crop row, patch) of each crop token the model's packing keeps, in packed order: the model's
    own ``pack_image_features`` on an index tensor, with nothing down-scaled (the ground truth the adapter must
    follow; its packed order is checked against the stock features below)."""
    crops, _, _ = adapter_for(model).plan(inputs["pixel_values"], inputs["image_sizes"],
                                          inputs.get("batch_num_images"), "full")
    per_crop = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    ids = torch.arange(1, sum(crops) * per_crop + 1).view(sum(crops), per_crop, 1)
    packed, _ = model.model.pack_image_features(list(torch.split(ids, crops)), inputs["image_sizes"],
                                                image_newline=torch.zeros(1, dtype=torch.long),
                                                vision_aspect_ratio="anyres_max_100000")
    return [[divmod(int(v) - 1, per_crop) for v in t[:, 0] if v > 0] for t in packed]


def _llm_features(model, inputs, compressor):
    """The per-image features the compressed call hands the language model (``mm_encoder_outputs``)."""
    seen = {}

    def grab(m, args, kwargs):
        seen["feats"] = [f.clone() for f in kwargs["mm_encoder_outputs"]["image"].pooler_output]

    h = model.model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with compressor(model), torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    return seen["feats"]


def _kept_crop_tokens_through_stock_layers(model, hs, rows, where, cut):
    """Reference features: each crop's kept tokens (``where``: (crop row, patch) in LLM order) through the stock
    tower layers ``cut ..`` the last, alone in their crop's row, then the projector; in ``where``'s order."""
    core = model.model
    layers = adapter_for(model).parts().encoder_layers
    out = torch.empty(len(where), core.config.text_config.hidden_size)
    with torch.no_grad():
        for r in rows:
            pos = [j for j, (row, _) in enumerate(where) if row == r]
            if not pos:
                continue
            h = hs[cut][r, [where[j][1] for j in pos]][None]
            for layer in layers[cut:]:
                h = layer(h, None)
            out[pos] = core.multi_modal_projector(h)[0]
    return out


def _items(compressor):
    return [it for s in compressor.last_stats for it in s["image"].items]


@pytest.mark.parametrize("tiled_only", [False, True])
def test_candidates_are_the_unpadded_crop_tokens_in_packed_order(tiled_only):
    model = built(CASE)
    inputs = _inputs(model, tiled_only)
    SEEN.clear()
    c = tz.InEncoder(Recorder(retain=0.3), layer=1)
    with c(model), torch.no_grad():
        model(**inputs)
    hs, rows, stock = _stock(model, inputs)
    newline = model.model.image_newline
    assert len(SEEN) == len(rows)
    for (tokens, layout, _, _), crop_rows, packed, where in zip(SEEN, rows, stock, _candidates(model, inputs)):
        assert torch.equal(tokens, torch.stack([hs[1][r, p] for r, p in where]))
        is_marker = (packed == newline.to(packed)).all(-1)
        with torch.no_grad():  # the stock packed features, markers aside, are the candidates' in the same order
            mine = model.model.multi_modal_projector(torch.stack([hs[-1][r, p] for r, p in where]))
        torch.testing.assert_close(mine, packed[~is_marker], atol=1e-6, rtol=1e-6)
        side = 4  # 56-px crops of 14-px patches
        if len(crop_rows) == 1:
            assert layout == L.Layout([L.Segment("base", 1, side, side)])
        else:
            grid = layout.segments[1]
            assert layout.segments[0] == L.Segment("base", 1, side, side) and grid.kind == "crops"
            assert not grid.newline and grid.h == int(is_marker.sum()) and grid.h * grid.w == tokens.shape[0] - 16


@pytest.mark.parametrize("tiled_only", [False, True])
def test_features_equal_the_stock_layers_on_each_crops_kept_tokens(tiled_only):
    model = built(CASE)
    inputs = _inputs(model, tiled_only)
    SEEN.clear()
    c = tz.InEncoder(Recorder(retain=0.3), layer=1)
    feats = _llm_features(model, inputs, c)
    hs, rows, _ = _stock(model, inputs)
    for (_, _, _, kept), crop_rows, got, it, cand in zip(SEEN, rows, feats, _items(c), _candidates(model, inputs)):
        assert torch.equal(it.index, kept.sort().values)  # the LLM order: ascending candidate (packed) order
        where = [cand[int(i)] for i in it.index]
        ref = _kept_crop_tokens_through_stock_layers(model, hs, crop_rows, where, cut=1)
        assert got.shape[0] == c.budget.count(it.tokens_in) == it.tokens_out
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_one_row_per_crop_with_padding_mask_and_proportional_attention():
    model = built(CASE)
    inputs = _inputs(model)
    layer = adapter_for(model).parts().encoder_layers[1]
    grabbed = {}

    def grab(m, args, kwargs):
        grabbed["hidden"] = args[0]
        grabbed["mask"] = args[1] if len(args) > 1 else kwargs.get("attention_mask")

    h = layer.register_forward_pre_hook(grab, with_kwargs=True)
    c = tz.InEncoder(tz.get("tome", retain=0.3), layer=1)
    try:
        with c(model), torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    candidates = _candidates(model, inputs)
    expected_rows, real = 0, 0
    for it, where in zip(_items(c), candidates):  # one row per crop holding a first source of an output token
        expected_rows += len({where[int(i)][0] for i in it.index})
        real += it.tokens_out
    hidden, mask = grabbed["hidden"], grabbed["mask"]
    assert mask is not None and mask.dtype == hidden.dtype and mask.shape == (hidden.shape[0], 1, 1, hidden.shape[1])
    assert hidden.shape[0] == expected_rows
    pad = mask == torch.finfo(mask.dtype).min
    assert int((~pad).sum()) == real and bool(pad.any())  # rows of different lengths, padded at the end
    sizes = mask[~pad].exp()
    assert bool((sizes > 1.5).any())  # merged tokens: log(size) > 0
    # ToMe only merges: the sizes add up to every candidate of every image
    assert round(float(sizes.sum())) == sum(len(where) for where in candidates)


def test_down_scaled_image_candidates_come_before_the_interpolation(squeezed):
    plain = built(CASE)  # the same weights (same seed), no down-scaling
    results = []
    for model in (plain, squeezed):
        SEEN.clear()
        c = tz.InEncoder(Recorder(retain=0.3), layer=1)
        inputs = _inputs(model, tiled_only=True)
        feats = _llm_features(model, inputs, c)
        results.append((list(SEEN), feats, _items(c), inputs))
    (seen_plain, _, items_plain, _), (seen_sq, feats_sq, items_sq, inputs_sq) = results
    budget = Recorder(retain=0.3).budget
    assert any(a.tokens_in > b.tokens_in for a, b in zip(items_plain, items_sq))  # squeezed: fewer LLM tokens
    for a, b in zip(seen_plain, seen_sq):  # the same candidates: the unpadded crop tokens before down-scaling
        assert torch.equal(a[0], b[0])
    hs, rows, stock = _stock(squeezed, inputs_sq)
    for crop_rows, got, it, packed, cand in zip(rows, feats_sq, items_sq, stock, _candidates(squeezed, inputs_sq)):
        assert got.shape[0] == budget.count(it.tokens_in) == it.tokens_out and it.tokens_in == packed.shape[0]
        where = [cand[int(i)] for i in it.index]
        ref = _kept_crop_tokens_through_stock_layers(squeezed, hs, crop_rows, where, cut=1)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["plain", "squeezed"])
@pytest.mark.parametrize("layer", [1, 2, (1, 2)])
def test_retain_one_gives_identical_logits(which, layer, squeezed):
    model = built(CASE) if which == "plain" else squeezed
    for tiled_only in (False, True):
        inputs = _inputs(model, tiled_only)
        with torch.no_grad():
            ref = model(**inputs).logits
        with tz.InEncoder(tz.get("tome", retain=1.0), layer=layer)(model), torch.no_grad():
            out = model(**inputs).logits
        assert torch.equal(out, ref)


def test_image_kept_whole_gets_the_stock_features_and_markers_fill_the_budget():
    model = built(CASE)
    inputs = _inputs(model)
    _, _, stock = _stock(model, inputs)
    newline = model.model.image_newline
    c = tz.InEncoder(tz.get("tome", retain=0.95), layer=1)  # k covers every candidate, not every marker
    feats = _llm_features(model, inputs, c)
    filled = 0
    for got, packed, it in zip(feats, stock, _items(c)):
        k = c.budget.count(packed.shape[0])
        assert it.tokens_in == packed.shape[0] and it.tokens_out == got.shape[0] == k
        is_marker = (packed == newline.to(packed)).all(-1)
        assert k >= int((~is_marker).sum())  # every candidate fits: the image stays whole
        filled += int(k > int((~is_marker).sum()) and k < packed.shape[0])  # markers fill part of the budget
        keep = ~is_marker | (is_marker.cumsum(0) <= k - int((~is_marker).sum()))
        assert torch.equal(got, packed[keep])  # every image whole: the stock computation
    assert filled > 0


def test_mixed_call_whole_and_compressed_images():
    model = built(CASE)
    inputs = _inputs(model)  # untiled images have 17 tokens, tiled ones more
    _, _, stock = _stock(model, inputs)
    c = tz.InEncoder(tz.get("cls_topk", tokens=17), layer=1)
    feats = _llm_features(model, inputs, c)
    whole = [(got, packed) for got, packed in zip(feats, stock) if packed.shape[0] == 17]
    assert whole and len(whole) < len(feats)
    for got, packed in whole:  # next to padded rows: the same features up to the masked kernel's rounding
        torch.testing.assert_close(got, packed, atol=1e-5, rtol=1e-5)
    assert all(f.shape[0] == 17 for f in feats)


def test_schedule_shrinks_at_each_cut_and_conserves_sizes():
    model = built(CASE)
    inputs = _inputs(model)
    layers = adapter_for(model).parts().encoder_layers
    grabbed = {}

    def grab(i):
        def hook(m, args, kwargs):
            grabbed[i] = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        return hook

    SEEN.clear()
    with tz.InEncoder(Recorder(retain=0.3), layer=1)(model), torch.no_grad():
        model(**inputs)
    candidates = [tokens.shape[0] for tokens, *_ in SEEN]
    hooks = [layers[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in (1, 2)]
    c = tz.InEncoder(tz.get("tome", retain=0.3), layer=(1, 2))
    try:
        with c(model), torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    items = _items(c)
    counts = [schedule_counts(n, c.budget.count(it.tokens_in), 2) for n, it in zip(candidates, items)]
    for j, layer in enumerate((1, 2)):
        mask = grabbed[layer]
        real = mask != torch.finfo(mask.dtype).min
        assert int(real.sum()) == sum(cs[j] for cs in counts)
        assert round(float(mask[real].exp().sum())) == sum(candidates)  # ToMe's sizes carry over the cuts
    assert [it.tokens_out for it in items] == [c.budget.count(it.tokens_in) for it in items]


def test_schedule_selection_equals_stock_layers_on_the_kept_tokens():
    model = built(CASE)
    inputs = _inputs(model)
    SEEN.clear()
    c = tz.InEncoder(Recorder(retain=0.3), layer=(1, 2))
    feats = _llm_features(model, inputs, c)
    n_images = len(feats)
    first, last = SEEN[:n_images], SEEN[n_images:]
    assert all(layout == L.grid(1, tokens.shape[0]) for tokens, layout, _, _ in last)  # no grid after a cut
    hs, rows, _ = _stock(model, inputs)
    layers = adapter_for(model).parts().encoder_layers
    for (_, _, _, kept1), crop_rows, got, it, cand in zip(first, rows, feats, _items(c), _candidates(model, inputs)):
        where = [cand[int(i)] for i in kept1.sort().values]
        kept2 = it.index  # over the tokens after the first cut
        ref = torch.empty_like(got)
        with torch.no_grad():
            for r in crop_rows:
                mine = [j for j, (row, _) in enumerate(where) if row == r]
                if not mine:
                    continue
                h = layers[1](hs[1][r, [where[j][1] for j in mine]][None], None)  # layer 1 on the crop's first kept
                last_kept = [mine.index(int(j)) for j in kept2 if int(j) in mine]
                if not last_kept:
                    continue
                h = layers[2](h[:, last_kept], None)
                slots = [kept2.tolist().index(mine[p]) for p in last_kept]
                ref[slots] = model.model.multi_modal_projector(h)[0]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_schedule_batch_equals_singles():
    model = built(CASE)
    samples = default_samples()
    c = tz.InEncoder(tz.get("tome", retain=0.4), layer=(1, 2))
    with c(model), torch.no_grad():
        batch = model(**llava_onevision_inputs(model, samples)).logits
        for i, s in enumerate(samples):
            one = model(**llava_onevision_inputs(model, [s])).logits[0]
            torch.testing.assert_close(batch[i, -one.shape[0]:], one, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layer,err", [(3, r"\[1, 2\]"), ((1, 3), r"\[1, 2\]"), ((2, 1), "increasing"),
                                       (0, "cut 0, before the first layer, is not supported")])
def test_bad_cuts_are_clear_errors(layer, err):
    with pytest.raises(ValueError, match=err):
        tz.InEncoder(tz.get("tome", retain=0.5), layer=layer)(built(CASE))


def test_unsupported_feature_settings_are_clear_errors():
    model = tiny_llava_onevision("sdpa", vision_feature_select_strategy="default")
    with pytest.raises(ValueError, match="'full' select strategy"):
        tz.InEncoder(tz.get("tome", retain=0.5), layer=1)(model)
    with pytest.raises(TypeError, match="projected"):
        tz.InEncoder(tz.get("trim", retain=0.5), layer=1)(built(CASE))
