"""Whisper long-form (> 30 s) under compression: WER and peak memory vs the audio's length, on real speech.

    python -m tokenzip.bench.longform --out longform_out                       # defaults below
    python -m tokenzip.bench.longform --seconds 60,120,240 --methods vad_prune,avgpool,atome --retain 0.5,0.25

Whisper tiny.en (offline, :mod:`tokenzip.zoo.whisper`) transcribes one long recording with its own sequential
long-form ``generate()`` (``return_timestamps=True``, greedy, no temperature fallback, not conditioned on previous
windows), uncompressed and under each method: the method compresses each 30 s window as Whisper's generate()
encodes it (:meth:`tokenzip.adapters.whisper.WhisperAdapter.encode_windows`). No ``raw_audio`` is passed, so
``vad_prune``'s speech signal is the log-mel energy of each window.

Data: the five LibriVox clips of Debian's ``pocketsphinx-testdata`` (25 s of read speech in all) concatenated in a
different shuffled order per round (``--seed``), 0.5 s of silence between clips, until the recording reaches each
requested length; the reference is the clips' transcripts in the same order. It is the same five sentences repeated,
so a few minutes of it test long-form mechanics and window boundaries, not vocabulary.

Per (length, method): corpus WER (Whisper's English normaliser, :func:`tokenzip.bench.audio.wer`), the audio tokens
the decoder read per window, the wall time of ``generate()`` (noisy on a shared CPU) and the peak memory of the
call above what the process held before it (:class:`tokenzip.bench.instrument.PeakMemory`: Linux VmHWM on CPU),
after one short warm-up call, and the process's peak resident set (model included); each point runs in its own
fresh process, so its memory is its own.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..zoo.whisper import SAMPLING_RATE

DEFAULT_SECONDS = (60, 120, 240)
DEFAULT_METHODS = ("vad_prune", "avgpool", "atome")
DEFAULT_RETAINS = (0.5, 0.25)
GAP_SECONDS = 0.5


def long_recording(seconds: float, seed: int = 0, gap: float = GAP_SECONDS) -> tuple[np.ndarray, str]:
    """``(wave, reference)``: LibriVox clips concatenated (each round in its own shuffled order, ``gap`` s of silence
    between clips) until the recording is at least ``seconds`` long."""
    from .audio import librivox_clips

    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    clips = librivox_clips()
    rng = random.Random(seed)
    silence = np.zeros(int(gap * SAMPLING_RATE), dtype=np.float32)
    parts: list[np.ndarray] = []
    texts: list[str] = []
    total = 0
    while total < seconds * SAMPLING_RATE:
        for c in rng.sample(clips, len(clips)):
            if parts:
                parts.append(silence)
            parts.append(c.wave)
            texts.append(c.text)
            total = sum(p.shape[0] for p in parts)
            if total >= seconds * SAMPLING_RATE:
                break
    return np.concatenate(parts), " ".join(texts)


def long_features(processor: Any, waves: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Long-form inputs as Whisper's processor documents them: no truncation, padded to the longest recording, with
    the attention mask that tells generate() each recording's length."""
    out = processor(waves, sampling_rate=SAMPLING_RATE, return_tensors="pt", truncation=False, padding="longest",
                    return_attention_mask=True)
    return {"input_features": out.input_features, "attention_mask": out.attention_mask}


def transcribe_long(model: torch.nn.Module, processor: Any, waves: list[np.ndarray], compressor: Any = None
                    ) -> dict[str, Any]:
    """Greedy long-form transcripts of ``waves``, with wall time, peak memory and the audio tokens per window."""
    from .instrument import PeakMemory

    inputs = long_features(processor, waves)
    kwargs = {**inputs, "return_timestamps": True, "do_sample": False, "condition_on_prev_tokens": False}
    mem = PeakMemory("cpu")
    t0 = time.perf_counter()
    with torch.no_grad(), mem:
        if compressor is None:
            out = model.generate(**kwargs)
        else:
            with compressor(model):
                out = model.generate(**kwargs)
    elapsed = time.perf_counter() - t0
    seqs = out if isinstance(out, torch.Tensor) else out["sequences"]
    per_window = ([s["audio"].tokens_out for s in compressor.last_stats] if compressor is not None
                  else None)
    return {"texts": processor.batch_decode(seqs, skip_special_tokens=True), "seconds": elapsed,
            "peak_mem_bytes": mem.peak, "windows": len(per_window) if per_window is not None else None,
            "tokens_per_window": sorted(set(per_window)) if per_window else [model.config.max_source_positions]}


