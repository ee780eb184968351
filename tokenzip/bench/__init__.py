"""``tokenzip bench``: honest efficiency and quality measurement of compression methods.

    from tokenzip.bench import BenchConfig, run_bench
    run_bench(BenchConfig(model="llava-ov-0.5b", methods=["visionzip", "random"], retain=[0.5, 0.25, 0.1],
                          out="bench_out"))

Modules, top-down: ``cli`` (the command) -> ``sweep`` (methods x budgets, ranks, outputs) -> ``measure`` (one point:
method, oracle and interleaved baseline calls; ``replay``: the oracle of encoder-stage methods) -> ``instrument``
(stage timers of one call) and ``flops``; ``specs`` (method specs ``NAME@encoderL``, shared by every sweep and the CLI);
``derive`` (columns comparing rows), ``env`` (software/hardware), ``report`` (tables, plots, report.md),
``config`` (BenchConfig). Inputs and models: ``presets`` (real architectures offline), ``inputs`` (processor
inputs), ``first_token`` (time to first token of a plain generate, for the CLI and the demo). Quality: ``fidelity``
(DINOv2 features; real clips per frame with ``--video``), ``events`` (event recall: does a 2-frame event of a
synthetic clip keep a token), ``tasks`` (VQA accuracy from local files), ``audio`` (Whisper WER on real speech).
``dist``: torchrun.
"""

from .config import TIMING_FIELDS, BenchConfig
from .derive import finalize
from .presets import Built, build, presets
from .sweep import run_bench

__all__ = ["TIMING_FIELDS", "BenchConfig", "Built", "build", "finalize", "presets", "run_bench"]
