"""Long videos in bounded memory: compress a clip chunk by chunk, keep only what survives, feed the survivors to the
LLM as precomputed features.

    from tokenzip.long_video import long_video_inputs
    method = tz.get("dycoke", retain=0.25)
    inputs = long_video_inputs(method, model, tokenizer, "<video>\\nWhat happens?", "clip.mp4", fps=1.0,
                               chunk_frames=16)
    out = model.generate(**inputs, max_new_tokens=32)
    method.last_stats[0]["video"].items   # one ItemStats per chunk

The loop, for each chunk of ``chunk_frames`` frames: decode it (PyAV, streaming: :func:`iter_frames` never holds
more than the chunk being collected), preprocess it (:func:`tokenzip.video.onevision_video_pixels`), encode it with
the model's own video path (the adapter's ``encode``: ``get_video_features`` + the signals the method asks for),
compress it with the pre-LLM method at the method's budget, and keep only the compressed tokens. The survivors of all
chunks, concatenated in time order, reach the stock model through its precomputed-features path
(``mm_encoder_outputs["video"]``, a :class:`~tokenzip.adapters.onevision_video.ClipFeatures` row) with the prompt's
``<video>`` placeholder run sized to the kept count, so ``forward`` and ``generate`` take the result as it is.

Budget. The method's budget applies to each chunk as to an item: chunk ``c`` of ``n_c`` tokens keeps
``budget.count(n_c)`` (``retain=r``: about ``r`` of every chunk; ``tokens=k``: ``k`` per chunk). LLaVA-OneVision
closes a clip with ONE ``image_newline`` token; it belongs to the last chunk only (earlier chunks are compressed
without their newline), so the LLM sees what the stock model would lay out: frames in order, one newline at the end.
Consequences: the kept count is exactly ``sum over chunks c < last of count(T_c g^2) + count(T_last g^2 + 1)``; with
``chunk_frames`` >= the clip's frame count it is the method on the whole clip, the same tokens a patched
``model(**inputs)`` keeps; with ``retain=1`` every chunk size gives the stock model's features (the video path
encodes frames independently: SigLIP per frame, projector per token, pooling per frame).

Temporal methods at chunk borders. A method sees one chunk at a time, as if it were a whole clip: the first frame of
every chunk has no predecessor (DyCoke, EVS and the like keep it as they keep a clip's first frame), segments (FastVID,
HoliTom) end at chunk borders, merged groups never span two chunks, and a per-frame budget split is made per chunk.
So a static scene pays one "first frame" per chunk; larger chunks approach the whole-clip result. Methods know nothing
of chunking.

Memory. While compressing, the process holds the model, ONE chunk's pixels and encoder activations (plus the next
chunk's raw decoded frames: the lookahead that tells the last chunk), and the survivors so far: ``K x D`` values for
``K`` kept tokens. So the peak is ``model + f(chunk_frames) + K x D x bytes``: the per-chunk part does not grow with
the clip; the survivors are what the LLM is fed anyway (its prefill holds ``K`` tokens' activations and KV cache).
Nothing of size ``T x N_frame`` (all frames' pixels or tokens) is ever held; the final concatenation briefly holds
the survivors twice. ``python -m tokenzip.long_video`` measures the peak (resident set size of a fresh process) on a
cut-depth LLaVA-OneVision-0.5B preset.

LLaVA-OneVision only (``LlavaOnevisionForConditionalGeneration``); one clip and one prompt per call.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapters import adapter_for
from .adapters.onevision_video import ClipFeatures, OnevisionVideo
from .base import SIGNALS, Compressor
from .deps import require
from .layout import Layout
from .output import ItemStats, summarize
from .video import VIDEO_TOKEN, iter_frames, onevision_video_pixels, onevision_video_processor


def write_video(path: str | Path, frames: Iterable[np.ndarray], *, fps: float = 25.0, codec: str = "libx264") -> int:
    """Write ``uint8 [H, W, 3]`` frames (any iterable: a generator keeps memory bounded) to a video file with PyAV
    (``yuv420p``, so ``H`` and ``W`` must be even). Returns the number of frames written. For tests and the memory
    measurement: a clip of any length without a download."""
    av = require("av")
    count = 0
    with av.open(str(path), "w") as container:
        stream = None
        for f in frames:
            f = np.asarray(f)
            if f.ndim != 3 or f.shape[-1] != 3 or f.dtype != np.uint8 or f.shape[0] % 2 or f.shape[1] % 2:
                raise ValueError(f"frames must be uint8 [H, W, 3] with even H and W, got {f.dtype} {f.shape}")
            if stream is None:
                stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
                stream.height, stream.width = int(f.shape[0]), int(f.shape[1])
                stream.pix_fmt = "yuv420p"
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
            count += 1
        if stream is None:
            raise ValueError("frames is empty")
        for packet in stream.encode():
            container.mux(packet)
    return count


def _frames_of(video: Any, num_frames: int | None, fps: float | None) -> Iterator[np.ndarray]:
    if isinstance(video, (str, Path)):
        return (f for f, _, _ in iter_frames(video, num_frames=num_frames, fps=fps))
    if num_frames is not None or fps is not None:
        raise ValueError("num_frames / fps choose frames of a video file; frames given as an array or an iterable "
                         "are all used")
    if isinstance(video, torch.Tensor):
        video = video.numpy()
    if isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise ValueError(f"video must be uint8 [T, H, W, 3] frames, got shape {video.shape}")
        return iter(video)
    if isinstance(video, Iterable):
        return iter(video)
    raise TypeError(f"video must be a file path, a uint8 [T, H, W, 3] array or an iterable of [H, W, 3] frames, got "
                    f"{type(video).__name__}")


def frame_chunks(frames: Iterable[np.ndarray], chunk_frames: int) -> Iterator[tuple[np.ndarray, bool]]:
    """``(uint8 [c, H, W, 3] chunk, is_last)`` of ``chunk_frames`` consecutive frames (the last chunk may be
    shorter). One chunk of lookahead tells the last one."""
    if not isinstance(chunk_frames, int) or isinstance(chunk_frames, bool) or chunk_frames < 1:
        raise ValueError(f"chunk_frames must be an integer >= 1, got {chunk_frames!r}")
    it = iter(frames)

    def take() -> np.ndarray | None:
        got = []
        for f in it:
            f = np.asarray(f)
            if f.ndim != 3 or f.shape[-1] != 3 or f.dtype != np.uint8:
                raise ValueError(f"every frame must be uint8 [H, W, 3] RGB, got {f.dtype} {f.shape}")
            got.append(f)
            if len(got) == chunk_frames:
                break
        return np.stack(got) if got else None

    chunk = take()
    if chunk is None:
        raise ValueError("video has no frames")
    while chunk is not None:
        nxt = take()
        yield chunk, nxt is None
        chunk = nxt


# ---- the loop ------------------------------------------------------------------------------------------------------
def _check_method(method: Any) -> None:
    if not isinstance(method, Compressor):
        raise TypeError(f"method must be a configured tokenzip method (e.g. tz.get('dycoke', retain=0.25)), got "
                        f"{type(method).__name__}")
    if method.info.stage != "pre_llm" or "video" not in method.info.modalities:
        raise TypeError(f"{method.info.name} works at stage {method.info.stage!r} on {list(method.info.modalities)}; "
                        f"long videos are compressed chunk by chunk with a pre-LLM video method (an LLM-stage method "
                        f"can then run on the result: `with llm_method(model): model.generate(**inputs)`)")


def _prompt_ids(tokenizer: Any, prompt: str, video_token_id: int) -> tuple[list[int], list[int]]:
    """The prompt's token ids before and after its one ``<video>`` marker."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str holding one <video> marker, got {type(prompt).__name__}")
    ids = tokenizer(prompt)["input_ids"]
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    at = [i for i, t in enumerate(ids) if t == video_token_id]
    if len(at) != 1:
        token = getattr(tokenizer, "video_token", None) or VIDEO_TOKEN
        raise ValueError(f"prompt must hold exactly one {token} marker (one clip), it tokenizes to {len(at)}")
    return ids[: at[0]], ids[at[0] + 1:]


