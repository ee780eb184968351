"""Time to first token of one plain ``generate()`` call (the CLI's ``run`` and the demo's timing table; the bench's
stage-split timer is :mod:`tokenzip.bench.instrument`)."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import torch


def language_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder stack that reads the media tokens, as the model's adapter names it (None: no adapter)."""
    from ..adapters import adapter_for

    try:
        return adapter_for(model).parts().language_model
    except TypeError:  # a model tokenzip has no adapter for: time it, but its prefill length is unknown
        return None


class FirstTokenStreamer:
    """generate() streamer that records when the first new token arrives (the prompt is put first)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.first: float | None = None
        self.cpu_first: float | None = None
        self.prompt_seen = False

    def restart(self) -> None:
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

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
    streamer = FirstTokenStreamer()
    try:
        with (compressor(model) if compressor is not None else nullcontext()), torch.no_grad():
            streamer.restart()
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
            total = time.perf_counter() - streamer.start
    finally:
        if handle is not None:
            handle.remove()
    ttft = (streamer.first or time.perf_counter()) - streamer.start
    cpu = (streamer.cpu_first or time.process_time()) - streamer.cpu_start
    seq = out if isinstance(out, torch.Tensor) else out.sequences
    return {"ttft": ttft, "cpu": cpu, "total": total, "prefill": seen[0] if seen else None,
            "ids": seq[0, inputs["input_ids"].shape[1]:] if "input_ids" in inputs else seq[0]}  # Whisper: no prompt


def best_generate(model: Any, inputs: dict[str, Any], compressor: Any = None, repeats: int = 3,
                  max_new_tokens: int = 1) -> dict[str, Any]:
    """``timed_generate`` ``repeats`` times; times are the minimum over the runs (robust to other processes on a
    shared machine), the other fields are from the last run."""
    runs = [timed_generate(model, inputs, compressor, max_new_tokens) for _ in range(repeats)]
    return best_of(runs)


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest times of several :func:`timed_generate` results, the other fields of the last one."""
    return {**runs[-1], "ttft": min(r["ttft"] for r in runs), "cpu": min(r["cpu"] for r in runs),
            "total": min(r["total"] for r in runs)}


__all__ = ["FirstTokenStreamer", "best_generate", "best_of", "language_model", "timed_generate"]
