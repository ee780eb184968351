"""Run any transformer encoder's layers with token compression between them (stage ``"encoder"``).

An adapter describes its encoder once (:class:`EncoderSpec`); the runner knows nothing else about the model. It runs
the layers up to a cut, hands the hidden states to a compression step, and runs the next layers on the kept/merged
tokens, carrying each token's ``size`` (how many input tokens it stands for) and ``source`` (which output slot each
input token went to, ToMe's source tracking) across cuts. Layers after a merge get ToMe's proportional attention
("Token Merging: Your ViT But Faster", Bolya et al., arXiv:2210.09461): ``log(size)`` of each key is added to the
attention logits, passed to the layer as an additive float mask ``[B, 1, 1, n]`` — the form SDPA takes, so the
model keeps its attention kernel.

One cut (``cuts=(L,)``) compresses between layers ``L - 1`` and ``L``. A schedule (``cuts=(l1, l2, ...)``, increasing)
compresses after each listed layer count, ToMe/AuroraCap style; the counts to reach come from
:func:`schedule_counts` (a constant keep ratio from ``N`` to the budget, exactly the budget at the last cut) or
:func:`constant_r_counts` (ToMe's constant number removed per cut). Layer forms that need the encoder's depth
("every", ``("last", k)``, negative ints) are resolved by :func:`resolve_layers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import ops
from ..output import CompressOutput


def call_layer(layer: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The usual transformers encoder layer call, ``layer(hidden_states, attention_mask)``: Whisper, CLIP, SigLIP
    and DINOv2 layers add ``mask`` to their self-attention logits (SDPA and eager alike); some return a tuple."""
    out = layer(hidden, mask)
    return out[0] if isinstance(out, tuple) else out


@dataclass(frozen=True)
class EncoderSpec:
    """What an adapter tells the runner about its encoder.

    embed:      model input -> the first layer's input hidden states ``[B, N, D]``
    layers:     the transformer layers, in order
    run_layer:  ``(layer, hidden, mask)`` -> the layer's output hidden states; ``mask`` is None or an additive float
                attention mask ``[B, 1, 1, n]`` (proportional attention) the layer must add to its logits
    final_norm: applied after the last layer (None: none)
    attention:  layer -> the module whose input and q/k projections give that layer's attention signals
    """

    embed: Callable[[torch.Tensor], torch.Tensor]
    layers: Sequence[torch.nn.Module]
    run_layer: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor] = call_layer
    final_norm: torch.nn.Module | None = None
    attention: Callable[[torch.nn.Module], torch.nn.Module] = lambda layer: layer.self_attn


@dataclass(frozen=True)
class CompressStep:
    """The compression a schedule applies at its cuts before the last (the last goes through the patch as usual):
    ``compress(tokens [1, n, D], k, layout, signals) -> CompressOutput`` and ``count(n)``, the budget for ``n``
    input tokens (the count the encoder's output must have). ``schedule`` names how the counts go from ``n`` to
    the budget over the cuts (:data:`SCHEDULES`); adapters ask :meth:`counts`."""

    compress: Callable[[torch.Tensor, int, ops.Layout, dict[str, torch.Tensor]], CompressOutput]
    count: Callable[[int], int]
    schedule: str = "ratio"
    # the modalities the method compresses (None: any); an adapter whose items mix modalities compresses the others
    # at no cut (the patch passes them whole at the last one)
    modalities: tuple[str, ...] | None = None

    def __call__(self, tokens: torch.Tensor, k: int, layout: ops.Layout,
                 signals: dict[str, torch.Tensor]) -> CompressOutput:
        return self.compress(tokens, k, layout, signals)

    def counts(self, n: int, cuts: int) -> list[int]:
        """The token count after each of ``cuts`` cuts for ``n`` input tokens (the last is ``count(n)``)."""
        return SCHEDULES[self.schedule](n, self.count(n), cuts)