def _frames_only(layout: Layout, n: int) -> tuple[Layout, int]:
    """The clip's frame segments (a prefix of its layout) and their token count; the rest (LLaVA-OneVision's
    closing newline) closes the whole clip, so it is left to the last chunk."""
    segs = list(layout.segments)
    cut = next((i for i, s in enumerate(segs) if s.kind != "frames"), len(segs))
    if cut == 0 or any(s.kind == "frames" for s in segs[cut:]):
        raise ValueError(f"a clip's layout must be frames followed by closing tokens, got {layout!r}")
    head = Layout(segs[:cut])
    return head, head.n if cut < len(segs) else n


def long_video_inputs(method: Compressor, model: torch.nn.Module, tokenizer: Any, prompt: str, video: Any, *,
                      chunk_frames: int = 16, num_frames: int | None = None, fps: float | None = None,
                      video_processor: Any = None) -> dict[str, Any]:
    """Model-ready inputs (``input_ids``, ``attention_mask``, ``mm_encoder_outputs``) for ``model.generate`` /
    ``model(...)`` holding a long clip compressed chunk by chunk (module doc: budget, chunk borders, memory).

    ``video``: a file (``num_frames`` or ``fps`` picks its frames, as :func:`tokenzip.video.read_video`; decoded
    while compressing), a ``uint8 [T, H, W, 3]`` array, or an iterable of ``uint8 [H, W, 3]`` frames (a generator
    keeps memory bounded). ``prompt``: chat-formatted text holding one ``<video>``. ``video_processor``: its settings
    (size, mean, std; default: LLaVA-OneVision's, at the model's vision size). Afterwards ``method.last_stats`` holds
    one :class:`~tokenzip.ItemStats` per chunk (``[0]["video"].items``). ``method`` and ``model`` are not modified;
    the input tensors are on the model's device."""
    _check_method(method)
    adapter = adapter_for(model)  # TypeError for models tokenzip does not support
    if not isinstance(adapter, OnevisionVideo):
        raise TypeError(f"long_video_inputs supports LlavaOnevisionForConditionalGeneration, got "
                        f"{type(model).__name__}")
    vid = adapter.video_token_id
    before, after = _prompt_ids(tokenizer, prompt, vid)
    proc = video_processor if video_processor is not None else \
        onevision_video_processor(int(model.config.vision_config.image_size))
    param = next(model.parameters())
    needs = method.signals_needed()
    kept: list[torch.Tensor] = []
    stats: list[ItemStats] = []
    try:
        for frames, last in frame_chunks(_frames_of(video, num_frames, fps), chunk_frames):
            pixels = onevision_video_pixels([frames], proc).to(param.device, param.dtype)
            n = adapter.video_layout(frames.shape[0]).n
            ids = torch.tensor([before + [vid] * n + after], device=param.device)
            call = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}
            with torch.no_grad():
                (item,) = adapter.encode(call, needs)
                layout, m = (item.grid, item.tokens.shape[0]) if last else _frames_only(item.grid, item.tokens.shape[0])
                signals = {name: (sig[:m] if SIGNALS[name].per_token else sig).unsqueeze(0)
                           for name, sig in item.signals.items() if name in needs}
                out = method.compress(item.tokens[:m].unsqueeze(0), grid=layout, **signals)
            kept.append(out.tokens[0].clone())  # a copy: nothing of the chunk's tensors stays referenced
            stats.append(ItemStats("video", m, out.tokens.shape[1], out.source[0].clone(), out.index[0].clone(),
                                   layout))
            del call, pixels, item, signals, out
            adapter.release()
    finally:
        adapter.release()
    feats = torch.cat(kept)
    total = int(feats.shape[0])
    ids = torch.tensor([before + [vid] * total + after], device=param.device)
    method.last_stats = summarize([stats])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "mm_encoder_outputs": {"video": ClipFeatures(pooler_output=feats.unsqueeze(0), clip_tokens=(total,))}}


