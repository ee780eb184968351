"""Stage "input": the achievable-count rule, the Qwen-VL resize (grids, patch layout, resampling), the LLaVA-OneVision
base view, the patch flow and tz.compose with an input stage. The invariants (retain=1 exact, documented count,
batch == singles, cached == uncached, restored, deterministic) run over the registry in tests/test_invariants.py."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

import tokenzip as tz
from tokenzip.adapters import adapter_for
from tokenzip.adapters.resample import (
    PatchSpec,
    admissible_grids,
    cell_map,
    grid_for,
    patchify,
    resample_patches,
    resize_frames,
    unpatchify,
)
from tokenzip.budget import nearest_achievable
from tokenzip.testing import CASES, default_samples

from conftest import built

INPUT_METHODS = [m for m in tz.METHODS if m.info.stage == "input"]


# ---- the achievable-count rule ---------------------------------------------------------------------------------------
def test_nearest_achievable_is_the_largest_count_at_or_under_the_budget():
    assert nearest_achievable(7, (1, 2, 4, 6, 9)) == 6
    assert nearest_achievable(9, (9, 1, 4)) == 9
    assert nearest_achievable(3, (17, 88)) == 17  # under the smallest: the smallest (the least the model takes)
    with pytest.raises(ValueError, match="achievable"):
        nearest_achievable(3, ())
    with pytest.raises(ValueError, match="achievable"):
        nearest_achievable(3, (0, 2))


@pytest.mark.parametrize("method", INPUT_METHODS, ids=lambda m: m.info.name)
def test_input_methods_take_the_budget_then_the_nearest_achievable(method):
    assert method(retain=0.5).target(12, (1, 2, 3, 4, 6, 9, 12)) == 6
    assert method(tokens=5).target(12, (1, 2, 3, 4, 6, 9, 12)) == 4
    assert method(retain=1.0).target(12, (1, 12)) == 12
    with pytest.raises(TypeError, match="stage 'input'"):
        method(retain=0.5).compress(torch.randn(1, 4, 3))


# ---- Qwen-VL grids ---------------------------------------------------------------------------------------------------
def test_square_grid_hits_exact_counts_where_a_factorisation_keeps_the_aspect():
    grids = admissible_grids(16, 16)
    assert grids[100] == (10, 10) and sorted(grids[110]) == [10, 11] and grids[256] == (16, 16)
    assert 101 not in grids and 99 not in grids  # 9x11 distorts a square by more than the rounding allows
    assert nearest_achievable(101, tuple(grids)) == 100
    assert set(admissible_grids(4, 4)) == {1, 2, 4, 6, 9, 12, 16}


@pytest.mark.parametrize("h,w", [(16, 16), (3, 4), (6, 9), (1, 7), (12, 5), (20, 13)])
def test_every_grid_keeps_the_aspect_within_one_unit_per_side(h, w):
    grids = admissible_grids(h, w)
    assert grids[h * w] == (h, w) and grids[1] == (1, 1)
    for count, (a, b) in grids.items():
        assert a * b == count and 1 <= a <= h and 1 <= b <= w
        # one scale s puts both sides within one unit of a and b
        assert max((a - 1) / h, (b - 1) / w) < min((a + 1) / h, (b + 1) / w)
    # every k is met exactly when some admissible grid has k tokens, else the nearest below
    for k in range(1, h * w + 1):
        got = nearest_achievable(k, tuple(grids))
        assert got <= k and all(not (got < c <= k) for c in grids)


def test_the_closest_aspect_wins_among_grids_of_one_count():
    # 12 tokens of a 4x6 grid: 2x6 is not admissible, 3x4 and 4x3 are; 3x4 keeps 2:3 best (|log(3/4) - log(4/6)|)
    assert grid_for(4, 6, 12) == (3, 4)
    with pytest.raises(ValueError, match="not achievable"):
        grid_for(4, 6, 23)


def test_cell_map_sends_every_token_to_the_cell_holding_its_centre():
    source, index = cell_map(4, 6, 2, 3)
    assert source.view(4, 6).tolist() == [[0, 0, 1, 1, 2, 2]] * 2 + [[3, 3, 4, 4, 5, 5]] * 2
    assert index.tolist() == [0, 2, 4, 12, 14, 16]
    s2, i2 = cell_map(2, 2, 1, 1, frames=2)
    assert s2.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and i2.tolist() == [0, 4]


# ---- Qwen-VL patches and resampling ----------------------------------------------------------------------------------
SPEC = PatchSpec(channels=3, temporal=2, patch=4, merge=2)


def test_patch_layout_is_the_processors():
    """un-patchifying the real processor's output gives its resized image back (per temporal copy)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=64,
                                    max_pixels=64 * 64)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 45, 3), dtype=np.uint8))
    out = proc([img], return_tensors="pt", do_normalize=False, do_rescale=False)
    t, h, w = out["image_grid_thw"][0].tolist()
    frames = unpatchify(out["pixel_values"], (t, h, w), SPEC)
    resized = torch.from_numpy(np.asarray(img.resize((w * 4, h * 4), Image.BICUBIC)).astype(np.float32))
    assert torch.equal(frames[0].permute(1, 2, 0), resized) and torch.equal(frames[1], frames[0])
    assert torch.equal(patchify(frames, t, SPEC), out["pixel_values"])