def measure_one(length: float, name: str, retain: float, seed: int = 0) -> dict[str, Any]:
    """One (recording length, method) point, in this process: load Whisper tiny.en, one short warm-up call, then the
    long-form transcription; the row has the call's peak memory above what the process held before it and the
    process's own peak resident set (``peak_rss_bytes``: model included)."""
    import tokenzip as tz

    from .. import zoo
    from .audio import wer
    from .instrument import PeakMemory

    comp = None if name == "none" else tz.get(name, retain=retain)  # fails before loading anything
    model, processor = zoo.load("whisper-tiny.en")
    warm = processor([np.zeros(SAMPLING_RATE, dtype=np.float32)], sampling_rate=SAMPLING_RATE, return_tensors="pt")
    with torch.no_grad():
        model.generate(input_features=warm.input_features, max_new_tokens=2, do_sample=False)
    wave, ref = long_recording(length, seed)
    res = transcribe_long(model, processor, [wave], comp)
    return {"audio_s": round(wave.shape[0] / SAMPLING_RATE, 1), "method": name, "retain": retain,
            "wer": wer([ref], res["texts"]), "generate_s": res["seconds"], "peak_mem_bytes": res["peak_mem_bytes"],
            "peak_rss_bytes": PeakMemory._status("VmHWM") or 0, "windows": res["windows"],
            "tokens_per_window": res["tokens_per_window"], "hypothesis": res["texts"][0]}


def run(out_dir: Path, seconds: list[float], methods: list[str], retains: list[float], seed: int = 0
        ) -> list[dict[str, Any]]:
    """Every (length, method) point in its own fresh process (``--one``), so that each peak memory is that call's
    alone: a process that already ran a longer call keeps its memory, and the next call's increase reads 0."""
    import subprocess
    import sys

    import tokenzip as tz

    for name in methods:  # fail before loading anything
        tz.get(name, retain=0.5)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with (out_dir / "longform.jsonl").open("w") as f:
        for length in seconds:
            for name, retain in [("none", 1.0)] + [(m, r) for m in methods for r in retains]:
                spec = json.dumps({"length": length, "name": name, "retain": retain, "seed": seed})
                done = subprocess.run([sys.executable, "-m", "tokenzip.bench.longform", "--one", spec],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"long-form point {spec} failed:\n{done.stderr[-2000:]}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                f.write(json.dumps(row) + "\n")
                f.flush()
                print(f"{row['audio_s']:6.1f} s  {name:>10} {retain:<5g} WER {100 * row['wer']:5.1f}%  "
                      f"{row['generate_s']:6.1f} s  peak +{row['peak_mem_bytes'] / 2**20:6.1f} MB  "
                      f"process peak {row['peak_rss_bytes'] / 2**20:6.0f} MB  tokens/window "
                      f"{row['tokens_per_window']}", flush=True)
    (out_dir / "longform.md").write_text(markdown(rows) + "\n")
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    out = ["| audio s | method | retain | audio tokens / window | WER | generate s | call peak +MB | process peak MB |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        toks = "/".join(str(t) for t in r["tokens_per_window"])
        out.append(f"| {r['audio_s']:.1f} | {r['method']} | {r['retain']:g} | {toks} | {100 * r['wer']:.1f}% | "
                   f"{r['generate_s']:.1f} | {r['peak_mem_bytes'] / 2**20:.0f} | "
                   f"{r.get('peak_rss_bytes', 0) / 2**20:.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokenzip.bench.longform", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="longform_out")
    p.add_argument("--seconds", default=",".join(str(s) for s in DEFAULT_SECONDS),
                   help="comma-separated recording lengths in seconds (each > 30 for long-form)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--retain", default=",".join(str(r) for r in DEFAULT_RETAINS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: one point, JSON row on stdout
    args = p.parse_args(argv)
    if args.one is not None:
        spec = json.loads(args.one)
        print(json.dumps(measure_one(spec["length"], spec["name"], spec["retain"], spec["seed"])), flush=True)
        return 0
    try:
        seconds = [float(s) for s in args.seconds.split(",") if s.strip()]
        retains = [float(r) for r in args.retain.split(",") if r.strip()]
    except ValueError as exc:
        p.error(f"--seconds and --retain take comma-separated numbers ({exc})")
    if not seconds or any(s <= 0 for s in seconds):
        p.error("--seconds: positive lengths, e.g. 60,120")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    run(Path(args.out), seconds, methods, retains, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
