"""VQA-style accuracy from local files: a task format, the per-benchmark prompts, a runner and the scorers.

Task file: JSON lines (``.jsonl``) or Parquet (``.parquet``), one record per question::

    {"image": "imgs/0001.jpg", "question": "What is on the table?", "answer": "laptop", "benchmark": "gqa"}
    {"video": "clips/0002.mp4", "question": "What happens first?", "choices": ["a cat jumps", "a dog runs"],
     "answer": "B", "benchmark": "videomme"}

- ``image`` or ``video``: a path, relative to the task file's folder unless absolute;
- ``question``; ``answer``: the reference (for multiple choice a letter or the option's text);
- ``choices`` (optional): a list of option texts, shown as ``A. ...`` lines; ``benchmark`` (optional, or for the whole
  file through ``benchmark=``) picks the instruction from :data:`PROMPTS`; ``id`` (optional).

Prompts follow the evaluation settings common in the token-compression literature (LLaVA-1.5's evaluation, which
VisionZip, SparseVLM, PruMerge and others reuse): the question, then the options one per line, then the benchmark's
instruction on its own line. Metrics: ``exact_match`` (VQA-style normalised string equality) over all records and
``mc_accuracy`` (the predicted option letter, or an option's text, equals the reference) over multiple-choice ones.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..deps import require

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
PROMPTS: dict[str, str] = {
    "gqa": SHORT,
    "vqav2": SHORT,
    "textvqa": SHORT,
    "pope": SHORT,
    "mme": SHORT,
    "vizwiz": "When the provided information is insufficient, respond with 'Unanswerable'. " + SHORT,
    "mmbench": LETTER,
    "mmbench_cn": "请直接回答选项字母。",
    "scienceqa": LETTER,
    "seedbench": LETTER,
    "mvbench": LETTER,
    "videomme": LETTER,
    "egoschema": LETTER,
    "default": SHORT,
}
LETTERS = string.ascii_uppercase


@dataclass
class Record:
    question: str
    answer: str
    image: str | None = None
    video: str | None = None
    choices: list[str] = field(default_factory=list)
    benchmark: str = "default"
    id: str = ""

    @property
    def is_mc(self) -> bool:
        return bool(self.choices)


# ---- loading -------------------------------------------------------------------------------------------------------
def _raw_records(path: str) -> list[dict[str, Any]]:
    if path.endswith(".jsonl") or path.endswith(".json"):
        out = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from e
        return out
    if path.endswith(".parquet"):
        pq = require("pyarrow.parquet")
        return pq.read_table(path).to_pylist()
    raise ValueError(f"task file must end in .jsonl or .parquet, got {path!r}")


def load_task(path: str, benchmark: str | None = None, limit: int | None = None) -> list[Record]:
    """Records of a local task file; media paths resolved against the file's folder (and checked to exist)."""
    if not isinstance(path, str) or not os.path.isfile(path):
        raise ValueError(f"task file {path!r} does not exist")
    if benchmark is not None and benchmark not in PROMPTS:
        raise ValueError(f"benchmark must be one of {sorted(PROMPTS)}, got {benchmark!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an int >= 1, got {limit!r}")
    root = os.path.dirname(os.path.abspath(path))
    out = []
    for i, raw in enumerate(_raw_records(path)):
        where = f"{path} record {i}"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")
        for key in ("question", "answer"):
            if not isinstance(raw.get(key), (str, int, float)) or str(raw.get(key)).strip() == "":
                raise ValueError(f"{where}: field {key!r} is missing or empty")
        media = {k: raw.get(k) for k in ("image", "video") if raw.get(k)}
        if len(media) != 1:
            raise ValueError(f"{where}: give exactly one of 'image' or 'video' (a file path)")
        (kind, rel), = media.items()
        full = rel if os.path.isabs(rel) else os.path.join(root, rel)
        if not os.path.isfile(full):
            raise ValueError(f"{where}: {kind} file {full!r} does not exist")
        choices = raw.get("choices") or []
        if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{where}: 'choices' must be a list of strings")
        if len(choices) > len(LETTERS):
            raise ValueError(f"{where}: at most {len(LETTERS)} choices")
        bench = (raw.get("benchmark") or benchmark or "default").lower()
        if bench not in PROMPTS:
            raise ValueError(f"{where}: benchmark must be one of {sorted(PROMPTS)}, got {bench!r}")
        out.append(Record(question=str(raw["question"]), answer=str(raw["answer"]), choices=list(choices),
                          benchmark=bench, id=str(raw.get("id", i)), **{kind: full}))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"task file {path!r} has no records")
    return out


def prompt_for(rec: Record) -> str:
    """Question, options as ``A. text`` lines, then the benchmark's instruction."""
    lines = [rec.question.strip()]
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(rec.choices)]
    lines.append(PROMPTS[rec.benchmark])
    return "\n".join(lines)


# ---- scoring -------------------------------------------------------------------------------------------------------
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}


def normalize(text: str) -> str:
    """VQA-style: lower case, punctuation removed, number words as digits, articles dropped, spaces collapsed."""
    text = text.lower().strip()
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # 1,000 -> 1000
    text = "".join(" " if ch in string.punctuation else ch for ch in text)
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, answer: str) -> bool:
    return normalize(prediction) == normalize(answer)


