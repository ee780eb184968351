"""The encoder stage as a primitive: run a transformer encoder's layers with compression steps between them
(:mod:`tokenzip.encoder.runner`). Adapters describe their encoder with :class:`EncoderSpec`; nothing here knows a
model family or a method."""

from .runner import CompressStep, EncoderRunner, EncoderSpec, MergedTokens, check_cuts, schedule_counts

__all__ = ["CompressStep", "EncoderRunner", "EncoderSpec", "MergedTokens", "check_cuts", "schedule_counts"]
