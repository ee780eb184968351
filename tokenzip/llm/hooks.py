"""The thin hook layer that runs an :class:`LLMCompressor` inside a stock decoder-only LLM.

At prefill, before stage layer ``l`` (a forward pre-hook on decoder layer ``l``), every item keeps a subset of its
visual hidden states (or merged ones) and layers ``>= l`` run on the shortened sequence: the hook replaces
``hidden_states``, ``attention_mask`` (an explicit 4-D causal + padding mask for the shortened layout),
``position_embeddings`` (cos/sin gathered at the kept slots: **kept tokens keep their original positions**, M-RoPE
included) and ``position_ids``. The scores come from a pre-hook on layer ``l - 1``'s attention module that
recomputes only the needed attention rows (:func:`tokenzip.llm.scores.attention_rows`), so the model keeps
running SDPA. A pre-hook on the final norm writes the short sequence back into a full-length one (a dropped
token carries the hidden state it had when it was dropped), so logits keep the caller's sequence length.

The ``DynamicCache`` then holds full-length K/V for layers ``< l`` and shortened K/V for later layers; the state
needed to decode (each stage's key-validity row) is attached to the cache object. On later calls with that cache
(decoding steps, or a new user turn continuing it) the pre-hook of each shortened layer replaces the model's mask
(built for the full length) by one matching that layer's cache. Positions of new tokens are the model's own
(computed from the full-length layer-0 cache / the caller's mask), i.e. as if nothing had been dropped.

Multi-turn: a later ``generate()`` that continues the returned cache (the whole dialogue as ``input_ids`` and its
2-D mask, the cache as ``cache=``, or ``past_key_values=`` before transformers 5.24, no new media) keeps what the
first prefill kept: the selection was made once, for the first question, and the dropped visual tokens stay out of
layers ``>= l`` for every later turn; the new turn's tokens go into every layer. Media in a call that continues a
cache are refused (ValueError), as are beam search (the cache would be reordered), static/sliding caches and
flash-attention (no explicit 4-D mask). Hooks find the cache under either name (:mod:`tokenzip.compat`).

Decode-time KV pruning (a method whose ``decode_layer`` is not ``None``, e.g. DyCoke's second stage): prefill runs
the method's stages (DyCoke's has none; each stage must be at or before ``decode_layer``); at every later call that
continues the cache, hooks on the attention of layer ``decode_layer - 1`` recompute the current token's attention to
the cached keys of that layer (the kept entries, when a prefill stage shortened it) and ask the method which of each
item's remaining entries stay (``decode_keep``); the others are removed from the cache tensors of every layer
``>= decode_layer`` before those layers run in the same call (rows re-packed, the batch's padding dropped, masks
rebuilt). Layers before it keep every entry, so the layer-0 cache length and the caller's 2-D mask (from which
``generate()`` derives new positions) are those of the uncompressed model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .. import ops
from ..callstate import per_call
from ..compat import attention_seq_length, cache_from
from ..layout import Layout
from ..output import ItemStats, summarize
from . import slots as S
from .scores import attention_rows, separate_qk, softmax_rows
from .slots import StageContext

ATTENTION_SIGNALS = ("last_attention", "text_attention")
# what the runner hands to an LLM-stage method (tokenzip/signals.py); ``text`` holds hidden states at this stage
PRODUCED_SIGNALS = frozenset({*ATTENTION_SIGNALS, "text", "text_mask"})
STATE_ATTR = "_tokenzip_llm_state"
# decoder layer kinds the runner supports: attention layers, and linear-attention (recurrent) layers of hybrid LLMs
LAYER_KINDS = ("full_attention", "sliding_attention", "linear_attention")


@dataclass
class LLMItem:
    """One item's visual tokens in the LLM input sequence."""

    modality: str
    sample: int
    positions: torch.Tensor  # [n] ascending sequence positions
    grid: Layout | None = None  # the item's layout (tokenzip/layout.py)


@dataclass
class CacheState:
    """Attached to a cache that holds shortened layers: what decoding needs to build their masks."""

    owner: Any  # the runner that made it
    prefill_len: int
    groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (first layer, key valid [B, W])
    positions: list[torch.Tensor] = field(default_factory=list)  # per group: the original position of each key
    decode: Any = None  # a _DecodeState when the method prunes the KV cache while decoding

    def group_of(self, layer: int) -> int | None:
        g = None
        for i, (start, _) in enumerate(self.groups):
            if start <= layer:
                g = i
        return g


@dataclass
class _DecodeState:
    """Decode-time KV pruning: the cache of layers ``>= layer`` (one group) holds, in its first ``W`` columns, the
    prompt entries still alive: ``columns`` ``[B, W]`` the original position of each (``-1``: filler); the
    generated tokens follow. ``items``: ``(sample, n, alive)`` with ``alive`` the item's local token indices whose
    entries remain, ascending. ``history``: per pruning call, per item, the local indices kept (for stats/tests)."""

    layer: int
    positions: list[torch.Tensor]  # per item, its original sequence positions [n]
    items: list[tuple[int, int, torch.Tensor]]
    columns: torch.Tensor
    history: list[list[torch.Tensor]] = field(default_factory=list)


