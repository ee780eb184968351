"""``tokenzip bench``: honest efficiency and quality measurement of compression methods.

    from tokenzip.bench import BenchConfig, run_bench
    run_bench(BenchConfig(model="llava-ov-0.5b", methods=["visionzip", "random"], retain=[0.5, 0.25, 0.1],
                          out="bench_out"))

See ``runner`` (what is measured), ``presets`` (real architectures offline), ``fidelity`` (DINOv2 quality),
``tasks`` (VQA accuracy from local files) and ``dist`` (torchrun).
"""

from .presets import Built, build, presets
from .runner import TIMING_FIELDS, BenchConfig, finalize, run_bench

__all__ = ["TIMING_FIELDS", "BenchConfig", "Built", "build", "finalize", "presets", "run_bench"]
