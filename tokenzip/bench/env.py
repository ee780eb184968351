"""The software and hardware a sweep ran on (recorded in every row)."""

from __future__ import annotations

import platform
from typing import Any

import torch

from .config import BenchConfig
from .presets import Built


def environment(built: Built, cfg: BenchConfig, world: int) -> dict[str, Any]:
    import transformers

    from .. import __version__

    if torch.device(cfg.device).type == "cuda":
        device_name = torch.cuda.get_device_name(torch.device(cfg.device))
    else:
        device_name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        device_name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenzip": __version__,
            "python": platform.python_version(), "platform": platform.platform(), "device": cfg.device,
            "device_name": device_name, "threads": torch.get_num_threads(), "dtype": str(cfg.dtype),
            "attn_implementation": getattr(built.model.config, "_attn_implementation", cfg.attn),
            "world_size": world, "preset": built.preset, "model_class": type(built.model).__name__,
            "layers_built": built.layers_built, "layers_full": built.layers_full, "new_tokens": cfg.new_tokens,
            "repeats": cfg.repeats, "warmup": cfg.warmup, "point_warmup": cfg.point_warmup}
