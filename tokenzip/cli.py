"""Command line: ``tokenzip methods | show | run | demo`` (also ``python -m tokenzip``).

    tokenzip methods
    tokenzip show --method visionzip --retain 0.1 photo.jpg -o zip.png
    tokenzip run --model dinov2-llava --method tome --retain 0.25 --image photo.jpg --prompt "What is this?"
    tokenzip demo --out demo_out

Models are zoo names (``tokenzip.zoo``, offline) or local Hugging Face checkpoint folders (loaded with
``AutoModelForImageTextToText`` / ``AutoProcessor``, ``local_files_only=True``). Bad input prints one line and exits
with status 2 (set ``TOKENZIP_DEBUG=1`` for the traceback); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

EXIT_USAGE = 2
DEFAULT_MODEL = "dinov2-llava"
DEFAULT_PROMPT = "Describe the image."
SKIMAGE_PREFIX = "skimage:"


class CLIError(Exception):
    """A user mistake: printed as one line, exit status 2."""


# ---- small helpers shared with tokenzip.demo --------------------------------------------------------------------
def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if markdown:
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
        return "\n".join([lines[0], "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + lines[1:])
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def load_image(spec: str):
    """A PIL RGB image from a file path, or ``skimage:NAME`` for a scikit-image sample (astronaut, coffee ...)."""
    from PIL import Image, UnidentifiedImageError

    if spec.startswith(SKIMAGE_PREFIX):
        name = spec[len(SKIMAGE_PREFIX):]
        try:
            from skimage import data
        except ImportError as e:
            raise CLIError("skimage: images need scikit-image (pip install scikit-image)") from e
        if not hasattr(data, name) or name.startswith("_"):
            raise CLIError(f"unknown scikit-image sample {name!r} (try astronaut, coffee, chelsea, rocket)")
        arr = getattr(data, name)()
        img = Image.fromarray(arr)
        return img.convert("RGB")
    path = Path(spec)
    if not path.is_file():
        raise CLIError(f"image not found: {spec}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise CLIError(f"cannot read image {spec}: {e}") from e


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
    import tokenzip as tz

    try:
        return tz.get(method, retain=retain, tokens=tokens)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from e


def build_inputs(processor: Any, image: Any, prompt: str) -> dict[str, Any]:
    """Model inputs for one image and one prompt: the processor's chat template when it has one (image first),
    else ``<image>\\n`` + prompt."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
    else:
        token = getattr(processor, "image_token", "<image>")
        text = f"{token}\n{prompt}"
    return dict(processor(images=image, text=text, return_tensors="pt"))


def model_view(processor: Any, pixel_values: torch.Tensor):
    """The picture the encoder saw (normalisation undone)."""
    from .viz import pixels_to_image

    ip = getattr(processor, "image_processor", processor)
    return pixels_to_image(pixel_values, getattr(ip, "image_mean", None), getattr(ip, "image_std", None))


def compress_only(model: Any, compressor: Any, inputs: dict[str, Any]):
    """The first item's :class:`tokenzip.ItemStats`, computed from exactly the tokens and signals the method gets
    inside ``model.generate``. Pre-LLM methods run only the adapter and the method (no LLM); LLM-stage methods
    need one prefill forward pass under the patch."""
    from .patch import Patch

    patch = Patch(compressor, model)  # TypeError for unsupported models / methods of another stage or modality
    with torch.no_grad():
        if compressor.info.stage == "llm":
            with patch:
                model(**inputs)
        else:
            patch.prepare(dict(inputs))
    for per_mod in compressor.last_stats:
        for stats in per_mod.values():
            if stats.items:
                return stats.items[0]
    raise CLIError("the model call carried no media to compress")


