"""Long videos chunk by chunk (tokenzip/long_video.py) on the tiny LLaVA-OneVision video model: the streaming decoder
against read_video, the chunker, equivalence with the untouched model (retain=1, any chunk size) and with the patched
model on the whole clip (chunk >= clip, any retain), exact kept counts, generate(), a file source, bad input."""

import numpy as np
import pytest
import test_video_io as io
import torch

import tokenzip as tz
from tokenzip.long_video import frame_chunks, iter_frames, long_video_inputs, write_video
from tokenzip.testing import ONEVISION_VIDEO_TOKEN, tiny_llava
from tokenzip.video import (
    onevision_video_inputs,
    onevision_video_processor,
    onevision_video_tokens,
    read_video,
    synthetic_clip,
)

from conftest import built

CASE = "llava_onevision_video"
PROMPT = "describe <video> hello world"
G2 = 16  # tokens per frame on the tiny model: 98 px, 7 x 7 patches pooled to 4 x 4


@pytest.fixture(scope="module")
def model():
    return built(CASE)


@pytest.fixture(scope="module")
def clip():
    return synthetic_clip(10, 48, 64, seed=3).frames


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _stock_inputs(model, frames):
    return onevision_video_inputs(model, io._tokenizer(), [PROMPT], [frames], onevision_video_processor(98))


def _run(method, model, frames, chunk):
    return long_video_inputs(method, model, io._tokenizer(), PROMPT, frames, chunk_frames=chunk)


# ---- decoding and chunking ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("pick", [{"num_frames": 7}, {"fps": 3.0}, {"fps": 100.0}])
def test_iter_frames_equals_read_video(pick):
    path = io._clip("carphone_pristine")
    ref = read_video(path, **pick)
    got = list(iter_frames(path, **pick))
    assert [i for _, _, i in got] == ref.indices.tolist()
    np.testing.assert_array_equal(np.stack([f for f, _, _ in got]), ref.frames)
    np.testing.assert_allclose([t for _, t, _ in got], ref.timestamps)


def test_iter_frames_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="exactly one of num_frames"):
        next(iter_frames(tmp_path / "x.mp4"))
    with pytest.raises(ValueError, match="num_frames must be an integer >= 1"):
        next(iter_frames(tmp_path / "x.mp4", num_frames=0))
    with pytest.raises(FileNotFoundError, match="video not found"):
        next(iter_frames(tmp_path / "x.mp4", fps=1.0))


def test_frame_chunks_sizes_and_last_flag(clip):
    got = list(frame_chunks(iter(clip), 4))
    assert [(c.shape[0], last) for c, last in got] == [(4, False), (4, False), (2, True)]
    np.testing.assert_array_equal(np.concatenate([c for c, _ in got]), clip)
    assert [(c.shape[0], last) for c, last in frame_chunks(clip, 10)] == [(10, True)]
    with pytest.raises(ValueError, match="chunk_frames must be an integer >= 1"):
        next(frame_chunks(clip, 0))
    with pytest.raises(ValueError, match="no frames"):
        next(frame_chunks([], 4))
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        next(frame_chunks([np.zeros((4, 4), np.uint8)], 4))


# ---- equivalence -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [10, 16, 4, 1])
@pytest.mark.parametrize("name", ["dycoke", "fastvid"])
def test_retain_one_equals_untouched_model_for_any_chunk(model, clip, name, chunk):
    """Frames are encoded independently by the model's video path, and the newline closes the clip once: with
    every token kept, any chunk size hands the LLM exactly the stock model's features."""
    ref = _logits(model, _stock_inputs(model, clip))
    inputs = _run(tz.get(name, retain=1.0), model, clip, chunk)
    assert inputs["input_ids"].shape == (1, onevision_video_tokens(model.config, 10) + 3)
    torch.testing.assert_close(_logits(model, inputs), ref, atol=0, rtol=0)


@pytest.mark.parametrize("budget", [{"retain": 0.3}, {"tokens": 7}])
@pytest.mark.parametrize("name", ["dycoke", "fastvid", "holitom"])
def test_one_chunk_equals_the_patched_model(model, clip, name, budget):
    """chunk_frames >= the clip: the method sees the clip as the patched model's adapter hands it over, so the LLM
    gets the same tokens."""
    stock = _stock_inputs(model, clip)
    method = tz.get(name, **budget)
    with method(model):
        ref = _logits(model, stock)
    ref_stats = method.last_stats[0]["video"]
    inputs = _run(method, model, clip, 12)
    got = method.last_stats[0]["video"]
    assert (got.tokens_in, got.tokens_out) == (ref_stats.tokens_in, ref_stats.tokens_out)
    assert torch.equal(got.items[0].index, ref_stats.items[0].index)
    torch.testing.assert_close(_logits(model, inputs), ref, atol=0, rtol=0)


@pytest.mark.parametrize("budget", [{"retain": 0.3}, {"retain": 0.05}, {"tokens": 5}])
def test_kept_counts_are_exact(model, clip, budget):
    """10 frames in chunks of 4: 4 + 4 frames without the newline, then 2 frames + the clip's newline; each chunk
    keeps its budget, the placeholder run has the kept count, the model and generate() take it."""
    method = tz.get("dycoke", **budget)
    inputs = _run(method, model, clip, 4)
    b = method.budget
    want = [b.count(4 * G2), b.count(4 * G2), b.count(2 * G2 + 1)]
    items = method.last_stats[0]["video"].items
    assert [(s.tokens_in, s.tokens_out) for s in items] == list(zip([4 * G2, 4 * G2, 2 * G2 + 1], want))
    assert [s.grid.num_frames for s in items] == [4, 4, 2]
    assert [s.grid.segments[-1].kind for s in items] == ["frames", "frames", "newline"]
    total = sum(want)
    assert int((inputs["input_ids"] == ONEVISION_VIDEO_TOKEN).sum()) == total
    feats = inputs["mm_encoder_outputs"]["video"]
    assert feats.pooler_output.shape == (1, total, model.config.text_config.hidden_size)
    assert feats.clip_tokens == (total,)
    assert _logits(model, inputs).shape[1] == total + 3
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)