# ---- memory measurement: python -m tokenzip.long_video ------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    """Reset the kernel's resident-set high-water mark (``VmHWM``) to the current RSS (Linux >= 4.0)."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class _PromptIds:
    """A stand-in tokenizer for presets without one: a fixed id list around the ``<video>`` marker."""

    def __init__(self, before: list[int], after: list[int], video_token_id: int):
        self.before, self.after, self.video_token_id = before, after, video_token_id

    def __call__(self, prompt: str) -> dict[str, list[int]]:
        return {"input_ids": self.before + [self.video_token_id] + self.after}


def measure(frames: int, *, chunk_frames: int = 16, method: str = "dycoke", retain: float = 0.1,
            layers: tuple[int, int] = (2, 2), side: int = 128, whole: bool = False, workdir: str | None = None
            ) -> dict[str, Any]:
    """Peak resident memory of compressing a ``frames``-frame clip (a synthetic ``side x side`` clip looped and
    written to mp4, then decoded while compressing) on the ``llava-ov-0.5b`` bench preset cut to ``layers``
    (vision, text) with random weights, and of the prefill that follows (``generate(max_new_tokens=1)``). Peaks are
    the kernel's ``VmHWM`` of this process, reset after the model is built, minus the RSS at that moment
    (``baseline_mb``: the model and the libraries). ``whole``: the stock route instead, for contrast: every frame
    decoded (:func:`tokenzip.video.read_video`) and the patched model run on the whole clip.

    RSS counts what the allocator keeps, not only live tensors: glibc's dynamic mmap threshold moves freed blocks
    of up to 32 MB into its heap, which it seldom returns, so peaks drift with the number of chunks. Run with
    ``MALLOC_MMAP_THRESHOLD_=131072`` (a fixed threshold: tensors are mapped and unmapped) to measure live memory."""
    import tempfile
    import time

    from . import registry
    from .bench.presets import _text_ids, build
    from .video import onevision_video_tokens, read_video, synthetic_clip

    torch.set_grad_enabled(False)
    loop = synthetic_clip(16, side, side, fps=25.0, seed=0).frames
    tmp = tempfile.TemporaryDirectory(dir=workdir)
    path = Path(tmp.name) / "clip.mp4"
    write_video(path, (loop[i % len(loop)] for i in range(frames)), fps=25.0)
    built = build("llava-ov-0.5b", layers=layers)
    model = built.model
    vid = int(model.config.video_token_id)
    vocab = int(model.config.text_config.vocab_size)
    tokenizer = _PromptIds(_text_ids(24, vocab, 0, {vid}), _text_ids(16, vocab, 1, {vid}), vid)
    compressor = registry.get(method, retain=retain)
    del built
    _reset_peak()
    baseline = _status_kb("VmRSS")
    t0 = time.perf_counter()
    if whole:
        clip = read_video(path, num_frames=frames).frames
        size = int(model.config.vision_config.image_size)
        pixels = onevision_video_pixels([clip], onevision_video_processor(size))
        ids = torch.tensor([tokenizer.before + [vid] * onevision_video_tokens(model.config, frames) + tokenizer.after])
        with compressor(model):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pixels,
                           max_new_tokens=1, do_sample=False)
        kept = sum(s.tokens_out for per in compressor.last_stats for s in per.values())
        compress_peak, prefill_peak = None, _status_kb("VmHWM")
    else:
        inputs = long_video_inputs(compressor, model, tokenizer, "<video>", str(path), num_frames=frames,
                                   chunk_frames=chunk_frames)
        compress_peak = _status_kb("VmHWM")
        kept = int(inputs["mm_encoder_outputs"]["video"].pooler_output.shape[1])
        _reset_peak()
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        prefill_peak = _status_kb("VmHWM")
    secs = time.perf_counter() - t0
    tmp.cleanup()
    d = int(model.config.text_config.hidden_size)
    mb = 1024.0
    return {"frames": frames, "chunk_frames": None if whole else chunk_frames, "method": method, "retain": retain,
            "layers": list(layers), "route": "whole clip (stock)" if whole else "chunked",
            "tokens_in": onevision_video_tokens(model.config, frames), "tokens_kept": kept,
            "survivors_mb": round(kept * d * 4 / 2 ** 20, 2), "baseline_mb": round(baseline / mb, 1),
            "compress_peak_over_baseline_mb": None if compress_peak is None else round((compress_peak - baseline) / mb,
                                                                                       1),
            "prefill_peak_over_baseline_mb": round((prefill_peak - baseline) / mb, 1), "seconds": round(secs, 1),
            "threads": torch.get_num_threads()}


__all__ = ["frame_chunks", "iter_frames", "long_video_inputs", "measure", "write_video"]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m tokenzip.long_video",
                                description="Peak memory of chunked long-video compression (one run per process).")
    p.add_argument("--frames", type=int, required=True, help="clip length in frames")
    p.add_argument("--chunk-frames", type=int, default=16)
    p.add_argument("--method", default="dycoke", help="a pre-LLM video method")
    p.add_argument("--retain", type=float, default=0.1)
    p.add_argument("--layers", default="2,2", help="vision,text layers built (the preset's default: 2,2)")
    p.add_argument("--side", type=int, default=128, help="side of the synthetic clip's frames, px (even)")
    p.add_argument("--whole", action="store_true", help="the stock route on the whole clip, for contrast")
    args = p.parse_args(argv)
    layers = tuple(int(x) for x in args.layers.split(","))
    if len(layers) != 2:
        p.error(f"--layers must be two counts 'vision,text', got {args.layers!r}")
    print(json.dumps(measure(args.frames, chunk_frames=args.chunk_frames, method=args.method, retain=args.retain,
                             layers=layers, side=args.side, whole=args.whole)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

