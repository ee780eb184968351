"""GLM-4.1V (tokenzip/adapters/glm4v.py): positions of kept image and video tokens (videos sit on the image
placeholder), the mixed-call refusal, and the GLM-4.6V class on the same adapter."""

import pytest
import torch

import tokenzip as tz
from tokenzip.adapters import Glm4vAdapter, adapter_for
from tokenzip.testing import CASES, default_samples, tiny_glm4v

from conftest import built
from mrope_checks import (
    assert_encoder_cut_equals_stock_blocks,
    assert_encoder_schedule_lossless_and_at_budget,
    assert_kept_positions,
)

torch.set_num_threads(1)


@pytest.mark.parametrize("case,method", [("glm4v", lambda: tz.ClsTopK(retain=0.4)),
                                         ("glm4v", lambda: tz.ToMe(retain=0.4)),
                                         ("glm4v_video", lambda: tz.DyCoke(retain=0.4))])
def test_kept_tokens_keep_their_uncompressed_positions_and_decoding_continues(case, method):
    assert_kept_positions(case, method())


def test_images_and_videos_in_one_call_are_refused():
    """GLM-4.1V's clips reuse the image placeholder and the model refuses both in one call: so does the adapter,
    before anything runs, with a ValueError that says what to do."""
    model = built("glm4v")
    img = CASES["glm4v"].make_inputs(model, default_samples()[:1])
    vid = CASES["glm4v_video"].make_inputs(model, default_samples()[:1])
    both = {**img, "pixel_values_videos": vid["pixel_values_videos"], "video_grid_thw": vid["video_grid_thw"]}
    with tz.ClsTopK(retain=0.5)(model), pytest.raises(ValueError, match="separate calls"):
        model(**both)


def test_glm46v_class_uses_the_adapter():
    """GLM-4.6V builds the same vision tower and an auto text model: the same adapter, the same exact identity."""
    from transformers import Glm46VConfig, Glm46VForConditionalGeneration

    tiny = built("glm4v").config
    cfg = Glm46VConfig(text_config=tiny.text_config.to_dict(), vision_config=tiny.vision_config.to_dict(),
                       image_token_id=tiny.image_token_id, video_token_id=tiny.video_token_id,
                       image_start_token_id=tiny.image_start_token_id, image_end_token_id=tiny.image_end_token_id)
    torch.manual_seed(0)
    model = Glm46VForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    assert isinstance(adapter_for(model), Glm4vAdapter)
    inputs = CASES["glm4v"].make_inputs(model, default_samples())
    with torch.no_grad():
        ref = model(**inputs).logits
        with tz.ClsTopK(retain=1.0)(model):
            same = model(**inputs).logits
        with tz.ClsTopK(retain=0.4)(model):
            short = model(**inputs).logits
    assert torch.equal(ref, same)
    assert short.shape[1] < ref.shape[1] and not torch.allclose(ref[:, -1], short[:, -1])


# ---- stage "encoder" (tokenzip/adapters/merge_unit_vit.py) ---------------------------------------------------------
def deep_vit():
    """The case's class with a 3-block ViT: cuts after blocks 1 and 2, each with a block after it."""
    return tiny_glm4v(vision_depth=3)


@pytest.mark.parametrize("cut", [1, 2])
@pytest.mark.parametrize("case", ["glm4v", "glm4v_video"])
def test_encoder_cut_equals_the_stock_blocks_on_the_kept_units(case, cut):
    """Every other merge unit of each image / clip kept after block ``cut - 1``: the tokens are the model's own ViT
    forward cut to those units by hooks (later blocks, one segment per temporal grid of the units left, then its
    tail (post-norm, 2x2 downsample convolution, merger))."""
    assert_encoder_cut_equals_stock_blocks(deep_vit(), case, "video" if case.endswith("video") else "image", cut)


@pytest.mark.parametrize("case,name", [("glm4v", "tome"), ("glm4v_video", "dycoke")])
def test_encoder_schedule_is_lossless_at_retain_one_and_reaches_the_budget(case, name):
    assert_encoder_schedule_lossless_and_at_budget(deep_vit(), case, name)


def test_encoder_stage_is_declared_and_bad_cuts_are_refused():
    assert CASES["glm4v"].stages == ("pre_llm", "encoder", "llm")
    model = built("glm4v")  # 2 vision blocks: one cut, after block 1
    with pytest.raises(ValueError, match=r"in \[1, 1\]"):
        tz.InEncoder(tz.ToMe(retain=0.5), layer=3)(model)
    with pytest.raises(TypeError, match="projected"):
        tz.InEncoder(tz.get("trim", retain=0.5), layer=1)(model)