def check_cuts(cuts: int | Sequence[int], num_layers: int, first: int = 1) -> tuple[int, ...]:
    """``cuts`` as an increasing tuple of layer counts in ``[first, num_layers - 1]`` (a ValueError names the range).
    ``first=0`` is for an adapter that can also cut before the first layer (cut 0: right after the embedding step,
    e.g. Qwen-VL's patch embedding, where its units are still the input patches)."""
    if first not in (0, 1):
        raise ValueError(f"first must be 0 or 1, got {first!r}")
    seq = (cuts,) if isinstance(cuts, int) and not isinstance(cuts, bool) else cuts
    ok = isinstance(seq, (tuple, list)) and len(seq) > 0 and all(
        isinstance(c, int) and not isinstance(c, bool) and first <= c <= num_layers - 1 for c in seq)
    if not ok or list(seq) != sorted(set(seq)):
        zero = " (cut 0, before the first layer, is not supported by this adapter)" if first == 1 and (
            cuts == 0 or isinstance(cuts, (tuple, list)) and 0 in cuts) else ""
        raise ValueError(f"layer must be an int in [{first}, {num_layers - 1}] or an increasing sequence of such ints "
                         f"for this encoder ({num_layers} layers; compress its output with the method itself), got "
                         f"{cuts!r}{zero}")
    return tuple(seq)


def schedule_counts(n: int, k: int, cuts: int) -> list[int]:
    """Token counts after each of ``cuts`` compression steps going from ``n`` to exactly ``k`` with a constant keep
    ratio ``(k / n) ** (1 / cuts)`` (rounded half up, non-increasing, never below ``k``, last == ``k``)."""
    if cuts < 1:
        raise ValueError(f"cuts must be >= 1, got {cuts}")
    if k >= n:
        return [n] * cuts
    ratio = (k / n) ** (1.0 / cuts)
    out, prev = [], n
    for s in range(1, cuts):
        prev = min(prev, max(k, math.floor(n * ratio ** s + 0.5)))
        out.append(prev)
    return out + [k]


def constant_r_counts(n: int, k: int, cuts: int) -> list[int]:
    """Token counts after each of ``cuts`` steps that each remove the same number ``r`` of tokens, ToMe's schedule
    ("Token Merging: Your ViT But Faster", arXiv:2210.09461, a constant ``r`` per block), with ``r = (n - k) / cuts``:
    when that does not divide, the first ``(n - k) % cuts`` steps remove one more, so the last count is exactly
    ``k``."""
    if cuts < 1:
        raise ValueError(f"cuts must be >= 1, got {cuts}")
    if k >= n:
        return [n] * cuts
    r, extra = divmod(n - k, cuts)
    out, count = [], n
    for s in range(cuts):
        count -= r + (1 if s < extra else 0)
        out.append(count)
    return out


# how a schedule's counts go from the N input tokens to the budget: a constant keep ratio, or ToMe's constant r
SCHEDULES: dict[str, Callable[[int, int, int], list[int]]] = {"ratio": schedule_counts,
                                                               "constant_r": constant_r_counts}

# the layer forms of tz.InEncoder(method, layer=...), for error messages
LAYER_FORMS = ("an int >= 0 (the number of encoder layers run before the cut; 0: before the first layer, where the "
               "adapter supports it), a negative int -j (cut before the "
               "j-th last layer), an increasing sequence of such ints (a schedule), \"every\" or \"all\" (a cut "
               "after every layer that leaves one after it), or (\"last\", k) (cuts before each of the last k "
               "layers)")


