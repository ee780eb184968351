"""The signals an adapter (or the LLM stage) can hand to a method, each declared once, here.

A signal is one tensor per item, batched as ``[B, ...]`` by :meth:`Compressor.compress`. Its ``dims`` name its
axes: ``B`` batch, ``N`` the item's tokens (a per-token signal: ``dims[1] == "N"`` is checked against the tokens),
``T`` text tokens, and anything else is a free width. Adding a signal = one :func:`declare` call below (or in an
extension module), the adapters that can produce it list it in their ``signals``, and methods name it in
``requires`` / ``optional``; ``Compressor.compress`` and the patch validate against this table, and the test-suite's
synthetic generator builds it from ``dims`` and ``kind``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("probability", "real", "mask")


@dataclass(frozen=True)
class Signal:
    name: str
    dims: tuple[str, ...]  # e.g. ("B", "N") or ("B", "T", "D")
    kind: str  # "probability" (non-negative, rows of a distribution), "real", or "mask" (bool)
    meaning: str

    @property
    def per_token(self) -> bool:
        """Whether axis 1 runs over the item's tokens (checked against ``tokens.shape[1]``)."""
        return len(self.dims) > 1 and self.dims[1] == "N"

    def check(self, value: torch.Tensor, batch: int, n: int) -> None:
        """A clear ValueError when ``value`` does not fit this signal for ``batch`` items of ``n`` tokens."""
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"signal {self.name} must be a tensor, got {type(value).__name__}")
        if self.kind == "mask" and value.dtype != torch.bool:
            raise TypeError(f"signal {self.name} is a mask: it must be a bool tensor, got {value.dtype}")
        if self.kind != "mask" and not value.is_floating_point():
            raise TypeError(f"signal {self.name} must be floating point, got {value.dtype}")
        if value.dim() != len(self.dims):
            raise ValueError(f"signal {self.name} must be [{', '.join(self.dims)}], got shape {tuple(value.shape)}")
        if value.shape[0] != batch:
            raise ValueError(f"signal {self.name} has batch {value.shape[0]}, tokens have {batch}")
        for axis, dim in enumerate(self.dims[1:], start=1):
            if dim == "N" and value.shape[axis] != n:
                raise ValueError(f"signal {self.name} has {value.shape[axis]} tokens on axis {axis}, tokens have {n}")


SIGNALS: dict[str, Signal] = {}


def declare(name: str, dims: tuple[str, ...], kind: str, meaning: str) -> Signal:
    """Register a signal (once: a second declaration of a name is an error)."""
    if name in SIGNALS:
        raise ValueError(f"signal {name!r} is already declared")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not dims or dims[0] != "B":
        raise ValueError(f"dims must start with the batch axis 'B', got {dims}")
    sig = Signal(name, tuple(dims), kind, meaning)
    SIGNALS[name] = sig
    return sig


# ---- produced by adapters, before the LLM: from the encoder, the projector and the prompt ---------------------------
declare("cls_attention", ("B", "N"), "probability",
        "attention the CLS token pays each token at the signal layer, mean over heads; for encoders without CLS, the "
        "mean attention each token receives from all tokens")
declare("keys", ("B", "N", "d"), "real", "that layer's keys, mean over heads (ToMe's similarity metric)")
declare("projected", ("B", "N", "D"), "real",
        "the tokens mapped into the LLM's embedding space (for text-guided methods)")
declare("text", ("B", "T", "D"), "real",
        "the prompt's text-token embeddings in the LLM's input space (at the LLM stage: the hidden states of the "
        "text tokens after the item at the pruning layer)")
declare("text_mask", ("B", "T"), "mask", "True at real text tokens of `text`")
declare("mid_attention", ("B", "N"), "probability",
        "the attention each token receives at the vision encoder's object-centric middle layer (3/8 of the depth, "
        "rounded half up, 1-based: HiPrune's layer 9 of CLIP ViT-L's 24), mean over all queries and heads")
declare("anyres_region", ("B", "N"), "real",
        "where each token of an AnyRes image comes from: 0 = the base (thumbnail) view, j >= 1 = crop j of the tiled "
        "grid, -1 = a newline marker (integers; where the model downscales the crop grid, a border token takes the "
        "nearest crop)")
declare("unit_pixels", ("B", "N", "c", "y", "x"), "real",
        "each token's input pixels, before any encoder layer: the ``y x x`` pixel block the token covers (Qwen-VL: the "
        "2x2 patches of its merge unit, 28 x 28 pixels), ``c`` = colour channels x temporal patch frames, values as "
        "the model receives them (the processor's normalisation); the blocks of a frame's ``(h, w)`` grid tile its "
        "image row-major (stage \"encoder\": a token stands at its representative unit)")
declare("speech", ("B", "N"), "probability",
        "probability in [0, 1] that each (audio) token's frame holds speech (VAD)")
# ---- produced by the LLM stage (tokenzip.llm), from the decoder layer before the pruning layer (with text, text_mask)
declare("last_attention", ("B", "N"), "probability",
        "attention the last real token pays each visual token, mean over heads")
declare("text_attention", ("B", "T", "N"), "probability",
        "the same for each real text token after the item (T rows, matching `text`)")
