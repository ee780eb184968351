"""Shared by the vLLM tests: the engine environment, prompts, media and the HF path on the same checkpoint."""

from __future__ import annotations

import gc
import os
from typing import Any

import numpy as np
import torch

ENV = dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1",
           VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="2", VLLM_ENABLE_V1_MULTIPROCESSING="0",
           VLLM_ALLOW_INSECURE_SERIALIZATION="1")
IMAGE_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PROMPT = "<|vision_start|><|video_pad|><|vision_end|>"
FPS = 2.0


def set_env(tmp: str) -> None:
    os.environ.update(ENV, VLLM_CACHE_ROOT=os.path.join(tmp, "vllm_cache"), HF_HOME=os.path.join(tmp, "hf_home"))


def chat(media: str, text: str = "describe the picture") -> str:
    return f"<|im_start|>user\n{media}{text}<|im_end|>\n<|im_start|>assistant\n"


def video_item(frames: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """A clip for vLLM's Qwen-VL parser: frames with the metadata its processor needs (no sampling: all frames)."""
    t = int(frames.shape[0])
    return frames, {"total_num_frames": t, "fps": FPS, "duration": t / FPS, "frames_indices": list(range(t)),
                    "video_backend": "numpy", "do_sample_frames": False}


def engine(path: str, overrides: dict[str, Any] | None = None, **kwargs: Any):
    from vllm import LLM

    args = dict(model=str(path), max_model_len=1024, enforce_eager=True, dtype="float32", seed=0,
                limit_mm_per_prompt={"image": 3, "video": 1}, hf_overrides=overrides)
    args.update(kwargs)
    return LLM(**args)


def close(llm: Any) -> None:
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


def greedy(max_tokens: int = 8):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1)


def kept(llm: Any) -> list[tuple[str, list[int]]]:
    """The ``(modality, kept indices)`` the engine's tokenzip model recorded, oldest first."""
    return [(m, i.tolist()) for m, i in llm.apply_model(_kept)[0]]


def _kept(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(model.tokenzip_kept)


def clear_kept(llm: Any) -> None:
    llm.apply_model(_clear)


def _clear(model: torch.nn.Module) -> None:
    model.tokenzip_kept.clear()


def generate(llm: Any, requests: list[tuple[str, dict[str, Any]]], tag: str = "run") -> list[Any]:
    """Greedy outputs; ``tag`` names the media (``multi_modal_uuids``): vLLM shares encoder outputs between requests
    whose media have the same identity, so a new tag makes the engine encode (and compress) again."""
    return llm.generate([{"prompt": p, "multi_modal_data": d, "multi_modal_uuids": uuids(d, f"{tag}-{i}")}
                         for i, (p, d) in enumerate(requests)], greedy())


def logprobs(out: Any) -> list[float]:
    """The chosen token's log-probability at each generated step."""
    return [next(iter(d.values())).logprob for d in out.outputs[0].logprobs]


def media(data: dict[str, Any]) -> tuple[list | None, list | None]:
    """``(images, videos)`` lists of a request's ``multi_modal_data`` for the HF processor."""
    images = data.get("image")
    images = None if images is None else (images if isinstance(images, list) else [images])
    return images, ([data["video"]] if "video" in data else None)


def uuids(data: dict[str, Any], tag: str) -> dict[str, list[str]]:
    """``multi_modal_uuids`` naming each item of ``data`` after ``tag``."""
    return {m: [f"{tag}-{m}-{j}" for j in range(len(v) if isinstance(v, list) else 1)] for m, v in data.items()}


def runs(prompt_ids: list[int], token_id: int) -> list[int]:
    """Lengths of the runs of ``token_id`` in ``prompt_ids`` (one per media item)."""
    out, n = [], 0
    for t in list(prompt_ids) + [None]:
        if t == token_id:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


def hf_inputs(path: str, prompt: str, images: list | None = None, videos: list | None = None) -> dict[str, Any]:
    """The HF processor's inputs for ``prompt`` (the same processor vLLM runs)."""
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    proc = AutoProcessor.from_pretrained(path)
    kw: dict[str, Any] = {}
    if images:
        kw["images"] = images
    if videos:
        kw["videos"] = [f for f, _ in videos]
        kw["video_metadata"] = [VideoMetadata(**{k: v for k, v in m.items() if k != "do_sample_frames"})
                                for _, m in videos]
        kw["do_sample_frames"] = False
    return dict(proc(text=[prompt], return_tensors="pt", **kw))


def hf_model(path: str, arch: str = "qwen2_5_vl") -> torch.nn.Module:
    import transformers as tf

    cls = {"qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration, "qwen2_vl": tf.Qwen2VLForConditionalGeneration,
           "qwen3_vl": tf.Qwen3VLForConditionalGeneration}[arch]
    return cls.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="sdpa").eval()


def hf_generate(model: torch.nn.Module, inputs: dict[str, Any], method: Any = None, max_new_tokens: int = 8
                ) -> tuple[list[int], dict[str, list[list[int]]]]:
    """Greedy tokens of the HF path (under ``method`` when given) and, per modality, each item's kept indices."""
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        if method is None:
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            return out[0, n:].tolist(), {}
        with method(model):
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, n:].tolist(), {m: [it.index.tolist() for it in ms.items] for m, ms in method.last_stats[0].items()}


def by_modality(kept_items: list[tuple[str, list[int]]]) -> dict[str, list[list[int]]]:
    out: dict[str, list[list[int]]] = {}
    for modality, index in kept_items:
        out.setdefault(modality, []).append(index)
    return out