class _Track:
    """One item during a prefill run."""

    def __init__(self, item: LLMItem, plan: list[tuple[int, int]]):
        self.item = item
        self.n = int(item.positions.numel())
        self.plan = dict(plan)
        self.slots: torch.Tensor | None = None  # current slot indices
        self.source = torch.arange(self.n)  # original token -> current local index (-1 dropped)
        self.index = torch.arange(self.n)  # current local index -> representative original token
        self.stages: list[tuple[int, int]] = []
        self.stage_sources: list[torch.Tensor] = []
        self.memo: dict = {}  # the method's own state between this item's stages (StageContext.memo)


class _Run:
    def __init__(self, tracks: list[_Track], attn2d: torch.Tensor, stage_at: list[int]):
        self.tracks = tracks
        self.slots = S.full_slots(attn2d)
        self.prefill_len = attn2d.shape[1]
        self.stage_at = stage_at
        self.signals: dict[int, dict] = {}
        self.captured: dict[int, tuple] = {}  # stage layer -> (attention, its input, cos/sin, slots) (hybrid LLMs)
        self.full: torch.Tensor | None = None
        self.masks: dict[int | None, torch.Tensor] = {}  # sliding window (None: full attention) -> 4-D mask
        self.blocks: torch.Tensor | None = None  # [B, L] bidirectional block ids (Gemma 3's images), -1 outside
        self.pe_src: Any = None
        self.pe: Any = None
        self.state: CacheState | None = None
        self.changed = False
        self.mask2d = attn2d
        self.decode_past: Any = None  # the cache, when decode-time KV pruning follows this prefill