def test_resampling_at_the_same_size_reproduces_the_pixels():
    rows = torch.randn(6 * 8, SPEC.dim, generator=torch.Generator().manual_seed(0))
    assert torch.equal(patchify(unpatchify(rows, (1, 6, 8), SPEC), 1, SPEC), rows)
    assert torch.equal(resample_patches(rows, (1, 6, 8), (6, 8), SPEC), rows)
    frames = unpatchify(rows, (1, 6, 8), SPEC)
    assert torch.equal(resize_frames(frames, 24, 32), frames)


def test_resize_is_pils_bicubic():
    """The processor resizes with PIL's bicubic filter; torch's anti-aliased bicubic is the same filter."""
    img = np.random.default_rng(1).random((40, 56)).astype(np.float32)
    for h, w in [(20, 28), (28, 28), (12, 36)]:
        ref = np.asarray(Image.fromarray(img, mode="F").resize((w, h), Image.BICUBIC))
        out = resize_frames(torch.from_numpy(img)[None, None], h, w)[0, 0].numpy()
        np.testing.assert_allclose(out, ref, atol=1e-5)


def test_resampled_patches_are_the_resized_frames():
    rows = torch.randn(6 * 8, SPEC.dim, generator=torch.Generator().manual_seed(2))
    new = resample_patches(rows, (1, 6, 8), (4, 6), SPEC)
    assert new.shape == (4 * 6, SPEC.dim)
    expected = torch.nn.functional.interpolate(unpatchify(rows, (1, 6, 8), SPEC), size=(16, 24), mode="bicubic",
                                               antialias=True)
    torch.testing.assert_close(unpatchify(new, (1, 4, 6), SPEC), expected, atol=0, rtol=0)


# ---- through the model -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "glm4v"])
def test_qwen_call_is_rebuilt_for_the_new_grids(case):
    model = built(case)
    inputs = CASES[case].make_inputs(model, default_samples())
    adapter = adapter_for(model)
    plan = adapter.input_plan(inputs, "resolution")
    c = tz.get("resize", tokens=3)
    targets = [c.target(p.tokens, p.achievable) for p in plan]
    new, maps = adapter.rescale_inputs(inputs, "resolution", plan, targets)
    grids = new["image_grid_thw"].tolist()
    old = inputs["image_grid_thw"].tolist()
    for (t, h, w), (t0, h0, w0), k in zip(grids, old, targets):
        assert t == t0 and h * w // 4 == k and (h // 2, w // 2) == grid_for(h0 // 2, w0 // 2, k)
    assert new["pixel_values"].shape[0] == sum(t * h * w for t, h, w in grids)
    per_sample = [0] * len(default_samples())
    for p, k in zip(plan, targets):
        per_sample[p.sample] += k
    assert (new["input_ids"] == 100).sum(1).tolist() == per_sample
    assert torch.equal(new["mm_token_type_ids"].bool(), new["input_ids"] == 100)
    assert "position_ids" not in new
    assert [tuple(s.shape) + tuple(i.shape) for s, i in maps] == [(p.tokens, k) for p, k in zip(plan, targets)]
    # the patch adds nothing else: the stock model on the rebuilt call gives the patched logits
    with torch.no_grad():
        ref = model(**new).logits
        with c(model):
            out = model(**inputs).logits
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_onevision_base_view_keeps_the_base_view_features():
    case = "llava_onevision"
    model = built(case)
    inputs = CASES[case].make_inputs(model, default_samples())
    adapter = adapter_for(model)
    plan = adapter.input_plan(inputs, "crops")
    base = 4 * 4 + 1  # 56-px crops of 14-px patches, SigLIP without CLS, one newline marker
    assert [p.achievable for p in plan] == [tuple(sorted({base, p.tokens})) for p in plan]
    targets = [tz.get("crops", retain=0.5).target(p.tokens, p.achievable) for p in plan]
    assert targets == [base] * len(plan)
    new, maps = adapter.rescale_inputs(inputs, "crops", plan, targets)
    assert "pixel_values" not in new
    feats = new["mm_encoder_outputs"]["image"].pooler_output
    with torch.no_grad():
        orig = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                              batch_num_images=inputs["batch_num_images"],
                                              return_dict=True).pooler_output
    for f, o, p, (source, index) in zip(feats, orig, plan, maps):
        assert f.shape[0] == base
        torch.testing.assert_close(f[: base - 1], o[: base - 1], atol=1e-5, rtol=1e-5)  # the tower encodes each crop
        torch.testing.assert_close(f[-1], model.model.image_newline, atol=0, rtol=0)
        assert index.tolist()[: base - 1] == list(range(base - 1)) and int(source[index[-1]]) == base - 1


