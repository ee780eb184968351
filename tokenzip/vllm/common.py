"""What tokenzip's vLLM models share (Qwen2.5-VL and Qwen2-VL in tokenzip/vllm/qwen_vl.py, Qwen3-VL in
tokenzip/vllm/qwen3_vl.py): the processor mixin that fixes the placeholder count, the probe on vLLM's last vision
block, the engine-load checks and pruning switch, and the model mixin that runs the method inside vLLM's pruning
hooks and places the kept tokens' M-RoPE positions.

vLLM's pruning contract (``SupportsMultiModalPruning``), and what each part does here:

* **The processor fixes the placeholder count** (``_get_prompt_updates``), before the encoder runs: an item of
  ``n = t*h*w/4`` tokens gets the method's budget ``k`` of ``n`` placeholders in ``prompt_token_ids`` (all ``n`` for a
  modality the method does not compress), read from the HF config's ``tokenzip`` key (tokenzip/vllm/config.py), the
  one the model reads too. A model class names the modalities whose placeholders tokenzip writes
  (``tokenzip_modalities``); the in-tree processor's own replacement stays for the others.
* **The model chooses which tokens fill them.** ``_process_image_input`` / ``_process_video_input`` run vLLM's own
  vision tower; when the method needs attention signals, hooks on the LAST vision block's own modules capture the
  q/k vLLM computes there (the rotated q/k its attention kernel receives, the keys before rotary, the block's
  attention segments ``cu_seqlens``), and :func:`tokenzip.adapters.attention.segment_signals` turns them into
  ``cls_attention`` (attention each patch receives, mean over heads, over the queries of the image or of the clip's
  frame) and ``keys`` exactly as the HF adapters do: per patch in the blocks' order, averaged over each 2x2 merge
  group, put back in raster order (Qwen2.5-VL's ``reverse_indices``; the other towers have no windows).
  ``_postprocess_image_embeds_evs`` / ``_postprocess_video_embeds_evs`` then call the method's
  ``Compressor.compress`` (the HF path's code) on each item's merger output with its layout
  (:func:`tokenzip.adapters.qwen_video.qwen_layout`) and exact ``k``. Rows a model carries beside the LLM-space
  token (Qwen3-VL's DeepStack levels) are split off before and cut like the tokens after (``_tokenzip_split`` /
  ``_tokenzip_carry``).
* **Positions.** Each kept (or merged) token carries, in 4 extra channels (tokenzip's format, read only by its own
  ``recompute_mrope_positions``), the M-RoPE position of its representative input token (``CompressOutput.index``)
  in the uncompressed item (the in-tree ``get_mrope_input_positions`` formula: grid indices, the temporal one scaled
  by ``second_per_grid_ts * tokens_per_second``) and, in channel 3, the item's position extent (its largest position
  + 1). ``get_mrope_input_positions`` is overridden for ``k`` placeholders per item: the text gets the uncompressed
  sequence's positions at once (after an item it continues from the item's full extent), the media slots
  provisional ones; ``recompute_mrope_positions`` (also tokenzip's) then writes each kept token's position, offset
  by its item's start, into its slot. So kept tokens keep the uncompressed sequence's positions and the text after
  the media continues as in the uncompressed sequence.
* **The switch.** vLLM's runner calls ``recompute_mrope_positions`` only when its multimodal config has
  ``video_pruning_rate > 0``; the model sets it (:data:`PRUNING_SWITCH`, a value nothing of tokenzip reads) at engine
  load, before the runner reads it, and refuses a rate the user set (tokenzip replaces vLLM's EVS on these models).
  vLLM's CPU runner never switches pruning on at all (only ``GPUModelRunner.load_model`` does): the CPU test
  environment does it (tests/vllm/cpu_env.py), not this module.

Refused at engine load with a clear error: an unknown method, one vLLM cannot serve (tokenzip/vllm/config.py), a
checkpoint of another model type, another vLLM minor version, ``video_pruning_rate`` set by the user, and attention
signals under tensor parallelism of the vision tower (each rank holds only some heads) or its data-parallel mode.
Precomputed embeddings (``image_embeds``) are compressed only by methods that need no attention signal.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import torch

from ..adapters.attention import ATTENTION_SIGNALS, segment_signals
from ..adapters.qwen_video import qwen_layout
from ..base import Compressor
from ..deps import optional_imports
from ..llm.scores import QK
from ..output import CompressOutput
from . import config as C

with optional_imports():  # a missing vLLM names the extra: pip install "tokenzip[vllm]"
    import vllm
    from vllm.multimodal.processing import PromptReplacement
    from vllm.utils.gpu_sync_debug import gpu_sync_allowed

# vLLM's runner switches its pruning path on when ``video_pruning_rate > 0``; tokenzip's models set this value (any
# value in (0, 1) would do: the tokenzip classes never read it)
PRUNING_SWITCH = 0.5
EXTRA_CHANNELS = 4  # M-RoPE (t, h, w) of each kept token + the item's extent, vLLM's 4-channel format


def grid_positions(t: int, h: int, w: int, t_factor: float) -> torch.Tensor:
    """``[3, t*h*w]`` M-RoPE (t, h, w) positions of an item's tokens (``h``, ``w`` in merged tokens) relative to its
    start, as the in-tree ``get_mrope_input_positions`` builds them (temporal index times ``t_factor``, truncated)."""
    pos = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1)
    if t_factor != 1.0:
        pos[0] = (pos[0].to(torch.float64) * t_factor).to(torch.long)
    return pos


class _LastBlockProbe:
    """Hooks on the last vision block's attention module (``blocks[-1].attn``) for one vision-tower pass: the
    pre-rotary q/k its ``apply_rotary_emb`` receives (``[2b, s, heads, d]``: queries then keys) and the rotated q/k
    and ``cu_seqlens`` its attention kernel (``attn.attn``) receives; removed after the pass, also after an error."""

    def __init__(self, attn: torch.nn.Module, needs: frozenset[str]):
        self.attn = attn
        self.needs = needs & ATTENTION_SIGNALS
        self.calls = 0
        self.content: torch.Tensor | None = None
        self.q: torch.Tensor | None = None
        self.k: torch.Tensor | None = None
        self.bounds: list[int] = []

    def _rotary(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        qk = args[0] if args else next(iter(kwargs.values()))
        self.content = qk[qk.shape[0] // 2:].detach()

    def _attention(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls += 1
        self.q, self.k = kwargs["query"].detach(), kwargs["key"].detach()
        self.bounds = [int(b) for b in kwargs["cu_seqlens"].tolist()]

    def run(self, fn: Callable[[], Any]) -> Any:
        handles = [self.attn.attn.register_forward_pre_hook(self._attention, with_kwargs=True)]
        if "keys" in self.needs:
            handles.append(self.attn.apply_rotary_emb.register_forward_pre_hook(self._rotary, with_kwargs=True))
        try:
            out = fn()
        finally:
            for h in handles:
                h.remove()
        if self.calls != 1:
            raise RuntimeError(f"expected one call of the last vision block's attention, saw {self.calls}")
        return out

    def signals(self) -> dict[str, torch.Tensor]:
        """Per patch, in the blocks' order: ``cls_attention`` [P] (received, summed over the queries of its segment,
        mean over heads) and ``keys`` [P, d] (before rotary, mean over heads)."""
        q, k = self.q.transpose(1, 2).float(), self.k.transpose(1, 2).float()  # [1, heads, P, d]
        content = k if self.content is None else self.content.transpose(1, 2).float()
        scale = float(getattr(self.attn.attn, "scale", None) or q.shape[-1] ** -0.5)
        return segment_signals(QK(q, k, content, scale), self.needs, self.bounds)


class TokenzipProcessorMixin:
    """Placeholders: ``k`` per item of the ``tokenzip_modalities``, the method's budget (mixed into the in-tree
    multimodal processors, whose own replacement stays for the other modalities)."""

    tokenzip_modalities: tuple[str, ...] = ("image", "video")

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any],
                            out_mm_kwargs: Any) -> Sequence[Any]:
        hf_processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        merge = int(self.info.get_image_processor(**hf_processor_mm_kwargs).merge_size)
        vocab = self.info.get_tokenizer().get_vocab()
        placeholder = {"image": vocab[hf_processor.image_token], "video": vocab[hf_processor.video_token]}
        method = C.method_from_config(self.info.get_hf_config())

        def replacement(item_idx: int, modality: str) -> list[int]:
            grid = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data
            n = int(grid.prod()) // (merge * merge)
            return [placeholder[modality]] * C.item_count(method, modality, n)

        mine = self.tokenzip_modalities
        others = [u for u in super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
                  if u.modality not in mine]
        return [PromptReplacement(modality=m, target=[placeholder[m]], replacement=partial(replacement, modality=m))
                for m in mine] + others



def switch_pruning_on(vllm_config: Any, model_type: str) -> Compressor:
    """Engine-load checks (module docstring) and vLLM's pruning switch; the configured method."""
    if not vllm.__version__.startswith(C.VLLM_MINOR + "."):
        raise RuntimeError(f"tokenzip's vLLM plugin supports vLLM {C.VLLM_MINOR}.x (it overrides private hooks that "
                           f"move between releases), found vLLM {vllm.__version__}")
    model_config = vllm_config.model_config
    hf_config = model_config.hf_config
    if getattr(hf_config, "model_type", None) != model_type:
        raise ValueError(f"architecture {hf_config.architectures} serves {model_type!r} checkpoints, got model_type "
                         f"{getattr(hf_config, 'model_type', None)!r}; tokenzip's vLLM plugin serves "
                         f"{sorted(C.ARCHITECTURES)}")
    method = C.method_from_config(hf_config)
    mm = model_config.multimodal_config
    if mm.video_pruning_rate not in (None, 0.0, PRUNING_SWITCH):
        raise ValueError(f"video_pruning_rate={mm.video_pruning_rate}: tokenzip's models replace vLLM's own video "
                         f"pruning (EVS); leave video_pruning_rate unset and set the budget in hf_overrides")
    mm.video_pruning_rate = PRUNING_SWITCH
    return method