def compress_items(model: Any, compressors: Sequence[Any], inputs: dict[str, Any]) -> list[Any]:
    """Several methods on the first media item of ``inputs``, encoding it once: the model's adapter computes the
    union of the signals they ask for, and each method gets exactly the signals it would get inside
    ``model.generate`` (what :class:`tokenzip.patch.Patch` hands it). Returns one ``ItemStats`` per compressor."""
    from .adapters import adapter_for
    from .output import ItemStats
    from .patch import Patch

    for c in compressors:
        Patch(c, model)  # TypeError for unsupported models / methods of another stage or modality
    adapter = adapter_for(model)
    if not adapter.has_media(inputs):
        raise CLIError("the model call carried no media to compress")
    needs = frozenset().union(*(set(c.requires) | set(c.optional) for c in compressors))
    with torch.no_grad():
        item = adapter.encode(dict(inputs), needs)[0]
        results = []
        for c in compressors:
            want = set(c.requires) | set(c.optional)
            signals = {name: sig.unsqueeze(0) for name, sig in item.signals.items() if name in want}
            out = c.compress(item.tokens.unsqueeze(0), grid=item.grid, **signals)
            results.append(ItemStats(modality=item.modality, tokens_in=item.tokens_in, tokens_out=out.tokens.shape[1],
                                     source=out.source[0], index=out.index[0], grid=item.grid))
    return results


def language_model(model: Any) -> torch.nn.Module | None:
    core = getattr(model, "model", None)
    lm = getattr(core, "language_model", None)
    if lm is None and hasattr(model, "get_decoder"):
        try:
            lm = model.get_decoder()
        except Exception:  # noqa: BLE001 - not every class implements it
            lm = None
    return lm