def test_untouched_when_every_item_keeps_its_count():
    model = built("qwen2_vl")
    inputs = CASES["qwen2_vl"].make_inputs(model, default_samples())
    c = tz.get("resize", retain=1.0)
    with c(model):
        call = dict(inputs)
        assert model._tokenzip_patch.prepare(call) is call
    assert all(torch.equal(it.source, torch.arange(it.tokens_in)) for s in c.last_stats for ms in s.values()
               for it in ms.items)


def test_input_stage_errors_name_the_reason():
    with pytest.raises(TypeError, match="fixed 336-px input"):
        tz.get("resize", retain=0.5)(built("llava"))
    with pytest.raises(TypeError, match=r"cannot reduce its inputs by 'crops'.*\['resolution', 'frames'\]"):
        tz.get("crops", retain=0.5)(built("qwen2_vl"))
    with pytest.raises(TypeError, match="cannot reduce its inputs"):
        tz.get("resize", retain=0.5)(built("whisper"))
    with pytest.raises(ValueError, match="precomputed features"):
        tz.compose(tz.get("crops", retain=0.5), tz.get("avgpool", retain=0.5))(built("llava_onevision"))


# ---- tz.compose with an input stage ----------------------------------------------------------------------------------
def test_compose_input_pre_llm_and_llm_each_keep_their_budget():
    case = "qwen2_vl"
    model = built(case)
    inputs = CASES[case].make_inputs(model, default_samples())
    c = tz.compose(tz.get("resize", retain=0.5), tz.get("avgpool", retain=0.5), tz.get("fastv", retain=0.5, layer=1))
    assert math.isclose(c.retain, 0.125) and c.info.stage == "llm" and c.info.name == "resize+avgpool+fastv"
    plan = adapter_for(model).input_plan(inputs, "resolution")
    with c(model):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    got = [(it.tokens_in, it.tokens_out) for s in c.last_stats for ms in s.values() for it in ms.items]
    layers = len(adapter_for(model).parts().decoder_layers)
    assert got == [(p.tokens, c.effective(p.tokens, layers, achievable=p.achievable)) for p in plan]
    # 12 tokens (3x4): resize keeps 6 (2x3), avgpool 3 of them, fastv 2 (round half up of 1.5)
    assert c.effective(12, layers, achievable=admissible_grids(3, 4)) == 2
    with pytest.raises(ValueError, match="achievable="):
        c.effective(12, layers)


@pytest.mark.parametrize("names,match", [
    (("avgpool", "resize"), "pipeline order"),
    (("fastv", "avgpool"), "pre-LLM"),
    (("resize", "resize"), "at most one method per stage"),
    (("resize",), "at least two"),
])
def test_compose_refuses_wrong_order_duplicates_and_singles(names, match):
    with pytest.raises(ValueError, match=match):
        tz.compose(*[tz.get(n, retain=0.5) for n in names])


def test_compose_refuses_encoder_and_pre_llm_together():
    with pytest.raises(ValueError, match="encoder-stage and a pre-LLM"):
        tz.compose(tz.InEncoder(tz.get("avgpool", retain=0.5), layer=1), tz.get("avgpool", retain=0.5))


def test_compose_input_then_encoder_stage_is_accepted():
    c = tz.compose(tz.get("resize", retain=0.5), tz.InEncoder(tz.get("avgpool", retain=0.5), layer=1))
    assert [p.info.stage for p in c.parts] == ["input", "encoder"]


def test_preview_reports_what_the_patched_call_does():
    from tokenzip.preview import kept_items

    model = built("qwen2_vl")
    inputs = CASES["qwen2_vl"].make_inputs(model, default_samples())
    c = tz.get("resize", tokens=3)
    with c(model):
        model(**inputs)
    live = [(it.tokens_in, it.tokens_out, it.source.tolist()) for s in c.last_stats for ms in s.values()
            for it in ms.items]
    previewed = kept_items(tz.get("resize", tokens=3), model, inputs)
    assert [(it.tokens_in, it.tokens_out, it.source.tolist()) for it in previewed] == live
