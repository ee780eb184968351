"""Stage "encoder" on the audio towers of the Qwen-Omni thinkers (``tz.InEncoder(method, layer=L)``, or a schedule
of cuts): Qwen2.5-Omni (``adapters/qwen2_5_omni.py``) and Qwen3-Omni (``adapters/qwen3_omni.py``).

The contract a tower must meet (checked in the installed ``modeling_qwen2_5_omni.py`` /
``modeling_qwen3_omni_moe.py``, the same in transformers 5.18 and 5.25): ``audio_tower.layers`` are called as
``layer(hidden [frames, D], cu_seqlens, max_seqlen=...)`` on every clip's encoder frames of the call in one
sequence (clip after clip), with window attention (one ``cu_seqlens`` segment per window, each window inside one
clip) and no mask and no positions inside the layers (positions are added by the stem); after the layers a tail of
the model's own modules maps frames to LLM tokens. What differs is declared by the adapter (:class:`AudioTowerStage`'s
hooks): the **unit** (the encoder frames that make one LLM token) and the **tail**. Qwen2.5-Omni: a unit is one
pooled pair of frames ``(p, p + 1)`` at the model's own ``get_pool_indices``; a clip's last frame is in no pair when
its frame count is odd (the model's pooling never reads it, but its window-mates attend to it); the tail is the
model's pair mean ``(h[p] + h[p + 1]) / 2``, ``ln_post`` and ``proj``. Qwen3-Omni: a unit is one frame (no pooling);
the tail is ``ln_post``, ``proj1``, ``act``, ``proj2``.

How (:class:`AudioTowerStage`, mixed into an Omni adapter, which owns ``core``, ``_audio_args``,
``_audio_token_counts`` and the rebuild):

* **The model's own pass up to the cut**: ``get_audio_features`` runs as the model runs it and is stopped after
  layer ``L - 1`` by a forward hook; layer 0's inputs give the call's ``cu_seqlens`` (each frame's window). No copy of
  the stem, the chunking or the positions.
* **The unit is what becomes one LLM token**: per clip the method compresses its ``n`` units (``n`` = the clip's LLM
  tokens, layout ``audio(n)``, so the budget counts LLM tokens as at stage ``pre_llm``), each the concatenation of
  its frames' states after layer ``L - 1`` (``[n, unit * D]``); a kept unit keeps its frames, merged units are
  averaged frame by frame (size-weighted, :class:`tokenzip.encoder.MergedTokens`). A frame in no unit (Qwen2.5-Omni's
  odd last frame) is carried along uncompressed through every later layer, so retain=1.0 is exact.
* **The layers after the cut** are the model's own layer modules, called as the model calls them, on the frames
  left, in the model's frame order; each frame stays in its ORIGINAL attention window (``cu_seqlens`` recomputed
  from the frames left in each window; a merged unit's frames sit where its representative's, i.e. its first
  member's, frames were). The audio attention takes no mask: no proportional attention, a merged unit is a plain
  average in the later layers (as on the Qwen-VL ViTs). Then the tail on every kept unit of the call at once (the
  model's batch), put back in the method's slot order.
* **Schedules** (``layer=(l1, l2, ...)``): at each earlier cut the InEncoder's step compresses each clip's units when
  the method takes audio (``step.counts``: each clip reaches its budget at the last cut), then the layers to the next
  cut run on the units left. After the first cut a method sees layout ``audio(n')`` of the units left; each unit
  keeps the placeholder of the original unit it stands at (its representative's: the adapter's items carry
  ``slots`` / ``positions`` / ``seconds`` / ``chunk`` of those representatives).
* **Signals** at a cut, from layer ``cut - 1`` (the one that made the units): ``cls_attention`` / ``keys`` as at the
  tower's output, recomputed from that layer's own q/k over each clip's frames left as ONE full sequence (not the
  windows), mean over heads and queries, summed (``cls_attention``) / averaged (``keys``) over each unit's frames;
  ``speech`` per original unit as at stage ``pre_llm`` (after an earlier cut: the mean over the units each unit
  stands for); ``text`` / ``text_mask``. Not ``projected`` (the tail has not run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils.generic import get_max_seqlen

from .. import layout as L
from .. import ops
from ..callstate import per_call
from ..encoder import MergedTokens, check_cuts
from ..output import CompressOutput
from .attention import ATTENTION_SIGNALS, attention_signals
from .merge_unit_vit import AtCut
from .placeholders import text_signals
from .speech import raw_waveforms

# inside the tower the tail (projection into the LLM's space) has not run yet: no ``projected``
AUDIO_ENCODER_SIGNALS = frozenset({"cls_attention", "keys", "speech", "text", "text_mask"})


@dataclass
class AudioPass:
    """The call's audio-tower pass from the first cut to rebuild(): per encoder frame its attention ``window`` and
    ``clip``; per unit of the call (all clips, clip after clip) its first frame ``starts``; per clip its units'
    ``states``, the global unit each current unit stands at (``ids``: a merged unit at its representative), its first
    global unit (``offsets``) and its per-unit ``speech`` (None: not asked for); the frames in no unit (``rest_ids``)
    and their states (``rest``)."""

    window: torch.Tensor
    clip: torch.Tensor
    starts: torch.Tensor
    unit: int
    cu_dtype: torch.dtype
    states: list[MergedTokens]
    ids: list[torch.Tensor]
    offsets: list[int]
    rest_ids: torch.Tensor
    rest: torch.Tensor
    speech: list[torch.Tensor] | None


def unit_signals(attn: torch.nn.Module, x: torch.Tensor, bounds: list[tuple[int, int]],
                 positions: list[torch.Tensor], needs: frozenset[str]) -> list[dict[str, torch.Tensor]]:
    """Per clip the attention signals of its units: ``attn``'s (a ``q_proj``/``k_proj`` attention) on each clip's
    rows ``x[lo:hi]`` as one full sequence, then per unit its frames' rows (``positions[c]`` ``[n, unit]``, indices
    into the clip's rows): ``cls_attention`` summed (the pair's mean up to a constant factor no ranking sees; the
    clip's scores still sum to <= 1), ``keys`` averaged."""
    needs = needs & ATTENTION_SIGNALS
    out: list[dict[str, torch.Tensor]] = []
    for (lo, hi), pos in zip(bounds, positions):
        sig: dict[str, torch.Tensor] = {}
        if needs and hi > lo:
            for name, t in attention_signals(attn, x[None, lo:hi], needs, None).items():
                rows = t[0][pos.to(t.device)]
                sig[name] = rows.sum(dim=1) if name == "cls_attention" else rows.mean(dim=1)
        out.append(sig)
    return out


