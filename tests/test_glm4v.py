"""GLM-4.1V (tokenzip/adapters/glm4v.py): positions of kept image and video tokens (videos sit on the image
placeholder), the mixed-call refusal, the GLM-4.6V class on the same adapter, stage "encoder", and stage "input"
``frames`` (each grid's timestamp after its block, as Glm4vProcessor writes it)."""

import re
from types import SimpleNamespace

import pytest
import torch

import tokenzip as tz
from tokenzip.adapters import Glm4vAdapter, adapter_for
from tokenzip.testing import (
    CASES,
    GLM_FIRST_FRAME,
    GLM_FPS,
    GLM_IMAGE_END,
    GLM_IMAGE_START,
    GLM_VIDEO_END,
    GLM_VIDEO_START,
    IMAGE_TOKEN,
    default_samples,
    glm4v_video_inputs,
    tiny_glm4v,
)
from tokenzip.video import synthetic_clip

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


# ---- stage "input": "frames" (whole temporal grids; each grid's timestamp follows its block) ------------------------
KEEPS = [[1, 2], [1], [0], [0, 1]]  # per clip of default_samples(): the first grids, the last grid, none dropped


def glm_processor():
    """The installed ``Glm4vProcessor``'s prompt code (``replace_video_token`` / ``create_mm_token_type_ids``) on a
    bare instance: it needs only the placeholder strings, the merge size and the marker ids (no tokenizer)."""
    from transformers.models.glm4v.processing_glm4v import Glm4vProcessor

    proc = object.__new__(Glm4vProcessor)
    proc.image_token, proc.image_token_id = "<|image|>", IMAGE_TOKEN
    proc.video_start_id, proc.video_end_id = GLM_VIDEO_START, GLM_VIDEO_END
    proc.video_processor = SimpleNamespace(merge_size=2)
    return proc


def tiny_tokens(text: str) -> list[int]:
    """``text`` in the tiny vocabulary: GLM's markers and placeholder, one id per digit (40-49)."""
    special = {"<|begin_of_video|>": GLM_VIDEO_START, "<|end_of_video|>": GLM_VIDEO_END,
               "<|begin_of_image|>": GLM_IMAGE_START, "<|end_of_image|>": GLM_IMAGE_END, "<|image|>": IMAGE_TOKEN}
    pieces = re.findall(r"<\|[a-z_]+\|>|\d", text)
    assert "".join(pieces) == text
    return [special[p] if p in special else 40 + int(p) for p in pieces]


@pytest.mark.parametrize("grids", [None, KEEPS], ids=["whole", "kept"])
def test_video_inputs_are_the_processors_prompt_for_those_frames(grids):
    """The test batch (whole clips, and clips of some frames only) is what Glm4vProcessor writes for those frames
    (``replace_video_token`` inside the chat template's ``<|begin_of_video|><|video|><|end_of_video|>``, timestamps
    from the kept frames' own video metadata), with its ``mm_token_type_ids``."""
    from transformers.video_utils import VideoMetadata

    model = built("glm4v_video")
    inputs = glm4v_video_inputs(model, default_samples(), grids=grids)
    proc = glm_processor()
    tp = model.config.vision_config.temporal_patch_size
    grid = inputs["video_grid_thw"]
    clip = 0
    for b, row in enumerate(inputs["input_ids"]):
        real = row[inputs["attention_mask"][b].bool()].tolist()
        expected_types = proc.create_mm_token_type_ids([real])[0]
        assert inputs["mm_token_type_ids"][b][inputs["attention_mask"][b].bool()].tolist() == expected_types
        starts = [i for i, x in enumerate(real) if x == GLM_VIDEO_START]
        ends = [i for i, x in enumerate(real) if x == GLM_VIDEO_END]
        for s, e in zip(starts, ends):
            t = int(grid[clip, 0])
            kept = list(range(t)) if grids is None else grids[clip]
            frames = [GLM_FIRST_FRAME + g * tp + f for g in kept for f in range(tp)]
            meta = VideoMetadata(total_num_frames=64, fps=GLM_FPS, frames_indices=frames)
            text = proc.replace_video_token({"video_grid_thw": grid, "video_metadata": {clip: meta}}, clip)
            assert real[s: e + 1] == tiny_tokens(f"<|begin_of_video|>{text}<|end_of_video|>")
            clip += 1
    assert clip == grid.shape[0]