def check_layer_form(layer: object) -> int | str | tuple:
    """``layer`` in one of the :data:`LAYER_FORMS`, normalised (a list becomes a tuple, "all" becomes "every"); the
    encoder's depth is not needed for this check (ranges are checked by :func:`resolve_layers`)."""

    def is_int(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if is_int(layer):
        return layer
    if isinstance(layer, str) and layer in ("every", "all"):
        return "every"
    if isinstance(layer, (tuple, list)) and len(layer) == 2 and layer[0] == "last":
        if is_int(layer[1]) and layer[1] >= 1:
            return ("last", layer[1])
        raise ValueError(f"layer=(\"last\", k) needs an int k >= 1 (the number of last layers to cut before), got "
                         f"{layer!r}")
    if isinstance(layer, (tuple, list)) and layer and all(is_int(c) for c in layer):
        positive = [c for c in layer if c >= 0]
        negative = [c for c in layer if c < 0]
        if positive == sorted(set(positive)) and negative == sorted(set(negative)) and \
                list(layer) == positive + negative:
            return tuple(layer)
    raise ValueError(f"layer must be {LAYER_FORMS}; got {layer!r}")


def resolve_layers(layer: int | str | tuple, depth: int) -> tuple[int, ...]:
    """The cuts (layer counts in ``[0, depth - 1]``, increasing) that the layer form ``layer`` names for an encoder
    that runs ``depth`` layers. A ValueError names the valid range. Cut 0 (before the first layer) is only ever named
    explicitly; whether the adapter supports it is its ``set_encoder_layer``'s check (:func:`check_cuts`)."""
    form = check_layer_form(layer)
    if depth < 2:
        raise ValueError(f"this encoder runs {depth} layer(s): there is no cut that leaves a layer after it")
    if form == "every":
        return tuple(range(1, depth))
    if isinstance(form, tuple) and form[0] == "last":
        k = form[1]
        if k > depth - 1:
            raise ValueError(f"layer=(\"last\", k) needs k in [1, {depth - 1}] for this encoder ({depth} layers), "
                             f"got k={k}")
        return tuple(range(depth - k, depth))
    seq = form if isinstance(form, tuple) else (form,)
    cuts = tuple(c if c >= 0 else depth + c for c in seq)
    in_range = all((0 if c >= 0 else 1) <= cut <= depth - 1 for c, cut in zip(seq, cuts))
    if not in_range or list(cuts) != sorted(set(cuts)):
        raise ValueError(f"layer must name cuts in [1, {depth - 1}] (or [-{depth - 1}, -1] counted from the end), or "
                         f"0 (before the first layer, where the adapter supports it), increasing, for this encoder "
                         f"({depth} layers; compress its output with the method itself), got {layer!r}")
    return cuts


def layer_token_counts(n: int, k: int, cuts: Sequence[int], depth: int, schedule: str = "ratio") -> list[int]:
    """Tokens each of the ``depth`` encoder layers runs on when ``n`` input tokens are compressed to ``k`` at
    ``cuts`` (a layer after cut ``c`` sees that cut's count), not counting tokens the adapter keeps aside (a [CLS]
    token): the input of an encoder-FLOPs estimate."""
    counts = SCHEDULES[schedule](n, k, len(cuts))
    out, current, j = [], n, 0
    for layer in range(depth):
        while j < len(cuts) and cuts[j] <= layer:
            current = counts[j]
            j += 1
        out.append(current)
    return out


@dataclass
class MergedTokens:
    """Hidden states ``[B, n, D]`` between encoder layers, with ``size`` ``[B, n]`` (input tokens per token, float)
    and ``source`` ``[B, N]`` (each input token's slot, -1 when dropped)."""

    hidden: torch.Tensor
    size: torch.Tensor
    source: torch.Tensor

    @classmethod
    def start(cls, hidden: torch.Tensor) -> "MergedTokens":
        b, n, _ = hidden.shape
        return cls(hidden, torch.ones(b, n, device=hidden.device),
                   torch.arange(n, device=hidden.device).expand(b, -1).clone())

    def after(self, outputs: Sequence[CompressOutput]) -> "MergedTokens":
        """The state after one compression step (one ``[1, k, D]`` output per batch row, equal ``k``). A group of
        more than one token that already carries sizes is re-averaged with them (ToMe's ``merge_wavg``), so a token
        standing for ``s`` inputs counts ``s`` times; groups of one keep the method's token."""
        counts = {out.tokens.shape[1] for out in outputs}
        if len(counts) != 1:
            raise RuntimeError(f"encoder rows were compressed to different counts {sorted(counts)}")
        hidden = torch.cat([out.tokens for out in outputs], dim=0)
        step = torch.cat([out.source for out in outputs], dim=0)  # [B, n] current slot -> new slot
        size = ops.merged_size(step, hidden.shape[1], self.size)
        if bool((self.size != 1).any()):
            members = ops.merged_size(step, hidden.shape[1])
            wavg = ops.merge(self.hidden, step, hidden.shape[1], weights=self.size).tokens
            # ops.merge orders groups by first member; put them back in the method's slot order
            first = torch.full(hidden.shape[:2], step.shape[1], dtype=torch.long, device=step.device)
            first = first.scatter_reduce(1, step.clamp(min=0), torch.where(
                step >= 0, torch.arange(step.shape[1], device=step.device), step.shape[1]), reduce="amin")
            rank = torch.argsort(torch.argsort(first, dim=-1), dim=-1)
            wavg = torch.gather(wavg, 1, rank.unsqueeze(-1).expand_as(wavg))
            hidden = torch.where((members > 1).unsqueeze(-1), wavg.to(hidden.dtype), hidden)
        return MergedTokens(hidden, size, ops.compose_source(self.source, step))

    def attention_bias(self) -> torch.Tensor | None:
        """``[B, 1, 1, n]`` additive mask ``log(size)`` (proportional attention), None when every size is 1."""
        if not bool((self.size != 1).any()):
            return None
        return ops.size_bias(self.size).to(self.hidden.dtype)


class EncoderRunner:
    """Runs the layers of an :class:`EncoderSpec` in spans, between cuts."""

    def __init__(self, spec: EncoderSpec, cuts: int | Sequence[int]):
        self.spec = spec
        self.cuts = check_cuts(cuts, len(spec.layers))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec.embed(x)

    def span_attention(self, stop: int) -> torch.nn.Module:
        """The attention module of layer ``stop - 1``: the one that made the tokens a cut after ``stop`` sees."""
        return self.spec.attention(self.spec.layers[stop - 1])

    def run(self, hidden: torch.Tensor, start: int, stop: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Layers ``start`` ... ``stop - 1`` on ``hidden`` with the additive attention ``mask`` (or None)."""
        for layer in self.spec.layers[start:stop]:
            hidden = self.spec.run_layer(layer, hidden, mask)
        return hidden

    def finish(self, state: MergedTokens, proportional: bool = True) -> torch.Tensor:
        """The layers after the last cut (with proportional attention unless ``proportional`` is False) and the
        final norm."""
        mask = state.attention_bias() if proportional else None
        hidden = self.run(state.hidden, self.cuts[-1], len(self.spec.layers), mask)
        return hidden if self.spec.final_norm is None else self.spec.final_norm(hidden)


def padded_rows(rows: Sequence[torch.Tensor], sizes: Sequence[torch.Tensor | None]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token rows of different lengths ``[n_r, D]`` (each with its token sizes ``[n_r]``, None: all 1) as one batch
    ``[R, n, D]`` padded at the end, and the one additive attention mask ``[R, 1, 1, n]`` it needs: ``log(size)`` on
    real keys (ToMe's proportional attention) and the dtype's minimum on padding keys (SDPA and eager take it
    alike). The mask is None when no row is padded and every size is 1, so such rows run exactly as unmasked."""
    if not rows:
        raise ValueError("padded_rows needs at least one row")
    n = max(int(r.shape[0]) for r in rows)
    if all(int(r.shape[0]) == n for r in rows) and all(s is None or bool((s == 1).all()) for s in sizes):
        return torch.stack(list(rows)), None
    first = rows[0]
    hidden = first.new_zeros(len(rows), n, first.shape[-1])
    bias = torch.full((len(rows), n), torch.finfo(first.dtype).min, dtype=first.dtype, device=first.device)
    for r, (row, size) in enumerate(zip(rows, sizes)):
        hidden[r, : row.shape[0]] = row
        bias[r, : row.shape[0]] = 0.0 if size is None else size.float().clamp(min=1).log().to(first.dtype)
    return hidden, bias[:, None, None, :]