def answer_letter(answer: str, choices: Sequence[str]) -> str | None:
    """The reference as a letter: ``"B"``/``"(B)"``/``"B."`` or an option's text."""
    a = answer.strip()
    m = re.fullmatch(r"\(?([A-Za-z])[\).:]?", a)
    if m and LETTERS.index(m.group(1).upper()) < len(choices):
        return m.group(1).upper()
    norm = normalize(a)
    for i, c in enumerate(choices):
        if normalize(c) == norm:
            return LETTERS[i]
    return None


def predicted_letter(prediction: str, choices: Sequence[str]) -> str | None:
    """The option a free-form prediction names: a leading letter (``B``, ``(B)``, ``B. text``), a standalone
    letter after "answer is"/"option", or an option's full text."""
    valid = LETTERS[: len(choices)]
    p = prediction.strip()
    m = re.fullmatch(r"\(?([A-Za-z])[\).:]?", p)  # just a letter, any case
    if m and m.group(1).upper() in valid:
        return m.group(1).upper()
    m = re.match(r"^\(?([A-Z])(?:[\).:]|\s|$)", p)
    if m and m.group(1) in valid:
        return m.group(1)
    m = re.search(r"(?:answer is|answer:|option)\s*\(?([A-Z])\b", p, re.IGNORECASE)
    if m and m.group(1).upper() in valid:
        return m.group(1).upper()
    norm = normalize(p)
    hits = [LETTERS[i] for i, c in enumerate(choices) if normalize(c) == norm]
    if len(hits) == 1:
        return hits[0]
    return None


def score(records: Sequence[Record], predictions: Sequence[str]) -> dict[str, Any]:
    """``exact_match`` over all records; ``mc_accuracy`` over multiple-choice records (None if there are none)."""
    if len(records) != len(predictions):
        raise ValueError(f"{len(records)} records but {len(predictions)} predictions")
    em, mc = [], []
    for rec, pred in zip(records, predictions):
        if rec.is_mc:
            ref = answer_letter(rec.answer, rec.choices)
            got = predicted_letter(pred, rec.choices)
            ok = ref is not None and got == ref
            mc.append(ok)
            em.append(ok)
        else:
            em.append(exact_match(pred, rec.answer))
    return {"n": len(records), "exact_match": float(np.mean(em)) if em else None,
            "mc_accuracy": float(np.mean(mc)) if mc else None, "n_mc": len(mc)}


# ---- media ---------------------------------------------------------------------------------------------------------
def load_image(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def load_video(path: str, num_frames: int = 8) -> np.ndarray:
    """``num_frames`` frames spread evenly over the clip, ``[T, H, W, 3]`` uint8 (PyAV)."""
    av = require("av")

    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"no video frames in {path!r}")
    idx = np.linspace(0, len(frames) - 1, num=min(num_frames, len(frames))).round().astype(int)
    return np.stack([frames[i] for i in idx])


# ---- running -------------------------------------------------------------------------------------------------------
def _decode(processor: Any, ids: torch.Tensor) -> str:
    tok = getattr(processor, "tokenizer", processor)
    return tok.decode(ids, skip_special_tokens=True).strip()


def predict(model: torch.nn.Module, processor: Any, rec: Record, *, compressor: Any = None, new_tokens: int = 16,
            num_frames: int = 8) -> str:
    from .inputs import processor_inputs

    if rec.video is not None:
        inputs = processor_inputs(processor, None, prompt_for(rec), video=load_video(rec.video, num_frames))
    else:
        inputs = processor_inputs(processor, load_image(rec.image), prompt_for(rec))
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = {k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev)) if isinstance(v, torch.Tensor) else v
              for k, v in inputs.items()}
    gen = {"max_new_tokens": new_tokens, "do_sample": False}
    pad = getattr(getattr(processor, "tokenizer", processor), "pad_token_id", None)
    if pad is not None:
        gen["pad_token_id"] = pad
    with torch.no_grad():
        if compressor is not None:
            with compressor(model):
                out = model.generate(**inputs, **gen)
        else:
            out = model.generate(**inputs, **gen)
    return _decode(processor, out[0, inputs["input_ids"].shape[1]:])


def evaluate(model: torch.nn.Module, processor: Any, records: Sequence[Record], *, compressor: Any = None,
             new_tokens: int = 16, num_frames: int = 8) -> dict[str, Any]:
    """Predictions and metrics of ``model`` (optionally compressed) on ``records``."""
    preds = [predict(model, processor, r, compressor=compressor, new_tokens=new_tokens, num_frames=num_frames)
             for r in records]
    return {**score(records, preds), "predictions": preds}


def run_task_sweep(built: Any, path: str, methods: Sequence[tuple[str, type]], retains: Sequence[float], *,
                   limit: int | None = None, rank: int = 0, world: int = 1, new_tokens: int = 16
                   ) -> list[dict[str, Any]]:
    """Accuracy of the uncompressed model and of every (method, retain) on a task file; this rank's share."""
    if getattr(built, "processor", None) is None:
        raise ValueError("--task needs a model with a processor (a local checkpoint directory, or the tiny preset)")
    records = load_task(path, limit=limit)
    items: list[tuple[str, float, type | None]] = [("none", 1.0, None)]
    items += [(n, float(r), c) for n, c in methods for r in retains]
    rows = []
    for name, r, cls in items[rank::world]:
        res = evaluate(built.model, built.processor, records, compressor=cls(retain=r) if cls else None,
                       new_tokens=new_tokens)
        rows.append({"method": name, "retain": r, "task": os.path.basename(path), **res})
    return rows