def test_plan_unnormalises_the_models_pixels():
    """The frames a selector sees are the clip's (the first frame of each temporal grid), un-normalised with
    Glm4vVideoProcessor's mean/std."""
    model = built("glm4v_video")
    inputs = glm4v_video_inputs(model, default_samples())
    plan = adapter_for(model).input_plan(inputs, "frames")
    assert [p.extra["thw"] for p in plan] == [tuple(g) for g in inputs["video_grid_thw"].tolist()]
    clip = synthetic_clip(6, 16, 16, seed=10)  # sample seed 1, clip 0: GLM_CLIPS[1] = (3, 4, 4) patches of 4 px
    first = torch.from_numpy(clip.frames[::2]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(plan[0].extra["frames"], first, atol=1e-5, rtol=0)
    assert plan[0].achievable == (4, 8, 12)


def test_kept_temporal_grids_are_the_clip_the_processor_gives_for_them():
    """Dropping grids (first ones, the last one) leaves exactly the prompt and pixels of a clip of the kept frames:
    each dropped block goes with the timestamp after it (the last grid's up to ``<|end_of_video|>``), and the kept
    grids' tokens are the full clip's."""
    model = built("glm4v_video")
    samples = default_samples()
    inputs = glm4v_video_inputs(model, samples)
    adapter = adapter_for(model)
    plan = adapter.input_plan(inputs, "frames")
    for p, keep in zip(plan, KEEPS):
        p.keep = torch.tensor(keep)
    targets = [len(keep) * p.tokens // p.extra["thw"][0] for p, keep in zip(plan, KEEPS)]
    new, maps = adapter.rescale_inputs(inputs, "frames", plan, targets)
    oracle = glm4v_video_inputs(model, samples, grids=KEEPS)
    assert set(new) == set(oracle)
    for key, value in oracle.items():
        assert torch.equal(new[key], value), key
    # the markers and the timestamp of each dropped grid: "8" (one digit), "10" (two)
    assert [p.text_removed for p in plan] == [3, 3, 4, 0]
    with torch.no_grad():
        full = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
        short = model.model.get_video_features(new["pixel_values_videos"], new["video_grid_thw"]).pooler_output
    for f, s, (_, index) in zip(full, short, maps):
        torch.testing.assert_close(s, f[index], atol=1e-5, rtol=1e-5)


def kept_grids(stats) -> list[list[int]]:
    keeps = []
    for it in stats["video"].items:
        per_grid = it.tokens_in // it.grid.segments[0].t
        keeps.append(sorted(set((it.index // per_grid).tolist())))
    return keeps


def test_frame_selection_through_the_patch_equals_the_stock_model_on_the_kept_frames():
    model = built("glm4v_video")
    samples = default_samples()
    inputs = glm4v_video_inputs(model, samples)
    c = tz.get("uniform_frames", tokens=8)
    with c(model), torch.no_grad():
        out = model(**inputs).logits
    keeps = [k for stats in c.last_stats for k in kept_grids(stats)]
    assert keeps == [[0, 2], [0], [0], [0]]
    assert [it.text_removed for stats in c.last_stats for it in stats["video"].items] == [4, 4, 4, 4]
    with torch.no_grad():
        ref = model(**glm4v_video_inputs(model, samples, grids=keeps)).logits
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_frames_then_an_llm_stage_method_counts_both():
    """Frames, then FastV inside the LLM: the stats carry the removed markers and timestamps, and the LLM's first
    layer reads the prompt less the dropped grids' blocks; the call decodes on from the kept frames' prompt."""
    model = built("glm4v_video")
    inputs = glm4v_video_inputs(model, default_samples())
    c = tz.compose(tz.get("uniform_frames", tokens=8), tz.FastV(retain=0.5, layer=1))
    seen = []
    lm = model.model.language_model
    h = lm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["attention_mask"].clone()), with_kwargs=True)
    try:
        with c(model), torch.no_grad():
            model(**inputs)
            generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        h.remove()
    for b, stats in enumerate(c.parts[0].last_stats):
        items = stats["video"].items
        removed = sum(it.tokens_in - it.tokens_out + it.text_removed for it in items)
        assert all(it.text_removed > 0 for it in items)
        assert removed > 0 and int(seen[0][b].sum()) == int(inputs["attention_mask"][b].sum()) - removed
    assert torch.equal(generated[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_frames_refuses_a_prompt_without_the_processors_layout_and_mixed_calls():
    model = built("glm4v_video")
    inputs = glm4v_video_inputs(model, default_samples()[:1])
    broken = dict(inputs, input_ids=inputs["input_ids"].masked_fill(inputs["input_ids"] == GLM_VIDEO_END, 23))
    with tz.get("uniform_frames", tokens=4)(model), pytest.raises(ValueError, match="end_of_video"):
        model(**broken)
    img = CASES["glm4v"].make_inputs(model, default_samples()[:1])
    both = {**img, "pixel_values_videos": inputs["pixel_values_videos"], "video_grid_thw": inputs["video_grid_thw"]}
    with tz.get("uniform_frames", tokens=4)(model), pytest.raises(ValueError, match="separate calls"):
        model(**both)