class AudioTowerStage:
    """Stage "encoder" on the audio tower (module doc). The adapter routes ``encode``'s audio to
    :meth:`_encode_audio_in_tower` while ``audio_cuts`` is set and replaces its audio items' tokens by
    :meth:`_finish_audio`'s in ``rebuild``; it overrides the hooks below where its tower differs from
    Qwen2.5-Omni's."""

    encoder_signals = AUDIO_ENCODER_SIGNALS
    _audio_pass = per_call()  # the audio tower's pass between the cut and rebuild()
    audio_cuts: tuple[int, ...] | None = None  # compress after these numbers of audio tower layers
    audio_step: Any = None  # a schedule's compression at the cuts before the last
    audio_unit: int = 2  # encoder frames per LLM token (Qwen2.5-Omni: a pooled pair)

    # ---- what differs between towers -----------------------------------------------------------------------------
    def _audio_frames(self, mel: torch.Tensor) -> torch.Tensor:
        """Encoder frames of clips of ``mel`` valid log-mel frames (what the layers run on)."""
        return self.core.audio_tower._get_feat_extract_output_lengths(mel)[0]

    def _audio_unit_starts(self, mel: torch.Tensor, frames: int) -> torch.Tensor:
        """The first frame of each unit of the call (``frames`` frames over all clips), in the model's order: the
        model's own pooling pairs (``get_pool_indices``)."""
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import get_pool_indices

        return get_pool_indices(mel)

    def _audio_tail(self, frames: torch.Tensor) -> torch.Tensor:
        """The model's modules after the layers on ``[units, unit, D]`` frame states: one LLM token per unit (the
        model's pair mean, as it writes it, then ``ln_post`` and ``proj``)."""
        tower = self.core.audio_tower
        pooled = (frames[:, 0] + frames[:, 1]) / 2
        return tower.proj(tower.ln_post(pooled))

    # ---- the stage ------------------------------------------------------------------------------------------------
    def encoder_depth(self) -> int:
        """The audio tower's layers (``tz.InEncoder`` layer forms resolve against it)."""
        return len(self.core.audio_tower.layers)

    def set_encoder_layer(self, layer: int | tuple[int, ...], step: Any = None) -> None:
        """Compress the audio tower's frames between its layers ``layer - 1`` and ``layer`` (or after each layer count
        of an increasing tuple, a schedule; ``step`` compresses at the cuts before the last)."""
        try:
            cuts = check_cuts(layer, self.encoder_depth())
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}'s encoder stage cuts the audio tower: {e}") from None
        if len(cuts) > 1 and step is None:
            raise ValueError("a schedule of encoder cuts needs a compression step for the intermediate cuts")
        self.audio_cuts, self.audio_step = cuts, step

    @torch.no_grad()
    def _encode_audio_in_tower(self, kwargs: dict[str, Any], needs: frozenset[str], owners: list[int]
                               ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], list[dict[str, Any]]]:
        """The model's own audio pass stopped after layer ``audio_cuts[0] - 1``, then, for a schedule, each earlier
        cut's compression and the layers to the next cut. Per clip (the model's clip order; ``owners[c]``: its
        sample): its units' states ``[n, unit * D]`` at the last cut, their signals there, and what its item's
        ``extra`` needs (``tokens_in``; with a schedule ``k`` and ``units``, the original unit each current unit stands
        at)."""
        feats, fmask = self._audio_args(kwargs)
        tower = self.core.audio_tower
        cuts = self.audio_cuts
        mel = fmask.sum(-1).long()
        sizes = [int(n) for n in self._audio_token_counts(mel).tolist()]
        frames = [int(f) for f in self._audio_frames(mel).tolist()]
        box: dict[str, torch.Tensor] = {}

        def first(module: torch.nn.Module, args: tuple, kw: dict) -> None:
            box["cu"] = kw["cu_seqlens"] if "cu_seqlens" in kw else args[1]

        def stop(module: torch.nn.Module, args: tuple, out: Any) -> None:
            box["hidden"] = out[0] if isinstance(out, tuple) else out
            raise AtCut

        def attention_input(module: torch.nn.Module, args: tuple, kw: dict) -> None:
            box["attn"] = args[0] if args else kw["hidden_states"]

        layer = tower.layers[cuts[0] - 1]
        handles = [tower.layers[0].register_forward_pre_hook(first, with_kwargs=True),
                   layer.register_forward_hook(stop)]
        if needs & ATTENTION_SIGNALS:
            handles.append(layer.self_attn.register_forward_pre_hook(attention_input, with_kwargs=True))
        try:
            self.core.get_audio_features(feats, fmask.to(feats.device), return_dict=True)
        except AtCut:
            pass
        finally:
            for h in handles:
                h.remove()
        hidden, cu = box["hidden"], box["cu"]
        dev, u = hidden.device, self.audio_unit
        if hidden.shape[0] != sum(frames):
            raise RuntimeError(f"the audio tower ran on {hidden.shape[0]} frames, expected {sum(frames)}")
        starts = self._audio_unit_starts(mel, hidden.shape[0]).to(dev)
        if starts.shape[0] != sum(sizes):
            raise RuntimeError(f"the audio tower has {starts.shape[0]} units, expected {sum(sizes)} LLM tokens")
        members = starts[:, None] + torch.arange(u, device=dev)  # [units, u] frames of each unit
        in_unit = torch.zeros(hidden.shape[0], dtype=torch.bool, device=dev)
        in_unit[members.flatten()] = True
        rest_ids = (~in_unit).nonzero().flatten()
        offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
        cu = cu.to(dev)
        run = AudioPass(
            window=torch.arange(cu.shape[0] - 1, device=dev).repeat_interleave((cu[1:] - cu[:-1]).long()),
            clip=torch.arange(len(frames), device=dev).repeat_interleave(torch.tensor(frames, device=dev)),
            starts=starts, unit=u, cu_dtype=cu.dtype,
            states=[MergedTokens.start(hidden[members[o:o + n]].reshape(1, n, -1))
                    for o, n in zip(offsets, sizes)],
            ids=[torch.arange(o, o + n, device=dev) for o, n in zip(offsets, sizes)],
            offsets=offsets[:-1], rest_ids=rest_ids, rest=hidden[rest_ids], speech=None)
        if "speech" in needs:
            waves = raw_waveforms(kwargs, feats.shape[0], "audio clip")
            run.speech = [self._clip_speech(feats[c], int(mel[c]), None if waves is None else waves[c], n).to(dev)
                          for c, n in enumerate(sizes)]
        self._audio_pass = run
        signals = self._signals_at_cut(run, box.get("attn"), torch.arange(hidden.shape[0], device=dev), members,
                                       cuts[0], needs)
        layouts = [L.audio(n) for n in sizes]
        step = self.audio_step
        takes = step is not None and "audio" in (getattr(step, "modalities", None) or ("audio",))
        counts = [step.counts(n, len(cuts)) for n in sizes] if len(cuts) > 1 and takes else None
        # the text signals of a schedule's earlier cuts (at the last cut the adapter's encode() adds them)
        text = [text_signals(self.core.get_input_embeddings(), kwargs["input_ids"], kwargs.get("attention_mask"),
                             set(self.token.values()), owners[c])
                if counts is not None and {"text", "text_mask"} & needs else {} for c in range(len(sizes))]
        for j in range(1, len(cuts)):  # a schedule's earlier cuts: each clip a little, then the next span
            if counts is not None:
                for c in range(len(sizes)):
                    sig = {name: v.unsqueeze(0) for name, v in {**signals[c], **text[c]}.items()}
                    out = step(run.states[c].hidden, counts[c][j - 1], layouts[c], sig)
                    self._carry_audio(run, c, out)
                    layouts[c] = L.audio(out.tokens.shape[1])
            signals = self._audio_span(run, cuts[j - 1], cuts[j], needs)
        extras: list[dict[str, Any]] = []
        for c, n in enumerate(sizes):
            extra: dict[str, Any] = {"tokens_in": n}
            if counts is not None:  # a schedule: the last cut reaches each clip's budget
                extra["k"] = counts[c][-1]
                extra["units"] = (run.ids[c] - run.offsets[c]).cpu()
            extras.append(extra)
        return [st.hidden[0] for st in run.states], signals, extras

    def _signals_at_cut(self, run: AudioPass, attn_in: torch.Tensor | None, frame_ids: torch.Tensor,
                        unit_rows: torch.Tensor, cut: int, needs: frozenset[str]) -> list[dict[str, torch.Tensor]]:
        """Per clip the signals of its current units at ``cut``: attention from layer ``cut - 1``'s input ``attn_in``
        (rows in the sequence order the layer ran, of frames ``frame_ids``; ``unit_rows[r]``: the rows of the call's
        ``r``-th current unit, clip after clip) and speech."""
        split = [int(i.numel()) for i in run.ids]
        if needs & ATTENTION_SIGNALS:
            counts = torch.bincount(run.clip[frame_ids], minlength=len(split)).tolist()
            ends = torch.tensor(counts).cumsum(0).tolist()
            bounds = [(e - n, e) for n, e in zip(counts, ends)]
            positions = [rows - lo for rows, (lo, _) in zip(unit_rows.split(split), bounds)]
            signals = unit_signals(self.core.audio_tower.layers[cut - 1].self_attn, attn_in, bounds, positions, needs)
        else:
            signals = [{} for _ in split]
        if run.speech is not None:
            for c, sig in enumerate(signals):
                # per original unit -> the mean over the original units each current unit stands for
                st = run.states[c]
                sig["speech"] = ops.group_mean(run.speech[c].float(), st.source[0].to(run.speech[c].device),
                                               st.hidden.shape[1])[0]
        return signals

    def _carry_audio(self, run: AudioPass, c: int, out: CompressOutput) -> None:
        """Clip ``c`` of ``run`` after one compression of its units: their states (:meth:`MergedTokens.after`) and
        their representatives' global ids."""
        run.states[c] = run.states[c].after([out])
        run.ids[c] = run.ids[c][out.index[0].to(run.ids[c].device)]

    def _audio_sequence(self, run: AudioPass) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The frames left as the layers take them: their ids in the model's order, their states ``[S, D]`` in that
        order, and ``order`` (sequence position -> the units' frames, clip after clip, then the frames in no unit)."""
        u = run.unit
        ids = torch.cat(run.ids)
        units = torch.cat([st.hidden[0] for st in run.states])
        d = units.shape[-1] // u
        frame_ids = torch.cat([(run.starts[ids][:, None] + torch.arange(u, device=ids.device)).flatten(),
                               run.rest_ids])
        rows = torch.cat([units.reshape(-1, d), run.rest.to(units.dtype)])
        order = torch.argsort(frame_ids)
        return frame_ids[order], rows[order], order

    def _audio_span(self, run: AudioPass, start: int, stop: int, needs: frozenset[str] | None
                    ) -> list[dict[str, torch.Tensor]]:
        """Layers ``start .. stop - 1`` on every clip's frames left (one sequence, as the model runs them), each
        frame in its original window; states updated in place. With ``needs``: each clip's signals at ``stop``."""
        tower = self.core.audio_tower
        frame_ids, x, order = self._audio_sequence(run)
        _, per_window = torch.unique_consecutive(run.window[frame_ids], return_counts=True)
        cu = torch.nn.functional.pad(per_window.cumsum(0), (1, 0)).to(run.cu_dtype)
        box: dict[str, torch.Tensor] = {}

        def attention_input(module: torch.nn.Module, args: tuple, kw: dict) -> None:
            box["attn"] = args[0] if args else kw["hidden_states"]

        wanted = needs is not None and bool(needs & ATTENTION_SIGNALS)
        handle = tower.layers[stop - 1].self_attn.register_forward_pre_hook(attention_input, with_kwargs=True) \
            if wanted else None
        try:
            for layer in tower.layers[start:stop]:
                out = layer(x, cu_seqlens=cu, max_seqlen=get_max_seqlen(cu, tower.config))
                x = out[0] if isinstance(out, tuple) else out
        finally:
            if handle is not None:
                handle.remove()
        back = torch.empty_like(x)
        back[order] = x  # the units' frames (clip after clip), then the frames in no unit
        split = [int(i.numel()) for i in run.ids]
        width = sum(split) * run.unit
        for st, rows in zip(run.states, back[:width].reshape(sum(split), -1).split(split)):
            st.hidden = rows.unsqueeze(0).to(st.hidden.dtype)
        run.rest = back[width:]
        if needs is None:
            return []
        restore = torch.argsort(order)  # sequence position of each unit frame
        unit_rows = restore[:width].view(-1, run.unit)
        return self._signals_at_cut(run, box.get("attn"), frame_ids, unit_rows, stop, needs)

    @torch.no_grad()
    def _finish_audio(self, outputs: list[CompressOutput]) -> list[torch.Tensor]:
        """The layers after the last cut on every clip's kept/merged units (:meth:`_audio_span`) and the tail on all
        kept units of the call at once, in the model's unit order. Per clip its LLM tokens in the method's slot
        order."""
        run = self._audio_pass
        if run is None or len(outputs) != len(run.states):
            raise RuntimeError("the audio tower's pass of this call is missing (encode() and rebuild() of one call)")
        for c, out in enumerate(outputs):
            self._carry_audio(run, c, out)
        self._audio_span(run, self.audio_cuts[-1], self.encoder_depth(), None)
        ids = torch.cat(run.ids)
        units = torch.cat([st.hidden[0] for st in run.states])
        order = torch.argsort(ids)
        tokens = self._audio_tail(units[order].view(units.shape[0], run.unit, -1))
        back = torch.empty_like(tokens)
        back[order] = tokens
        return list(back.split([int(i.numel()) for i in run.ids]))