def test_survivors_are_the_chunks_own_compressions(model, clip):
    """The features reaching the LLM are each chunk compressed alone, in time order: chunk 2 of a 4-frame split is
    the method on frames 4..7 (without the newline) of the model's own video features."""
    method = tz.get("evs", retain=0.3)
    inputs = _run(method, model, clip, 4)
    px = onevision_video_processor(98)
    with torch.no_grad():
        from tokenzip.video import onevision_video_pixels

        f = model.model.get_video_features(onevision_video_pixels([clip[4:8]], px), return_dict=True).pooler_output
    from tokenzip import layout as L

    ref = method.compress(f[:, :-1], grid=L.Layout([L.Segment("frames", 4, 4, 4)]))
    k0, k1 = [s.tokens_out for s in method.last_stats[0]["video"].items[:2]]
    got = inputs["mm_encoder_outputs"]["video"].pooler_output[0, k0: k0 + k1]
    torch.testing.assert_close(got, ref.tokens[0], atol=1e-6, rtol=1e-6)


def test_file_source_equals_decoded_frames(model, tmp_path, clip):
    path = tmp_path / "clip.mp4"
    assert write_video(path, iter(clip), fps=5.0) == 10
    method = tz.get("dycoke", retain=0.3)
    from_file = long_video_inputs(method, model, io._tokenizer(), PROMPT, path, num_frames=6, chunk_frames=4)
    frames = read_video(path, num_frames=6).frames
    from_array = _run(method, model, frames, 4)
    assert torch.equal(from_file["input_ids"], from_array["input_ids"])
    assert torch.equal(from_file["mm_encoder_outputs"]["video"].pooler_output,
                       from_array["mm_encoder_outputs"]["video"].pooler_output)
    gen = long_video_inputs(method, model, io._tokenizer(), PROMPT, (f for f in frames), chunk_frames=4)
    assert torch.equal(gen["mm_encoder_outputs"]["video"].pooler_output,
                       from_array["mm_encoder_outputs"]["video"].pooler_output)


def test_model_and_method_untouched(model, clip):
    stock = _stock_inputs(model, clip)
    ref = _logits(model, stock)
    method = tz.get("fastvid", retain=0.3)
    _run(method, model, clip, 4)
    assert getattr(model, "_tokenzip_patch", None) is None and "forward" not in model.__dict__
    torch.testing.assert_close(_logits(model, stock), ref, atol=0, rtol=0)
    assert method.budget == tz.Budget(retain=0.3)


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_bad_input_is_refused_with_the_reason(model, clip, tmp_path):
    tok = io._tokenizer()
    with pytest.raises(TypeError, match="pre-LLM video method"):
        long_video_inputs(tz.get("fastv", retain=0.5), model, tok, PROMPT, clip)
    with pytest.raises(TypeError, match="pre-LLM video method"):
        long_video_inputs(tz.get("tome", retain=0.5), model, tok, PROMPT, clip)
    with pytest.raises(TypeError, match="configured tokenzip method"):
        long_video_inputs("dycoke", model, tok, PROMPT, clip)
    with pytest.raises(TypeError, match="LlavaOnevisionForConditionalGeneration"):
        long_video_inputs(tz.get("dycoke", retain=0.5), tiny_llava(), tok, PROMPT, clip)
    with pytest.raises(ValueError, match="exactly one <video>"):
        long_video_inputs(tz.get("dycoke", retain=0.5), model, tok, "describe hello", clip)
    with pytest.raises(ValueError, match="exactly one <video>"):
        long_video_inputs(tz.get("dycoke", retain=0.5), model, tok, "<video> <video>", clip)
    with pytest.raises(ValueError, match="are all used"):
        long_video_inputs(tz.get("dycoke", retain=0.5), model, tok, PROMPT, clip, num_frames=4)
    with pytest.raises(ValueError, match="chunk_frames must be"):
        long_video_inputs(tz.get("dycoke", retain=0.5), model, tok, PROMPT, clip, chunk_frames=0)
    with pytest.raises(TypeError, match="file path"):
        long_video_inputs(tz.get("dycoke", retain=0.5), model, tok, PROMPT, 3)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        long_video_inputs(tz.get("dycoke", retain=0.5), model, tok, PROMPT, clip[0])
    with pytest.raises(ValueError, match="even H and W"):
        write_video(tmp_path / "odd.mp4", [np.zeros((5, 6, 3), np.uint8)])


def test_an_llm_stage_method_runs_on_the_result(model, clip):
    """The survivors are one clip of precomputed features (ClipFeatures with its kept count): a video LLM-stage
    method prunes them inside the LLM as it prunes any clip."""
    inputs = _run(tz.get("dycoke", retain=0.5), model, clip, 4)
    total = int(inputs["mm_encoder_outputs"]["video"].pooler_output.shape[1])
    llm = tz.get("fastv", retain=0.5)
    with llm(model):
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    (item,) = llm.last_stats[0]["video"].items
    assert (item.tokens_in, item.tokens_out) == (total, llm.budget.count(total))
    assert tz.long_video.long_video_inputs is long_video_inputs