class _FirstToken:
    """generate() streamer that records when the first new token arrives (the prompt is put first)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.first: float | None = None
        self.cpu_first: float | None = None
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen and value.dim() == 2:
            self.prompt_seen = True
            return
        if self.first is None:
            self.first = time.perf_counter()
            self.cpu_first = time.process_time()

    def end(self) -> None:
        pass


def timed_generate(model: Any, inputs: dict[str, Any], compressor: Any = None, max_new_tokens: int = 1
                   ) -> dict[str, Any]:
    """One greedy generate(); returns ``ttft`` (wall s to the first new token), ``cpu`` (CPU s of this process, all
    threads, to the first new token: less sensitive to other processes on a shared machine), ``total`` (wall s),
    ``prefill`` (tokens the LLM's first forward got) and ``ids`` (the new tokens)."""
    from contextlib import nullcontext

    lm = language_model(model)
    seen: list[int] = []

    def hook(_m: Any, args: tuple, kwargs: dict) -> None:
        if not seen:
            x = kwargs.get("inputs_embeds")
            x = x if x is not None else kwargs.get("input_ids")
            x = x if x is not None else (args[0] if args else None)
            if x is not None:
                seen.append(int(x.shape[1]))

    handle = lm.register_forward_pre_hook(hook, with_kwargs=True) if lm is not None else None
    streamer = _FirstToken()
    try:
        with (compressor(model) if compressor is not None else nullcontext()), torch.no_grad():
            streamer.start, streamer.cpu_start = time.perf_counter(), time.process_time()
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
            total = time.perf_counter() - streamer.start
    finally:
        if handle is not None:
            handle.remove()
    ttft = (streamer.first or time.perf_counter()) - streamer.start
    cpu = (streamer.cpu_first or time.process_time()) - streamer.cpu_start
    seq = out if isinstance(out, torch.Tensor) else out.sequences
    return {"ttft": ttft, "cpu": cpu, "total": total, "prefill": seen[0] if seen else None,
            "ids": seq[0, inputs["input_ids"].shape[1]:]}


def best_generate(model: Any, inputs: dict[str, Any], compressor: Any = None, repeats: int = 3,
                  max_new_tokens: int = 1) -> dict[str, Any]:
    """``timed_generate`` ``repeats`` times; times are the minimum over the runs (robust to other processes on a
    shared machine), the other fields are from the last run."""
    runs = [timed_generate(model, inputs, compressor, max_new_tokens) for _ in range(repeats)]
    return {**runs[-1], "ttft": min(r["ttft"] for r in runs), "cpu": min(r["cpu"] for r in runs),
            "total": min(r["total"] for r in runs)}


def decode(processor: Any, ids: torch.Tensor) -> str:
    tok = getattr(processor, "tokenizer", processor)
    return tok.decode(ids, skip_special_tokens=True).strip()


# ---- subcommands -----------------------------------------------------------------------------------------------
def cmd_methods(args: argparse.Namespace) -> int:
    import tokenzip as tz

    rows = [(m.name, m.family, ",".join(m.modalities), m.stage, "yes" if m.query_aware else "no", m.reference)
            for m in sorted(tz.methods(), key=lambda m: (m.stage, m.family, m.name))]
    print(format_table(("name", "family", "modalities", "stage", "query-aware", "reference"), rows,
                       markdown=args.markdown))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .viz import compare, legend_text

    compressor = make_compressor(args.method, args.retain, args.tokens)
    image = load_image(args.image)
    out = Path(args.output) if args.output else Path(f"{Path(args.image.split(':')[-1]).stem}_{args.method}.png")
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise CLIError(f"-o/--output must end in .png or .jpg, got {out}")
    model, processor = load_model(args.model)
    inputs = build_inputs(processor, image, args.prompt)
    stats = compress_only(model, compressor, inputs)
    seen = model_view(processor, inputs["pixel_values"][0])
    name = f"{compressor.info.name} {compressor.budget}: {stats.tokens_out}/{stats.tokens_in}"
    pic = compare(seen, [(name, stats)], title=None, panel=4.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    pic.save(out)
    print(f"{name} ({legend_text(stats)}) -> {out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    compressor = make_compressor(args.method, args.retain, args.tokens)
    image = load_image(args.image)
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model, processor = load_model(args.model)
    inputs = build_inputs(processor, image, args.prompt)
    if args.model.strip().lower() == "dinov2-llava":
        print("note: dinov2-llava's projector is untrained; its answers do not describe the image.")
    if args.repeats < 1:
        raise CLIError(f"--repeats must be >= 1, got {args.repeats}")
    timed_generate(model, inputs, None, 1)  # warm-up: the first call pays one-off allocation / kernel set-up
    base = best_generate(model, inputs, None, args.repeats, args.max_new_tokens)
    comp = best_generate(model, inputs, compressor, args.repeats, args.max_new_tokens)
    stats = compressor.last_stats
    img_in = sum(s.tokens_in for per in stats for s in per.values())
    img_out = sum(s.tokens_out for per in stats for s in per.values())
    rows = [("none", base["prefill"], img_in, f"{base['ttft']:.3f}", f"{base['cpu']:.3f}", f"{base['total']:.3f}"),
            (f"{compressor.info.name} {compressor.budget}", comp["prefill"], img_out, f"{comp['ttft']:.3f}",
             f"{comp['cpu']:.3f}", f"{comp['total']:.3f}")]
    print(format_table(("compression", "LLM prefill tokens", "media tokens", "time to first token (s)",
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

    p = sub.add_parser("show", help="draw which patches a method keeps/merges on an image")
    p.add_argument("image", help="image file, or skimage:NAME for a scikit-image sample")
    p.add_argument("--method", required=True, help="method name (see `tokenzip methods`)")
    _budget(p)
    p.add_argument("-o", "--output", help="output PNG (default: <image>_<method>.png)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"zoo name or local checkpoint folder whose encoder and signals are used (default "
                        f"{DEFAULT_MODEL}: real DINOv2-S/14)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt (used by query-aware methods)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("run", help="generate with and without compression and compare")
    p.add_argument("--model", default=DEFAULT_MODEL, help="zoo name or local checkpoint folder")
    p.add_argument("--method", required=True)
    _budget(p)
    p.add_argument("--image", required=True, help="image file, or skimage:NAME")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, TypeError, FileNotFoundError) as e:
        if os.environ.get("TOKENZIP_DEBUG"):
            raise
        print(f"tokenzip {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