class TokenzipQwenVLMixin:
    """What the architectures share (module docstring). ``tokenzip_kept`` holds ``(modality, kept indices)`` of the
    latest items, for inspection and tests."""

    supports_multimodal_pruning = True
    model_type: str

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        method = switch_pruning_on(vllm_config, self.model_type)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.is_multimodal_pruning_enabled = True
        self.tokenzip_method = method
        self.tokenzip_needs = method.signals_needed()
        self.tokenzip_kept: deque[tuple[str, torch.Tensor]] = deque(maxlen=256)
        self._tokenzip_signals: dict[str, list[dict[str, torch.Tensor]] | None] = {}
        attention = self.tokenzip_needs & ATTENTION_SIGNALS
        if attention and self.use_data_parallel:
            raise ValueError(f"{method.info.name} needs {sorted(attention)} from the vision tower, not supported with "
                             f"mm_encoder_tp_mode='data' by tokenzip's vLLM plugin")
        if attention and getattr(self.visual.blocks[-1].attn, "tp_size", 1) > 1:
            raise ValueError(f"{method.info.name} needs {sorted(attention)} from the vision tower, whose heads are "
                             f"split over tensor-parallel ranks; tokenzip's vLLM plugin supports them at tensor "
                             f"parallel size 1 only")

    # ---- the vision tower, with the last block's signals -----------------------------------------------------
    # tokenzip's selection reads indices and segment bounds on the host (GPU syncs, allowed as vLLM's EVS does)
    def _process_image_input(self, image_input: Any) -> tuple[torch.Tensor, ...]:
        with gpu_sync_allowed():
            return self._tokenzip_encode("image", image_input, super()._process_image_input)

    def _process_video_input(self, video_input: Any) -> tuple[torch.Tensor, ...]:
        with gpu_sync_allowed():
            return self._tokenzip_encode("video", video_input, super()._process_video_input)

    def _tokenzip_encode(self, modality: str, media_input: Any, run: Callable[[Any], Any]) -> Any:
        needs = self.tokenzip_needs & ATTENTION_SIGNALS
        self._tokenzip_signals[modality] = None
        if modality not in self.tokenzip_method.info.modalities or not needs:
            return run(media_input)
        if media_input["type"] not in ("pixel_values", "pixel_values_videos"):
            raise ValueError(f"{self.tokenzip_method.info.name} needs {sorted(needs)} from the vision tower; "
                             f"precomputed {modality} embeddings have none (pass pixels)")
        probe = _LastBlockProbe(self.visual.blocks[-1].attn, needs)
        out = probe.run(lambda: run(media_input))
        grid = media_input[f"{modality}_grid_thw"]
        grid_list = [[int(x) for x in g] for g in grid.tolist()]
        unit = self.visual.spatial_merge_size ** 2
        meta = getattr(self.visual, "prepare_encoder_metadata", None)
        restore = meta(grid_list).get("reverse_indices") if hasattr(self.visual, "fullatt_block_indexes") else None
        sizes = [t * h * w // unit for t, h, w in grid_list]
        grouped = {}
        for name, per_patch in probe.signals().items():
            g = per_patch.reshape(per_patch.shape[0] // unit, unit, *per_patch.shape[1:]).mean(dim=1)
            grouped[name] = g if restore is None else g[restore.to(g.device)]
        if "cls_attention" in grouped:  # mean over the image's patch queries / the clip frame's (HF adapter)
            per_item = [t * h * w if modality == "image" else h * w for t, h, w in grid_list]
            queries = torch.tensor(per_item).repeat_interleave(torch.tensor(sizes))
            grouped["cls_attention"] = grouped["cls_attention"] / queries.to(grouped["cls_attention"])
        split = {name: g.split(sizes) for name, g in grouped.items()}
        self._tokenzip_signals[modality] = [{name: s[i] for name, s in split.items()} for i in range(len(sizes))]
        return out

    # ---- vLLM's pruning hooks -----------------------------------------------------------------------------------
    def _postprocess_image_embeds_evs(self, image_embeds_split: Sequence[torch.Tensor],
                                      image_input: Any) -> tuple[torch.Tensor, ...]:
        with gpu_sync_allowed():
            return self._tokenzip_select("image", image_embeds_split, image_input)

    def _postprocess_video_embeds_evs(self, video_embeds_split: Sequence[torch.Tensor],
                                      video_input: Any) -> tuple[torch.Tensor, ...]:
        with gpu_sync_allowed():
            return self._tokenzip_select("video", video_embeds_split, video_input)

    def _tokenzip_select(self, modality: str, embeds: Sequence[torch.Tensor], media_input: Any
                         ) -> tuple[torch.Tensor, ...]:
        """Each item's ``k`` tokens chosen by the method, with their M-RoPE channels appended."""
        method = self.tokenzip_method
        merge = self.visual.spatial_merge_size
        grid_list = [[int(x) for x in g] for g in media_input[f"{modality}_grid_thw"].tolist()]
        signals = self._tokenzip_signals.pop(modality, None)
        seconds = media_input.get("second_per_grid_ts") if modality == "video" else None
        per_second = float(getattr(self.config.vision_config, "tokens_per_second", 1.0))
        out = []
        for i, (emb, (t, h, w)) in enumerate(zip(embeds, grid_list, strict=True)):
            n = int(emb.shape[0])
            k = C.item_count(method, modality, n)
            if modality in method.info.modalities:
                main, rows = self._tokenzip_split(emb)
                sig = {name: s[None] for name, s in (signals[i] if signals is not None else {}).items()}
                if "projected" in self.tokenzip_needs:
                    sig["projected"] = main[None]
                res = method.compress(main[None], grid=qwen_layout(modality, t, h, w, merge), k=k, **sig)
                tokens, index = self._tokenzip_carry(res, rows), res.index[0].cpu()
            else:
                tokens, index = emb, torch.arange(n)
            t_factor = 1.0 if modality == "image" else \
                (1.0 if seconds is None else float(seconds[i])) * per_second
            full = grid_positions(t, h // merge, w // merge, t_factor)
            extent = torch.full((1, k), int(full.max()) + 1, dtype=torch.long)
            channels = torch.cat([full[:, index], extent]).T.to(device=tokens.device, dtype=tokens.dtype)
            self.tokenzip_kept.append((modality, index))
            out.append(torch.cat([tokens, channels], dim=1))
        return tuple(out)

    def _tokenzip_split(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """An item's embeddings ``[n, D]`` as the LLM-space tokens the method compresses and the rows carried beside
        them (None: none; Qwen3-VL's DeepStack levels)."""
        return emb, None

    def _tokenzip_carry(self, res: CompressOutput, rows: torch.Tensor | None) -> torch.Tensor:
        """The item's output embeddings ``[k, D]``: the method's tokens with the carried rows cut like them."""
        if rows is not None:
            raise NotImplementedError(f"{type(self).__name__} carries rows beside its tokens and must cut them")
        return res.tokens[0]

    def recompute_mrope_positions(self, input_ids: Any, multimodal_embeddings: Sequence[torch.Tensor],
                                  mrope_positions: torch.Tensor, num_computed_tokens: int
                                  ) -> tuple[list[torch.Tensor], torch.Tensor, int]:
        """The media slots of this prefill step get their kept tokens' positions (channels 0-2 plus the item's
        start); the text already has its uncompressed positions (:meth:`get_mrope_input_positions`). The
        embeddings are those of the step's items in prompt order, the first possibly the rest of an item begun in an
        earlier chunk (vLLM's ``_gather_mm_embeddings``), so they fill the placeholder runs from
        ``num_computed_tokens`` on. vLLM's own ``recompute_mrope_positions`` (vllm/multimodal/video_prune/evs.py)
        is not used: it advances by the embeddings' count alone and puts a second item of one prompt over the first
        when the first was pruned below the text between them."""
        with gpu_sync_allowed():
            return self._tokenzip_positions(input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens)

    def _tokenzip_positions(self, input_ids: Any, multimodal_embeddings: Sequence[torch.Tensor],
                            mrope_positions: torch.Tensor, num_computed_tokens: int
                            ) -> tuple[list[torch.Tensor], torch.Tensor, int]:
        ids = torch.as_tensor(input_ids if not isinstance(input_ids, torch.Tensor) else input_ids.cpu()).long()
        positions = mrope_positions.clone()
        media = (ids == int(self.config.image_token_id)) | (ids == int(self.config.video_token_id))
        edges = torch.nonzero(torch.diff(torch.nn.functional.pad(media.int(), (1, 1))) != 0).flatten().tolist()
        runs = [(a, b) for a, b in zip(edges[::2], edges[1::2]) if b > num_computed_tokens]  # [start, end)
        cursor = num_computed_tokens
        embeds = []
        for emb, (start, end) in zip(multimodal_embeddings, runs):
            slot = max(start, cursor)
            count = int(emb.shape[0])
            if slot + count > end:
                raise RuntimeError(f"{count} embeddings from slot {slot} overflow the placeholder run [{start}, {end})")
            local = emb[:, -EXTRA_CHANNELS:-1].T.round().long().to(positions.device)
            positions[:, slot: slot + count] = local + positions[:, start - 1: start] + 1
            embeds.append(emb[:, :-EXTRA_CHANNELS])
            cursor = slot + count
        if len(embeds) != len(multimodal_embeddings):
            raise RuntimeError(f"{len(multimodal_embeddings)} media embeddings for {len(runs)} placeholder runs")
        return embeds, positions, int(positions.max()) + 1 - int(ids.numel())

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """Positions of a prompt with ``k`` placeholders per item: text as in the uncompressed sequence; each item's
        ``k`` slots provisionally its first ``k`` positions (``recompute_mrope_positions`` puts the kept tokens'
        own positions there once the encoder has chosen them)."""
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        cols: list[torch.Tensor] = []
        st, nxt = 0, 0
        for feature, (offset, t, h, w, t_factor) in zip(features, self._tokenzip_grids(features), strict=True):
            text = offset - st
            cols.append(torch.arange(text).expand(3, -1) + nxt)
            full = grid_positions(t, h, w, t_factor) + text + nxt
            cols.append(full[:, : feature.mm_position.length])
            nxt = int(full.max()) + 1
            st = offset + feature.mm_position.length
        cols.append(torch.arange(len(input_tokens) - st).expand(3, -1) + nxt)
        positions = torch.cat(cols, dim=1)
        return positions, int(positions.max()) + 1 - len(input_tokens)

    def _tokenzip_grids(self, features: list[Any]) -> Iterator[tuple[int, int, int, int, float]]:
        """``(offset, t, h, w, temporal factor)`` of each item (``h``, ``w`` in merged tokens), in prompt order."""
        raise NotImplementedError
