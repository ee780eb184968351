"""Stage ``"llm"``: compressing visual tokens between the decoder layers of the LLM.

Pure parts: :mod:`.layout` (shortened padded layouts, masks), :mod:`.scores` (attention rows recomputed from a
layer's own q/k projections under SDPA), :mod:`.base` (:class:`LLMCompressor` and schedules). The thin hook layer
is :mod:`.hooks` (:class:`LLMRunner`, installed by :class:`tokenzip.patch.Patch` for LLM-stage methods), and
:mod:`.adapter` is what a model adapter adds (``LLMAccess`` mixin + ``llm_items``).

Design (see :mod:`.hooks` for details):

- Positions: kept tokens keep their ORIGINAL positions (cos/sin and position_ids are gathered, never renumbered;
  M-RoPE works because the per-token cos/sin are gathered). New tokens get the positions the stock model gives them
  (as if nothing had been dropped).
- Batching: samples may keep different numbers of tokens (per-item budgets, different item counts); each row of
  the shortened sequence is left-padded with masked filler slots to the longest row. The caller's padding is dropped
  at the first stage: later layers run on ``max`` over rows of the kept count, not on the padded width.
- Cache: a ``DynamicCache`` holds full-length K/V for layers before the first stage and shortened K/V after; the
  per-stage key-validity rows travel on the cache object, so decoding and later turns that continue the cache (no
  new media) build matching masks. Beam search / cache reordering, static caches and flash-attention are refused.
- Decode-time KV pruning (``LLMCompressor.decode_layer`` / ``decode_keep``, DyCoke's second stage): while decoding,
  visual entries leave the cache of the layers from ``decode_layer`` on (the tensors shrink); earlier layers keep
  all, so positions of new tokens are the stock model's.
- Output: logits keep the caller's sequence length; a dropped token's logits come from the hidden state it had when
  it was dropped (only the kept positions and the text are what the model computed on the short sequence).
"""

from .base import LLMCompressor, geometric_counts, stage_layers
from .hooks import LLMItem, LLMRunner
from .scores import attention_rows

__all__ = ["LLMCompressor", "LLMItem", "LLMRunner", "attention_rows", "geometric_counts", "stage_layers"]