class LLMRunner:
    """Installs the hooks for one compressor on one model (through its adapter). What one call is doing (the items
    it hands over, the prefill being shortened, the decoding step) is per thread (tokenzip/callstate.py): calls in
    flight at once in several threads each see their own."""

    pending = per_call()  # list[LLMItem] | None: the items of the next prefill
    run = per_call()  # _Run | None: the prefill in progress
    step = per_call()  # (CacheState, masks) | None: a call that continues a shortened cache
    step_query = per_call()  # (x, position_embeddings) of the decode scoring layer's attention, this call
    step_mask2d = per_call()  # this call's 2-D mask, query count and cache (decode pruning)
    step_q = per_call(0)
    step_past = per_call()

    def __init__(self, compressor: Any, adapter: Any):
        self.c = compressor
        self.adapter = adapter
        self.lm = adapter.llm_model()
        self.layers = adapter.llm_layers()
        self.norm = adapter.llm_norm()
        self.impl = adapter.llm_attn_implementation()
        if self.impl not in ("sdpa", "eager"):
            raise ValueError(f"LLM-stage compression needs attn_implementation 'sdpa' or 'eager' (an explicit 4-D "
                             f"mask per layer); the model uses {self.impl!r}")
        kinds_of = getattr(adapter, "llm_layer_kinds", None)
        self.kinds = list(kinds_of()) if kinds_of is not None else ["full_attention"] * len(self.layers)
        if len(self.kinds) != len(self.layers) or not set(self.kinds) <= set(LAYER_KINDS):
            raise ValueError(f"LLM-stage compression supports decoders of {LAYER_KINDS} layers; this one has layer "
                             f"types {sorted(set(self.kinds))}")
        # per layer: its sliding window (None: full attention or linear). Shortened layers keep the window in
        # ORIGINAL positions (kept tokens keep theirs), as the uncompressed model measures it
        window = getattr(self.lm.config, "sliding_window", None)
        self.windows = [int(window) if kind == "sliding_attention" and window else None for kind in self.kinds]
        # the attention layers (full or sliding-window: they hold K/V and an attention matrix); on a hybrid decoder
        # the linear-attention layers interleaved with them are not
        self.attention_layers = [i for i, kind in enumerate(self.kinds) if kind != "linear_attention"]
        if not self.attention_layers:
            raise ValueError("LLM-stage compression needs at least one attention decoder layer")
        self.needs = compressor.signals_needed()
        self.handles: list[Any] = []
        self.decode_at = compressor.decode_layer(len(self.layers))
        if self.decode_at is not None:
            compressor.check_layer(self.decode_at, len(self.layers), "decode layer")
            if any(w is not None for w in self.windows):
                raise ValueError(f"{compressor.info.name}: decode-time KV pruning is not supported on decoders with "
                                 f"sliding-window layers")
        # the attention layer that scores decode-time pruning: layer decode_at - 1, or on a hybrid LLM the last
        # full-attention layer before decode_at (never pruned itself: its columns are the prompt's positions)
        self.decode_score = None if self.decode_at is None else self.score_layer(self.decode_at)

    # ---- install / remove ---------------------------------------------------------------------------------------
    def install(self) -> None:
        self.handles.append(self.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        self.handles.append(self.lm.register_forward_hook(self._lm_post, always_call=True))
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(self._layer_pre(i), with_kwargs=True))
            if self.kinds[i] != "linear_attention":
                attn = self.adapter.llm_attention(layer)
                self.handles.append(attn.register_forward_pre_hook(self._attn_pre(i), with_kwargs=True))
        self.handles.append(self.norm.register_forward_pre_hook(self._norm_pre))
        # model-specific steps that must follow the shortened sequence (Qwen3-VL's DeepStack): only the adapter knows
        # them; it returns handles with remove(), undone with the runner's own
        extra = getattr(self.adapter, "llm_runner_hooks", None)
        if extra is not None:
            self.handles.extend(extra(self))
        if self.decode_at is not None:
            if self.decode_score is None:
                raise ValueError(f"{self.c.info.name}: decode-time KV pruning from layer {self.decode_at} scores with "
                                 f"the attention of a layer before it, but layers 0-{self.decode_at - 1} of this "
                                 f"hybrid LLM are linear-attention layers; attention layers: {self.attention_layers}")
            attn = self.adapter.llm_attention(self.layers[self.decode_score])
            self.handles.append(attn.register_forward_pre_hook(self._decode_attn_pre, with_kwargs=True))
            self.handles.append(attn.register_forward_hook(self._decode_attn_post, with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.pending = None
        self.run = None
        self.step = None
        self.step_query, self.step_past = None, None

    def current_positions(self) -> torch.Tensor | None:
        """During a prefill whose sequence a stage has shortened: ``[B, W]`` the original sequence position each
        slot holds (``-1`` at filler slots); ``None`` while the layers run on the full sequence."""
        run = self.run
        if run is None or not run.changed:
            return None
        return run.slots.pos.masked_fill(run.slots.filler, -1)

    # ---- language-model level -----------------------------------------------------------------------------------
    def _lm_pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.run, self.step = None, None
        items, self.pending = self.pending, None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = args[0] if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point() else None
        ids = kwargs.get("input_ids")
        ref = embeds if embeds is not None else ids
        if ref is None:
            return
        b, q = ref.shape[0], ref.shape[1]
        past = cache_from(kwargs)
        past_len = self._past_length(past) if past is not None else 0
        mask = self.adapter.llm_padding_mask(kwargs)  # a model that prepares its decoder's masks keeps the 2-D one
        if mask is None:
            mask = torch.ones(b, past_len + q, dtype=torch.long, device=ref.device)
        if items:
            if past_len > 0:
                raise ValueError("LLM-stage compression: media in a call that continues a cache is not supported; "
                                 "start a new cache for new images")
            self._start_prefill(items, mask, past)
        elif past is not None and past_len > 0:
            state = getattr(past, STATE_ATTR, None)
            if state is not None:
                if state.owner is not self:
                    raise RuntimeError("this cache was shortened by another tokenzip compressor; continue it inside "
                                       "the same `with` block")
                self._start_step(state, mask, past, q)

    def _past_length(self, past: Any) -> int:
        """The tokens the uncompressed model would have cached: the first attention layer's count, plus what
        the stages removed from it when it is a shortened layer (``tokenzip.compat.attention_seq_length``)."""
        first = self.attention_layers[0]
        n = attention_seq_length(past, first)
        state = getattr(past, STATE_ATTR, None)
        g = state.group_of(first) if isinstance(state, CacheState) else None
        if g is not None:
            n += state.prefill_len - state.groups[g][1].shape[1]
        return n

    def score_layer(self, layer: int) -> int | None:
        """The attention layer whose rows score a stage before decoder layer ``layer``: ``layer - 1``, or on a hybrid
        decoder the last full-attention layer before ``layer`` (None: there is none)."""
        before = [i for i in self.attention_layers if i < layer]
        return before[-1] if before else None

    def _lm_post(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        run, self.run, self.step = self.run, None, None
        self.step_query, self.step_past = None, None
        if run is not None:
            if run.decode_past is not None:
                self._start_decode(run)
            self._record(run)

    def _start_decode(self, run: _Run) -> None:
        """At the end of a prefill with a cache, for decode-time KV pruning: the group of layers ``>= decode_at``
        (the last one; the last prefill stage's group split there, or the whole prompt when no stage ran) holds
        each item's entries still alive (those the stages kept), which decoding steps then prune."""
        past = run.decode_past
        if run.state is None:
            run.state = CacheState(self, run.prefill_len)
            setattr(past, STATE_ATTR, run.state)
        state = run.state
        if state.groups:
            start, valid = state.groups[-1]
            valid, pos = valid.clone(), state.positions[-1].clone()
        else:
            start, valid = None, run.mask2d.clone()
            pos = torch.arange(valid.shape[1], device=valid.device).expand(valid.shape[0], -1).clone()
        if start == self.decode_at:
            state.groups.pop()
            state.positions.pop()
        state.groups.append((self.decode_at, valid))
        state.positions.append(pos)
        state.decode = _DecodeState(
            self.decode_at, [t.item.positions.long().cpu() for t in run.tracks],
            [(t.item.sample, t.n, t.index.clone()) for t in run.tracks], pos.masked_fill(~valid, -1))

    def _start_prefill(self, items: list[LLMItem], mask: torch.Tensor, past: Any) -> None:
        num_layers = len(self.layers)
        tracks = [_Track(it, self.c.schedule(int(it.positions.numel()), num_layers)) for it in items]
        for t in tracks:
            prev = t.n
            for layer, count in sorted(t.plan.items()):
                if not 1 <= layer <= num_layers - 1 or not 0 <= count <= prev:
                    raise RuntimeError(f"{self.c.info.name}: bad schedule {sorted(t.plan.items())} for {t.n} tokens")
                prev = count
            t.plan = {layer: c for layer, c in t.plan.items() if c < t.n}  # stages that change nothing: skip
        stage_at = sorted({layer for t in tracks for layer in t.plan})
        if self.needs & set(ATTENTION_SIGNALS):
            for layer in stage_at:
                if self.score_layer(layer) is None:
                    raise ValueError(f"{self.c.info.name}: its stage before decoder layer {layer} scores with "
                                     f"attention, but layers 0-{layer - 1} of this hybrid LLM are linear-attention "
                                     f"layers (no attention to read); attention layers: "
                                     f"{self.attention_layers}, so stage layers from {self.attention_layers[0] + 1} on")
        run = _Run(tracks, mask.bool(), stage_at)
        run.blocks = self.adapter.llm_blocks(mask.shape[1])
        for t in tracks:
            t.slots = t.item.positions.to(mask.device).long()
            if not bool(mask[t.item.sample, t.slots].all()):
                raise ValueError("visual tokens fall on masked (padding) positions of attention_mask")
        if past is not None and stage_at:
            _require_dynamic(past)
        self.run = run
        if self.decode_at is not None and past is not None:
            if stage_at and max(stage_at) > self.decode_at:
                raise ValueError(f"{self.c.info.name}: decode-time KV pruning from layer {self.decode_at} needs every "
                                 f"prefill stage at or before it; stages at {stage_at}")
            _require_dynamic(past)
            run.decode_past = past  # the decode state is set up when prefill ends (the stages shape its cache)
        if not stage_at:  # identity: nothing to hook
            if run.decode_past is not None:
                self._start_decode(run)
            self._record(run)
            self.run = None

    def _start_step(self, state: CacheState, mask: torch.Tensor, past: Any, q: int) -> None:
        self.step_query = None
        masks: dict[int, dict[int | None, torch.Tensor]] = {}
        tail = mask[:, state.prefill_len:].bool()
        layers = getattr(past, "layers", None)
        for g, (start, valid) in enumerate(state.groups):
            if valid.shape[0] != mask.shape[0]:
                raise ValueError("LLM-stage compression: the batch changed since prefill (beam search or cache "
                                 "reordering is not supported)")
            expected = valid.shape[1] + tail.shape[1] - q
            end = state.groups[g + 1][0] if g + 1 < len(state.groups) else len(self.layers)
            # linear layers hold no K/V to count
            check = next((i for i in self.attention_layers if start <= i < end), None)
            if layers is not None and check is not None and check < len(layers) \
                    and attention_seq_length(past, check) != expected:
                raise RuntimeError(f"LLM-stage compression: layer {check} caches {attention_seq_length(past, check)} "
                                   f"tokens, expected {expected}; the cache was cropped or edited since prefill")
            masks[g] = self._step_masks(state, g, tail, q)
        self.step = (state, masks)
        self.step_mask2d, self.step_q, self.step_past = mask.bool(), q, past

    def _dtype(self) -> torch.dtype:
        return next(self.lm.parameters()).dtype

    def _prefill_masks(self, slots: S.Slots, blocks: torch.Tensor | None, dtype: torch.dtype
                       ) -> dict[int | None, torch.Tensor]:
        """The masks of the shortened prefill, per sliding window of the layers (None: full attention): causal in
        slot order over real keys, each bidirectional block attending to itself, and a sliding layer's reach in
        original positions (``AND(window, OR(causal, block))``, the composition transformers uses for Gemma 3)."""
        allowed = S.prefill_mask(slots.valid)
        if blocks is not None:
            allowed = allowed | S.block_overlay(slots, blocks)
        out = {}
        for window in set(self.windows):
            reach = S.window_limit(slots.pos, slots.pos, window)
            out[window] = S.to_implementation(allowed if reach is None else allowed & reach, self.impl, dtype)
        return out

    def _step_masks(self, state: CacheState, g: int, tail: torch.Tensor, q: int) -> dict[int | None, torch.Tensor]:
        """The masks of a call continuing the cache for group ``g``'s layers, per sliding window: its cached keys
        (``valid``) then this call's (``tail``, of which the last ``q`` are the queries). A sliding-window layer
        caches only its last ``window - 1`` keys (``DynamicSlidingWindowLayer``), so its mask keeps those columns;
        the window is measured in original positions (new tokens continue after the prefill)."""
        start, valid = state.groups[g]
        key_valid = torch.cat([valid, tail], dim=1)
        allowed = S.step_mask(key_valid, q)
        dtype = self._dtype()
        out: dict[int | None, torch.Tensor] = {}
        for window in set(self.windows[start:]):
            m = allowed
            if window is not None:
                new = state.prefill_len + torch.arange(tail.shape[1], device=valid.device)
                key_pos = torch.cat([state.positions[g].to(valid.device), new.expand(valid.shape[0], -1)], dim=1)
                m = (m & S.window_limit(key_pos[:, -q:], key_pos, window))[..., max(key_pos.shape[1] - q
                                                                                    - (window - 1), 0):]
            out[window] = S.to_implementation(m, self.impl, dtype)
        return out

    # ---- layer level --------------------------------------------------------------------------------------------
    def _attn_pre(self, i: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            run = self.run
            if run is None or not (self.needs & set(ATTENTION_SIGNALS)):
                return
            later = [k for k in run.stage_at if k > i + 1 and self.score_layer(k) == i]
            if (i + 1) not in run.stage_at and not later:
                return
            x = args[0] if args else kwargs["hidden_states"]
            pe = kwargs.get("position_embeddings")
            if pe is None:
                raise RuntimeError("the attention module got no position_embeddings; cannot recompute its scores")
            if (i + 1) in run.stage_at:
                with torch.no_grad():
                    run.signals[i + 1] = self._scores(run, module, x, pe, S.as_allowed(kwargs.get("attention_mask")))
            for k in later:  # hybrid LLM: a stage after linear layers reads this layer's attention (_captured_scores)
                run.captured[k] = (module, x.detach(), tuple(t.detach() for t in pe), run.slots,
                                   S.as_allowed(kwargs.get("attention_mask")))
            return
        return hook

    def _captured_scores(self, run: _Run, layer: int) -> dict:
        """The scores of the stage before ``layer`` from the attention layer captured earlier (a hybrid LLM whose
        layer ``layer - 1`` is a linear-attention layer): that layer's q/k on its input, restricted to the tokens
        still present (a stage in between may have removed some), in the current slot order."""
        attn, x, pe, old, allowed = run.captured.pop(layer)
        cur = run.slots
        index = torch.zeros_like(cur.pos)
        for b in range(cur.pos.shape[0]):
            lookup = torch.zeros(run.prefill_len, dtype=torch.long, device=cur.pos.device)
            real = (~old.filler[b]).nonzero().flatten()
            lookup[old.pos[b, real]] = real
            index[b] = lookup[cur.pos[b]]
        with torch.no_grad():
            if allowed is not None:  # the layer's own mask, restricted to the present tokens (rows and columns)
                allowed = allowed.expand(index.shape[0], -1, -1, -1)
                rows = torch.gather(allowed, 2, index[:, None, :, None].expand(-1, allowed.shape[1], -1,
                                                                                allowed.shape[3]))
                allowed = torch.gather(rows, 3, index[:, None, None, :].expand(-1, rows.shape[1], rows.shape[2], -1))
            return self._scores(run, attn, S.gather_seq(x, index), tuple(S.gather_seq(t, index) for t in pe), allowed)

    def _layer_pre(self, i: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict):
            if self.step is not None:
                state, masks = self.step
                g = state.group_of(i)
                if g is None or self.kinds[i] == "linear_attention":  # linear layers: the model's own 2-D mask
                    return None
                kwargs = dict(kwargs)
                kwargs["attention_mask"] = masks[g][self.windows[i]]
                return args, kwargs
            run = self.run
            if run is None:
                return None
            h = args[0] if args else kwargs["hidden_states"]
            if run.full is None:
                run.full = h.detach().clone()
            if i in run.stage_at:  # no torch.no_grad here: kept tokens stay differentiable (losses with labels)
                h = self._apply_stage(run, i, h, cache_from(kwargs))
                run.changed = True
            if not run.changed:
                return None
            kwargs = dict(kwargs)
            if args:
                args = (h,) + tuple(args[1:])
            else:
                kwargs["hidden_states"] = h
            # a linear-attention layer takes a 2-D padding mask: filler slots (on the left) are zeroed, as the model
            # zeroes left padding, so its convolution and recurrent state see exactly the kept tokens
            kwargs["attention_mask"] = (run.masks[self.windows[i]] if self.kinds[i] != "linear_attention"
                                        else run.slots.valid.to(h.dtype))
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                if pe is not run.pe_src:
                    run.pe_src = pe
                    run.pe = tuple(S.gather_seq(t, run.slots.pos) for t in pe)
                kwargs["position_embeddings"] = run.pe
            pid = kwargs.get("position_ids")
            if isinstance(pid, torch.Tensor) and pid.shape[-1] == run.prefill_len:
                kwargs["position_ids"] = _gather_last(pid, run.slots.pos)
            return args, kwargs
        return hook

    def _norm_pre(self, module: torch.nn.Module, args: tuple):
        run = self.run
        if run is None or not run.changed:
            return None
        h = args[0]
        full = run.full.to(h.dtype).clone()
        lay = run.slots
        for b in range(h.shape[0]):
            real = ~lay.filler[b]
            full[b, lay.pos[b, real]] = h[b, real]
        return (full,) + tuple(args[1:])

    # ---- decode-time KV pruning ------------------------------------------------------------------------------------
    def _decode_attn_pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self.step is not None and self.step[0].decode is not None:
            x = args[0] if args else kwargs["hidden_states"]
            self.step_query = (x.detach(), kwargs.get("position_embeddings"))

    def _decode_attn_post(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """After the scoring layer's attention of a call that continues the cache (its cache now holds this call's
        keys): the current token's attention to each item's remaining entries decides what stays; the dropped
        entries leave the cache of every layer >= ``decode_at`` before those layers run in this same call."""
        if self.step is None or self.step_query is None:
            return
        state, masks = self.step
        dec: _DecodeState = state.decode
        x, pe = self.step_query
        self.step_query = None
        if pe is None:
            raise RuntimeError("the attention module got no position_embeddings; cannot score the cached entries")
        layer = self.step_past.layers[self.decode_score]
        keys = layer.keys  # [B, H_kv, K, d], rotary applied; never pruned while decoding
        mask2d, q = self.step_mask2d, self.step_q
        kv = keys.shape[-2]
        # a layer after a prefill stage caches the kept prompt entries (its group's columns), then the new tokens
        g = state.group_of(self.decode_score)
        key_valid = mask2d if g is None else torch.cat([state.groups[g][1], mask2d[:, state.prefill_len:]], dim=1)
        with torch.no_grad():
            last = torch.full((x.shape[0], 1), x.shape[1] - 1, dtype=torch.long, device=x.device)
            query = separate_qk(module, x, last, pe)
            probs = softmax_rows(query.q, keys, query.scale, key_valid[:, None, None, :kv]).mean(dim=1)[:, 0]
            if g is not None:  # columns -> original positions
                valid, cols = state.groups[g][1], state.positions[g]
                by_pos = probs.new_zeros(probs.shape[0], state.prefill_len)
                for b in range(probs.shape[0]):
                    by_pos[b, cols[b][valid[b]]] = probs[b, : valid.shape[1]][valid[b]]
                probs = by_pos
        kept_now, drop = [], {}
        for j, (b, n, alive) in enumerate(dec.items):
            pos = dec.positions[j][alive].to(probs.device)
            keep = self.c.decode_keep(probs[b, pos], n) if alive.numel() else None
            if keep is not None and keep.numel() < alive.numel():
                keep = keep.cpu()
                drop.setdefault(b, []).append(pos[~torch.isin(torch.arange(alive.numel()), keep).to(pos.device)])
                alive = alive[keep]
                dec.items[j] = (b, n, alive)
            kept_now.append(alive.clone())
        dec.history.append(kept_now)
        if not drop:
            return
        self._evict(state, drop)
        g = len(state.groups) - 1
        masks[g] = self._step_masks(state, g, mask2d[:, state.prefill_len:], q)

    def _evict(self, state: CacheState, drop: dict[int, list[torch.Tensor]]) -> None:
        """Remove the prompt columns holding the ``drop`` positions (per sample) from the cache of every layer
        ``>= decode layer``: rows are re-packed to the longest row (fillers on the left), the tensors replaced by
        smaller ones (the old ones are freed), and the group's key-valid row and column map follow."""
        dec: _DecodeState = state.decode
        start, valid = state.groups[-1]
        cols = dec.columns
        b, w = valid.shape
        keep = torch.ones_like(valid)
        for row, positions in drop.items():
            keep[row] &= ~torch.isin(cols[row], torch.cat(positions).to(cols.device))
        keep &= valid  # the batch's padding and old fillers go too: no query attends to them
        width = int(keep.sum(1).max())
        gather = torch.zeros(b, width, dtype=torch.long, device=valid.device)
        filler = torch.ones(b, width, dtype=torch.bool, device=valid.device)
        for i in range(b):
            idx = keep[i].nonzero().flatten()
            gather[i, width - idx.numel():] = idx
            filler[i, width - idx.numel():] = False
        new_cols = torch.gather(cols, 1, gather).masked_fill(filler, -1)
        new_valid = torch.gather(valid, 1, gather) & ~filler
        # linear layers hold no entries
        for layer in [self.step_past.layers[i] for i in self.attention_layers if i >= start]:
            for name in ("keys", "values"):
                t = getattr(layer, name)
                tail = t[:, :, w:]
                idx = gather.to(t.device)[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1])
                head = torch.gather(t, 2, idx).masked_fill(filler.to(t.device)[:, None, :, None], 0)
                setattr(layer, name, torch.cat([head, tail], dim=2))
        state.groups[-1] = (start, new_valid)
        state.positions[-1] = new_cols.clamp(min=0)
        dec.columns = new_cols

    # ---- the work -----------------------------------------------------------------------------------------------
    def _rows(self, run: _Run) -> tuple[torch.Tensor, list[int], list[torch.Tensor]]:
        """Query rows per sample: the last real slot and (if needed) every real text slot."""
        lay = run.slots
        visual = torch.zeros_like(lay.valid)
        for t in run.tracks:
            visual[t.item.sample, t.slots] = True
        want_text = "text_attention" in self.needs or "text" in self.needs
        rows, last, text = [], [], []
        for b in range(lay.valid.shape[0]):
            real = lay.valid[b].nonzero().flatten()
            lst = int(real[-1]) if real.numel() else lay.width - 1
            txt = (lay.valid[b] & ~visual[b]).nonzero().flatten() if want_text else real[:0]
            r = torch.unique(torch.cat([txt, torch.tensor([lst], device=txt.device)]))
            rows.append(r)
            last.append(int((r == lst).nonzero()[0, 0]))
            text.append(txt)
        width = max(r.numel() for r in rows)
        out = torch.full((len(rows), width), -1, dtype=torch.long, device=lay.pos.device)
        for b, r in enumerate(rows):
            out[b, : r.numel()] = r
        return out, last, text

    def _scores(self, run: _Run, attn: torch.nn.Module, x: torch.Tensor, pe: Any,
                layer_mask: torch.Tensor | None) -> dict:
        """The rows a method scores with, under the mask the layer itself uses (``layer_mask``, bool; None: causal
        over real keys), so block overlays and sliding windows count as in the model."""
        rows, last, text = self._rows(run)
        probs = attention_rows(attn, x, pe, run.slots.valid, rows, layer_mask).mean(dim=1)  # [B, R, W]
        return {"rows": rows, "last": last, "text": text, "probs": probs}

    def _item_signals(self, run: _Run, layer: int, t: _Track, h: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        b = t.item.sample
        sc = run.signals.get(layer)
        if sc is not None:
            probs = sc["probs"][b][:, t.slots]  # [R, m]
            if "last_attention" in self.needs:
                out["last_attention"] = probs[sc["last"][b]].unsqueeze(0)
            after = sc["text"][b][sc["text"][b] > t.slots.max()] if t.slots.numel() else sc["text"][b][:0]
            if "text_attention" in self.needs:
                rows = sc["rows"][b]
                sel = torch.isin(rows, after)
                out["text_attention"] = probs[sel].unsqueeze(0)
            if "text" in self.needs or "text_mask" in self.needs:
                out["text"] = h[b, after].unsqueeze(0)
                out["text_mask"] = torch.ones(1, after.numel(), dtype=torch.bool, device=h.device)
        elif "text" in self.needs:
            lay = run.slots
            visual = torch.zeros_like(lay.valid[b])
            for o in run.tracks:
                if o.item.sample == b:
                    visual[o.slots] = True
            after = (lay.valid[b] & ~visual).nonzero().flatten()
            after = after[after > t.slots.max()] if t.slots.numel() else after[:0]
            out["text"] = h[b, after].unsqueeze(0)
            out["text_mask"] = torch.ones(1, after.numel(), dtype=torch.bool, device=h.device)
        return {k: v for k, v in out.items() if k in self.needs}

    def _apply_stage(self, run: _Run, layer: int, h: torch.Tensor, past: Any) -> torch.Tensor:
        if layer in run.captured:
            run.signals[layer] = self._captured_scores(run, layer)
        lay = run.slots
        # remember every slot's hidden state: dropped tokens carry it to the output
        for b in range(h.shape[0]):
            real = ~lay.filler[b]
            run.full[b, lay.pos[b, real]] = h[b, real].detach()
        drop = torch.zeros_like(lay.valid)
        results = []
        joint = self._joint_selection(run, layer, h) if getattr(self.c, "joint", False) else None
        for t in run.tracks:
            k = t.plan.get(layer)
            m = int(t.slots.numel())
            if joint is not None and k is not None:  # a joint method shares its total over the sample's items
                k = int(joint[id(t)].numel())
            if k is None or k >= m:
                results.append(None)
                continue
            b = t.item.sample
            if k == 0:
                out_tokens = h.new_zeros(1, 0, h.shape[-1])
                src = torch.full((m,), -1, dtype=torch.long)
                idx = torch.zeros(0, dtype=torch.long)
            elif joint is not None:
                out = ops.select(h[b, t.slots].unsqueeze(0), joint[id(t)].to(h.device).unsqueeze(0))
                out_tokens, src, idx = out.tokens, out.source[0].cpu(), out.index[0].cpu()
            else:
                signals = self._item_signals(run, layer, t, h)
                out = self.c.stage(h[b, t.slots].unsqueeze(0), k, final=min(t.plan.values()),
                                   last=layer == max(t.plan), signals=signals,
                                   context=StageContext(t.item.grid, t.n, t.index.clone(), t.memo))
                if out is None or out.tokens.shape[1] >= m:
                    results.append(None)
                    continue
                k = int(out.tokens.shape[1])
                out_tokens, src, idx = out.tokens, out.source[0].cpu(), out.index[0].cpu()
            drop[b, t.slots] = True
            drop[b, t.slots[idx.to(t.slots.device)]] = False
            results.append((out_tokens, src, idx))
            t.source = S.compose_source(t.source, src)
            t.index = t.index[idx]
            t.stages.append((layer, k))
            t.stage_sources.append(src.clone())
        new, gather = S.shorten(lay, drop)
        h_new = S.gather_seq(h, gather)
        new_of_old = torch.full_like(lay.pos, -1)
        for b in range(h.shape[0]):
            real = ~new.filler[b]
            new_of_old[b, gather[b, real]] = torch.arange(new.width, device=h.device)[real]
        for t, res in zip(run.tracks, results):
            b = t.item.sample
            if res is None:
                t.slots = new_of_old[b, t.slots]
                continue
            out_tokens, _, idx = res
            t.slots = new_of_old[b, t.slots[idx.to(t.slots.device)]]
            if t.slots.numel():
                h_new[b, t.slots] = out_tokens[0].to(h_new.dtype)
        run.slots = new
        run.masks = self._prefill_masks(new, run.blocks, h.dtype)
        run.pe_src, run.pe = None, None
        if past is not None:
            if run.state is None:
                run.state = CacheState(self, run.prefill_len)
                setattr(past, STATE_ATTR, run.state)
            run.state.groups.append((layer, new.valid.clone()))
            run.state.positions.append(new.pos.clone())
        return h_new

    def _joint_selection(self, run: _Run, layer: int, h: torch.Tensor) -> dict[int, torch.Tensor]:
        """A joint method (``compressor.joint``): per sample, the items staged at ``layer`` are scored as usual and
        the method keeps the best of them together, to the sum of their planned counts (``select_sample``)."""
        chosen: dict[int, torch.Tensor] = {}
        for b in range(h.shape[0]):
            tracks = [t for t in run.tracks if t.item.sample == b and layer in t.plan]
            if not tracks:
                continue
            scores = [self.c.score_tokens(h[b, t.slots].unsqueeze(0), t.item.grid,
                                          self._item_signals(run, layer, t, h))[0] for t in tracks]
            kept = self.c.select_sample(scores, sum(t.plan[layer] for t in tracks))
            for t, keep in zip(tracks, kept):
                chosen[id(t)] = keep
        return chosen

    def _record(self, run: _Run) -> None:
        per_sample: list[list[ItemStats]] = [[] for _ in range(run.slots.pos.shape[0])]
        for t in run.tracks:
            per_sample[t.item.sample].append(ItemStats(
                modality=t.item.modality, tokens_in=t.n, tokens_out=int(t.index.numel()),
                source=t.source.clone(), index=t.index.clone(), grid=t.item.grid, stages=list(t.stages),
                stage_sources=list(t.stage_sources)))
        self.c.last_stats = summarize(per_sample)


def _gather_last(pid: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Gather position ids ``[..., B or 1, L]`` (2-D or M-RoPE 3-D) at ``pos`` ``[B, W]`` along the last dim."""
    lead = pid.shape[:-2]
    p = pid.expand(*lead, pos.shape[0], pid.shape[-1])
    return torch.gather(p, -1, pos.expand(*lead, *pos.shape))


def _require_dynamic(past: Any) -> None:
    layers = getattr(past, "layers", None)
    if layers is None:
        return
    # sliding-window layers cache a window; a hybrid LLM's linear-attention layers hold a convolution and a
    # recurrent state (no entries to shorten)
    ok = {"DynamicLayer", "DynamicSlidingWindowLayer", "LinearAttentionLayer"}
    bad = {type(layer).__name__ for layer in layers if type(layer).__name__ not in ok}
    if bad:
        raise ValueError(f"LLM-stage compression needs a DynamicCache (full-attention, sliding-window and "
                         f"linear-attention layers); "
                         f"got {sorted(bad)}")
