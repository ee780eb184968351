"""``tokenzip bench --engine vllm``: time to first token and throughput of vLLM serving a Qwen2-VL model, uncompressed
and compressed by one method, side by side in one run.

The model is the published Qwen2-VL-2B architecture (``tokenzip.bench.presets.qwen2_vl_2b_config``) with random
weights, saved with a locally made tokenizer and processor (tokenzip/vllm/checkpoint.py); ``layers=(vision, text)``
builds fewer blocks (every block of a stack has the same shape and cost). Each request is one 448x448 image (256
visual tokens uncompressed) and a short prompt; ``requests`` of them are sent at once (``LLM.generate`` with a list:
vLLM's continuous batching), each image distinct (``multi_modal_uuids``), after one warm-up request per engine.

* **TTFT (batch)**: wall time until every request has its first token (``max_tokens=1``), for the whole batch.
* **Throughput**: the same requests with ``new_tokens`` greedy tokens each (``ignore_eos``): requests/s and output
  tokens/s.
Timings are medians over ``repeats``. One engine at a time, built with the same arguments except ``hf_overrides``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import save, token_ids, tokenizer
from .config import overrides

SIDE = 448  # px: 32x32 patches of 14 px -> 256 visual tokens after the 2x2 merge


def build_checkpoint(path: Path, layers: tuple[int, int] | None, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from ..bench.presets import qwen2_vl_2b_config

    tok = tokenizer()
    spec = qwen2_vl_2b_config().to_dict()
    spec.update(token_ids(tok))
    text, vision = spec["text_config"], spec["vision_config"]
    text.update(eos_token_id=tok.eos_token_id, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))
    if layers is not None:
        vision["depth"] = layers[0]
        text.update(num_hidden_layers=layers[1], max_window_layers=layers[1])
        if text.get("layer_types"):
            text["layer_types"] = text["layer_types"][: layers[1]]
    cfg = type(qwen2_vl_2b_config())(**spec)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration._from_config(cfg, torch_dtype=torch.float32).eval()
    return save(path, model, tok, SIDE * SIDE, SIDE * SIDE)


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    base = np.stack([np.sin(x / (9 + seed % 5)), np.cos(y / 13), np.sin((x + y) / 17)], -1)
    return ((base * 0.4 + 0.5 + rng.normal(0, 0.1, base.shape)).clip(0, 1) * 255).astype(np.uint8)


def _timed(llm: Any, n: int, tag: str, max_tokens: int) -> tuple[float, int, list[int]]:
    from vllm import SamplingParams

    prompt = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>describe the picture<|im_end|>\n"
              "<|im_start|>assistant\n")
    reqs = [{"prompt": prompt, "multi_modal_data": {"image": _image(i)},
             "multi_modal_uuids": {"image": [f"{tag}-{i}"]}} for i in range(n)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(reqs, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    return wall, sum(len(o.outputs[0].token_ids) for o in outs), [len(o.prompt_token_ids) for o in outs]


def run(method: str, retain: float, requests: int = 8, new_tokens: int = 16, repeats: int = 3,
        layers: tuple[int, int] | None = (2, 2), out: str | Path = "bench_out", command: str = "") -> list[dict]:
    """Measure both engines; write OUT/vllm_bench.jsonl and OUT/vllm_bench.md; return the rows."""
    from vllm import LLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(Path(tmp) / "qwen2-vl-2b", layers)
        for label, ov in (("uncompressed", None), (f"{method} retain={retain}",
                                                   overrides(method, model=str(ckpt), retain=retain))):
            llm = LLM(model=str(ckpt), max_model_len=2048, enforce_eager=True, dtype="float32", seed=0,
                      limit_mm_per_prompt={"image": 1, "video": 0}, hf_overrides=ov)
            _timed(llm, 1, f"{label}-warmup", 2)
            ttft = [_timed(llm, requests, f"{label}-ttft-{r}", 1)[0] for r in range(repeats)]
            runs = [_timed(llm, requests, f"{label}-tput-{r}", new_tokens) for r in range(repeats)]
            wall = statistics.median(r[0] for r in runs)
            rows.append({"engine": "vllm", "config": label, "requests": requests, "new_tokens": new_tokens,
                         "prompt_tokens": runs[0][2][0], "ttft_batch_s": statistics.median(ttft),
                         "requests_per_s": requests / wall, "output_tokens_per_s": runs[0][1] / wall,
                         "layers": list(layers) if layers else "full"})
            core = getattr(llm.llm_engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            del llm
    with open(out / "vllm_bench.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    lines = [f"`{command}`" if command else "", "",
             "| config | prompt tokens | TTFT, batch of {n} (s) | requests/s | output tokens/s |".format(n=requests),
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['config']} | {r['prompt_tokens']} | {r['ttft_batch_s']:.2f} | {r['requests_per_s']:.2f} | "
              f"{r['output_tokens_per_s']:.1f} |" for r in rows]
    (out / "vllm_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows
