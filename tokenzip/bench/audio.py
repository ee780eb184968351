"""Word error rate and decode time vs retain for every audio method, on Whisper tiny.en with real speech.

    tokenzip bench --model whisper-tiny.en --out audio_out                          # JSONL + PNG + Markdown table
    tokenzip bench --model whisper-tiny.en --methods avgpool,vad_prune --retain 0.5,0.1

Data (offline, Debian packages, located by :mod:`tokenzip.data`): the five LibriVox clips of
``pocketsphinx-testdata`` (read speech with reference transcripts) and, when ``espeak-ng`` is installed, sentences
synthesised from known text.

Two settings, reported separately:
- ``filled``: clips concatenated (0.2 s gaps) into windows of up to ~30 s, so the 1,500 encoder frames are almost
  all speech; this is the hard case.
- ``padded``: each LibriVox clip alone (3-7 s), padded by Whisper to 30 s; dropping the padding is cheap, so
  speech-aware methods look much better here.

WER is corpus-level (jiwer) over all windows of a setting, after Whisper's English text normaliser (applied to
reference and hypothesis alike). Decode time is the wall time of ``generate()`` (encoder, compression and decoding)
for the whole batch; it is noisy on a shared CPU. Greedy decoding, short-form (<= 30 s) only.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .. import data
from ..deps import require
from ..zoo.whisper import SAMPLING_RATE, features, load_audio
from .specs import make_method  # NAME / NAME@encoderL / NAME@encoderL1+L2+...

DEFAULT_RETAINS = (0.5, 0.25, 1 / 6, 1 / 8, 0.1)
# the encoder stage (tz.InEncoder) measured by default, cut after 2 of Whisper tiny's 4 encoder layers
ENCODER_STAGE = ("avgpool@encoder2", "atome@encoder2")
GAP_SECONDS = 0.2
WINDOW_FILL = 29.5

# Known text for espeak-ng (written for this benchmark).
ESPEAK_SENTENCES = (
    "The small boat drifted slowly toward the quiet harbour at dawn.",
    "Please remember to close the window before the storm arrives tonight.",
    "Seven children walked to school along the old stone bridge.",
    "The engineer measured the voltage twice and wrote down both numbers.",
    "A warm cup of tea made the long winter evening feel much shorter.",
    "Our train was delayed because a tree had fallen across the track.",
    "She painted the kitchen door a bright shade of yellow.",
    "Every morning the baker opens his shop at exactly six o'clock.",
    "The library closes early on Sundays during the summer months.",
    "He forgot his umbrella on the bus and walked home in the rain.",
    "Fresh bread and cheese were waiting on the wooden table.",
    "The old clock in the hallway stopped at a quarter past nine.",
    "Two red kites flew high above the green hills all afternoon.",
    "My neighbour grows tomatoes, beans and peppers in her garden.",
    "The pilot announced that we would land twenty minutes early.",
    "A gentle breeze carried the smell of pine through the valley.",
    "The students listened carefully while the teacher explained the rules.",
    "Dark clouds gathered over the mountains before the first snow.",
    "He counted the coins twice and found that one was missing.",
    "The river was too deep to cross without a proper boat.",
    "We planted three apple trees behind the house last spring.",
    "The museum opened a new exhibition about ancient ships.",
    "Her brother fixed the broken chair with glue and a few nails.",
    "The market was crowded with people buying flowers and fruit.",
)
# espeak-ng voice and speed (words per minute) per group of eight sentences, so windows differ in speaking rate
# (en-us at 140-160 wpm only: uncompressed, Whisper tiny.en mishears espeak-ng's en-gb voices and 180 wpm, 14-19% WER)
ESPEAK_VOICES = (("en-us", 160), ("en-us", 140), ("en-us", 150))


@dataclass
class Clip:
    name: str
    wave: np.ndarray  # mono float32, 16 kHz
    text: str

    @property
    def seconds(self) -> float:
        return self.wave.shape[0] / SAMPLING_RATE


def librivox_clips(root: Path | None = None) -> list[Clip]:
    """The five LibriVox clips with their transcripts (``root``: default :func:`tokenzip.data.librivox_dir`);
    :class:`tokenzip.data.DataMissing` (a FileNotFoundError) with the install hint when missing."""
    root = data.librivox_dir() if root is None else root
    trans = root / "transcription"
    clips = []
    for line in trans.read_text().splitlines():
        if "(" not in line:
            continue
        text, name = line.rsplit("(", 1)
        name = name.strip().rstrip(")")
        text = text.replace("<s>", "").replace("</s>", "").strip()
        clips.append(Clip(name, load_audio(root / f"{name}.wav"), text))
    return clips


def espeak_clip(text: str, voice: str = "en-us", speed: int = 160) -> Clip:
    """Synthesise ``text`` with espeak-ng (16 kHz mono after resampling); ``speed`` in words per minute."""
    exe = data.espeak_ng()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "s.wav"
        subprocess.run([exe, "-v", voice, "-s", str(speed), "-w", str(out), text], check=True,
                       capture_output=True)
        wave = load_audio(out)
    return Clip(f"espeak-{voice}:{text[:24]}", wave, text)


def speech_clips(use_espeak: bool = True) -> list[Clip]:
    clips = librivox_clips()
    if use_espeak and data.has_espeak_ng():
        clips += [espeak_clip(t, *ESPEAK_VOICES[(i // 8) % len(ESPEAK_VOICES)])
                  for i, t in enumerate(ESPEAK_SENTENCES)]
    return clips


def pack_windows(clips: Iterable[Clip], fill: float = WINDOW_FILL, gap: float = GAP_SECONDS,
                 min_fill: float = 20.0) -> list[Clip]:
    """Concatenate clips, in order, into windows of at most ``fill`` seconds (``gap`` s of silence between);
    a last window shorter than ``min_fill`` seconds is dropped (it would be mostly padding)."""
    windows: list[list[Clip]] = [[]]
    used = 0.0
    for c in clips:
        need = c.seconds + (gap if windows[-1] else 0.0)
        if windows[-1] and used + need > fill:
            windows.append([])
            used, need = 0.0, c.seconds
        windows[-1].append(c)
        used += need
    out = []
    silence = np.zeros(int(gap * SAMPLING_RATE), dtype=np.float32)
    for w in windows:
        parts: list[np.ndarray] = []
        for i, c in enumerate(w):
            parts += ([silence] if i else []) + [c.wave]
        out.append(Clip("+".join(c.name for c in w), np.concatenate(parts), " ".join(c.text for c in w)))
    return [w for w in out if w.seconds >= min_fill] or out[:1]


def normalize(text: str) -> str:
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer({})(text)


def wer(refs: list[str], hyps: list[str]) -> float:
    jiwer = require("jiwer")

    r, h = [normalize(t) for t in refs], [normalize(t) for t in hyps]
    return float(jiwer.wer(r, h))


def transcribe(model: torch.nn.Module, processor: Any, clips: list[Clip], compressor: Any = None,
               max_new_tokens: int = 128) -> tuple[list[str], float, int]:
    """Greedy transcripts, wall time of generate(), and audio tokens per clip that reached the decoder."""
    waves = [c.wave for c in clips]
    feats = features(processor, waves)
    kwargs: dict[str, Any] = {"input_features": feats, "max_new_tokens": max_new_tokens, "do_sample": False}
    t0 = time.perf_counter()
    with torch.no_grad():
        if compressor is None:
            out = model.generate(**kwargs)
            tokens = model.config.max_source_positions
        else:
            with compressor(model):
                out = model.generate(**kwargs, raw_audio=waves)
            tokens = compressor.last_stats[0]["audio"].tokens_out
    elapsed = time.perf_counter() - t0
    return processor.batch_decode(out, skip_special_tokens=True), elapsed, tokens


def audio_methods() -> list[str]:
    """Registered methods that can run on the Whisper adapter (audio modality, pre-LLM stage), then the encoder-stage
    variants of ``ENCODER_STAGE``."""
    import tokenzip as tz

    return [m.name for m in tz.methods() if "audio" in m.modalities and m.stage == "pre_llm"] + list(ENCODER_STAGE)


def run(out_dir: Path, methods: list[str], retains: list[float], settings: list[str],
        use_espeak: bool = True, variants: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    from .. import zoo

    for name in methods:  # fail before loading anything
        make_method(name, 0.5)
    model, processor = zoo.load("whisper-tiny.en")
    clips = speech_clips(use_espeak)
    by_setting = {"filled": pack_windows(clips), "padded": librivox_clips()}
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    jsonl = (out_dir / "audio_wer.jsonl").open("w")
    runs: list[tuple[str, str, dict[str, Any]]] = [(m, m, {}) for m in methods]
    runs += [(label, spec["method"], {k: v for k, v in spec.items() if k != "method"})
             for label, spec in (variants or {}).items()]
    for setting in settings:
        windows = by_setting[setting]
        refs = [w.text for w in windows]
        hyps, secs, _ = transcribe(model, processor, windows)
        base = {"setting": setting, "method": "none", "retain": 1.0, "tokens": model.config.max_source_positions,
                "wer": wer(refs, hyps), "seconds": secs, "windows": len(windows),
                "audio_seconds": sum(w.seconds for w in windows), "window_names": [w.name for w in windows],
                "window_wer": [wer([t], [h]) for t, h in zip(refs, hyps)]}
        rows.append(base)
        jsonl.write(json.dumps(base) + "\n")
        print(f"[{setting}] uncompressed WER {base['wer']:.3f} ({len(windows)} windows, "
              f"{base['audio_seconds']:.1f} s audio, {secs:.1f} s)", flush=True)
        for label, name, params in runs:
            for r in retains:
                c = make_method(name, r, **params)
                hyps, secs, tokens = transcribe(model, processor, windows, c)
                row = {"setting": setting, "method": label, "retain": r, "tokens": tokens,
                       "wer": wer(refs, hyps), "seconds": secs, "windows": len(windows),
                       "window_wer": [wer([t], [h]) for t, h in zip(refs, hyps)]}
                rows.append(row)
                jsonl.write(json.dumps(row) + "\n")
                jsonl.flush()
                print(f"[{setting}] {label:>16} retain {r:.3f} ({tokens:4d} tok) WER {row['wer']:.3f} "
                      f"{secs:.1f} s", flush=True)
    jsonl.close()
    plot(rows, out_dir / "audio_wer.png")
    table = markdown(rows)
    (out_dir / "audio_wer.md").write_text(table)
    print(table)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({r["setting"] for r in rows})
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        sub = [r for r in rows if r["setting"] == setting]
        base = next(r for r in sub if r["method"] == "none")
        for m in sorted({r["method"] for r in sub if r["method"] != "none"}):
            pts = sorted((r["retain"], 100 * r["wer"]) for r in sub if r["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.axhline(100 * base["wer"], color="k", ls="--", lw=1, label="uncompressed")
        ax.axhline(100 * base["wer"] + 5, color="gray", ls=":", lw=1, label="uncompressed + 5")
        ax.set_xscale("log")
        ticks = sorted({r["retain"] for r in sub if r["method"] != "none"})
        ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("retain (fraction of the 1,500 encoder tokens)")
        ax.set_ylabel("WER (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"Whisper tiny.en, {setting} 30 s windows")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = []
    for setting in sorted({r["setting"] for r in rows}):
        sub = [r for r in rows if r["setting"] == setting]
        base = next(r for r in sub if r["method"] == "none")
        retains = sorted({r["retain"] for r in sub if r["method"] != "none"}, reverse=True)
        lines.append(f"\n**{setting}** ({base['windows']} windows; uncompressed WER {100 * base['wer']:.1f}%, "
                     f"generate {base['seconds']:.1f} s)\n")
        lines.append("| method | " + " | ".join(f"retain {r:.3g}" for r in retains) + " |")
        lines.append("|---" * (len(retains) + 1) + "|")
        for m in dict.fromkeys(r["method"] for r in sub if r["method"] != "none"):
            cells = []
            for r in retains:
                hit = [x for x in sub if x["method"] == m and x["retain"] == r]
                cells.append(f"{100 * hit[0]['wer']:.1f}% ({hit[0]['seconds']:.1f} s)" if hit else "-")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- demo step (tokenzip demo / make demo) ------------------------------------------------------------------------
DEMO_SETTINGS = (("vad_prune", 0.25), ("vad_prune", 1 / 6), ("atome", 1 / 6), ("avgpool", 1 / 6))


def demo_step(ctx: Any) -> None:
    """Transcribe a real ~25 s LibriVox window with Whisper tiny.en: full 1,500 audio tokens vs compressed ones;
    prints transcripts, token counts, generate() time and WER, and writes ``audio_whisper.md``."""
    import tokenzip as tz

    try:
        clips = librivox_clips()
    except FileNotFoundError as exc:
        ctx.log(f"audio demo skipped: {exc}")
        return
    model, processor = ctx.model("whisper-tiny.en")
    if type(model).__name__ != "WhisperForConditionalGeneration":  # e.g. a test stubbing the zoo
        ctx.log(f"audio demo skipped: whisper-tiny.en gave a {type(model).__name__}")
        return
    window = pack_windows(clips)[:1]
    ref = window[0].text
    settings = DEMO_SETTINGS[:1] if ctx.quick else DEMO_SETTINGS
    lines = [f"# Whisper tiny.en on {window[0].seconds:.1f} s of LibriVox speech (padded to 30 s)", "",
             f"reference: {ref}", "", "| audio tokens | method | generate (s) | WER | transcript |",
             "|---|---|---|---|---|"]
    runs = [("none", 1.0, None)] + [(n, r, tz.get(n, retain=r)) for n, r in settings]
    for name, retain, comp in runs:
        hyps, secs, tokens = transcribe(model, processor, window, comp)
        score = wer([ref], hyps)
        label = "uncompressed" if comp is None else f"{name} retain={retain:.3g}"
        ctx.log(f"[audio] {label:>24}: {tokens:4d} audio tokens, generate {secs:.2f} s, WER {100 * score:.1f}%\n"
                f"        {hyps[0].strip()}")
        lines.append(f"| {tokens} | {label} | {secs:.2f} | {100 * score:.1f}% | {hyps[0].strip()} |")
    path = ctx.out / "audio_whisper.md"
    path.write_text("\n".join(lines) + "\n")
    ctx.wrote(path)
