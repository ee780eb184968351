"""OmniZip: the audio of a clip decides how hard each time window of its video is pruned."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..base import JointCompressor, JointItem, MethodInfo
from ..budget import Budget
from ..callstate import per_call
from ..output import CompressOutput
from .dpc_knn import dpc_knn_centres

# the paper's rule for a window's video drop ratio from its audio retention S: clip(0.75 - 0.4 * S, 0.35, 0.75)
DROP_BASE, DROP_SLOPE, DROP_MIN, DROP_MAX = 0.75, 0.4, 0.35, 0.75


def video_drop_ratio(audio_retention: float) -> float:
    """OmniZip's drop ratio ``rho_v(i)`` of a window's video tokens from the share ``S_a(i)`` of its audio tokens
    that were kept: busier audio (more of it kept) -> less video dropped."""
    return min(DROP_MAX, max(DROP_MIN, DROP_BASE - DROP_SLOPE * float(audio_retention)))


@dataclass(frozen=True)
class Window:
    """One time window of a clip: its index (``floor(t / window_seconds)``), the video frames in it, its audio
    retention ``S_a``, the paper's drop ratio, and the video tokens it keeps after rescaling to the budget."""

    index: int
    frames: tuple[int, ...]
    tokens: int
    audio_retention: float
    drop_ratio: float
    keep: int


def plan_windows(frame_times: list[float], frame_sizes: list[int], k: int, window_seconds: float,
                 audio_seconds: torch.Tensor | None = None, audio_kept: torch.Tensor | None = None) -> list[Window]:
    """Split ``k`` video tokens over the time windows of a clip.

    Frame ``f`` (``frame_sizes[f]`` tokens, starting at ``frame_times[f]`` s) falls in window
    ``floor(frame_times[f] / window_seconds)``. A window's audio retention is the kept share of the audio tokens
    starting in it (``audio_kept`` bool ``[Na]`` at ``audio_seconds`` ``[Na]``); a window without audio tokens takes
    the clip's overall audio retention; without audio every window has the same ratio. The keep ratios
    ``1 - drop_ratio`` are rescaled by one common factor so the windows' counts sum to exactly ``k``
    (:func:`tokenzip.ops.split_weighted`: water-filling, a full window's excess goes to the others)."""
    order: dict[int, list[int]] = {}
    for f, t in enumerate(frame_times):
        order.setdefault(int(math.floor(t / window_seconds + 1e-9)), []).append(f)
    overall = None
    if audio_kept is not None and audio_kept.numel():
        overall = float(audio_kept.float().mean())
        audio_win = torch.floor(audio_seconds.double() / window_seconds + 1e-9).long()
    total = sum(frame_sizes)
    plans = []
    for w, frames in sorted(order.items()):
        if overall is None:  # no audio to listen to: one ratio for all (reported as the budget's, S_a = nan)
            retention, drop = math.nan, 1.0 - min(k, total) / total
        else:
            inside = audio_win == w
            retention = float(audio_kept[inside].float().mean()) if bool(inside.any()) else overall
            drop = video_drop_ratio(retention)
        plans.append((w, tuple(frames), sum(frame_sizes[f] for f in frames), retention, drop))
    sizes = [p[2] for p in plans]
    alloc = ops.split_weighted(sizes, [(1.0 - p[4]) * p[2] for p in plans], k)
    return [Window(w, frames, n, s, rho, kk) for (w, frames, n, s, rho), kk in zip(plans, alloc)]


@dataclass
class OmniZip(JointCompressor):
    """OmniZip ("OmniZip: Audio-Guided Dynamic Token Compression for Fast Omnimodal Large Language Models", Tao et
    al., arXiv:2511.14582), for omni models that hand the LLM a clip's audio and video (Qwen2.5-Omni).

    Per sample, each video is paired with its own soundtrack as the adapter pairs them (``JointItem.partner``:
    Qwen2.5-Omni's ``use_audio_in_video``); when the adapter gives no pairing, the i-th video with the i-th audio
    stream of the sample:

    1. Audio token selection: audio tokens are scored by the attention they receive in the audio encoder's last
       layer (``cls_attention``: the mean attention each token receives, recomputed from that layer's q/k by the
       adapter, no eager attention) and the top ``k_a`` are kept, in time order.
    2. Audio-guided video budget: the clip is cut into windows of ``window_seconds`` (2 s, Qwen2.5-Omni's
       ``seconds_per_chunk``); a window's audio retention ``S_a(i)`` (kept share of its audio tokens) sets its video
       drop ratio ``rho_v(i) = clip(0.75 - 0.4 * S_a(i), 0.35, 0.75)`` (silence -> pruned harder), and the keep
       ratios ``1 - rho_v(i)`` are rescaled by one factor so the windows sum to exactly the video budget ``k_v``
       (:func:`plan_windows`).
    3. Interleaved spatio-temporal compression (ISTC) inside each window, its count shared by its frames (temporal
       grids) in proportion to size: even frames of the window (0, 2, ...) are merged spatially by DPC-KNN
       (``neighbors``, as :class:`tokenzip.methods.DpcKnn`: cluster means), odd frames keep the tokens least
       similar (cosine) to the token at the same position of the previous frame and drop the rest.

    Budget, per modality: ``retain``/``tokens`` applies to audio and video items alike; ``audio_retain`` /
    ``video_retain`` override it for one modality. Each item ends with exactly its modality's count; the windows
    only move video tokens between themselves. Time: an adapter may give each token's start time
    (``JointItem.seconds``); otherwise audio tokens run at ``audio_rate`` per second (Qwen2.5-Omni's audio encoder:
    25) and the video frames are spread evenly over the paired audio's duration (the clip they share). A video
    without audio (no pair, or a video-only model) gets the same ratio in every window, and an audio stream
    without video is pruned by step 1 alone, so the method also runs on one modality.

    Departures: the paper's ``rho_v`` is a drop ratio applied as is, so its total follows from the audio; we rescale
    to the budget so the LLM gets exactly ``k_v`` (the ratios between windows are the paper's). The paper's audio
    anchor consolidation (uniformly sampled audio anchors merged with non-anchor tokens chosen by cross-modal
    similarity) is not reproduced: audio is kept by its attention score alone. The paper's ISTC alternates between
    temporal and spatial reduction over a window's frames; we merge even frames spatially (DPC-KNN) and prune odd
    frames against the previous frame at the same position, and split a window's count over its frames by size
    (the paper gives no split); the official code (github.com/KD-TAO/OmniZip) was not checked for either choice.
    Ties go to the earlier token; DPC-KNN density ties to the earlier token (no random jitter).

    ``last_windows``: for the last call, per sample, per video, its :class:`Window` plan (index, frames, audio
    retention, drop ratio, kept count).
    """

    audio_retain: float | None = None
    video_retain: float | None = None
    window_seconds: float = 2.0
    audio_rate: float = 25.0
    neighbors: int = 5

    info: ClassVar[MethodInfo] = MethodInfo(
        name="omnizip", family="attention", modalities=("audio", "video"), stage="pre_llm", query_aware=False,
        reference="Tao et al., OmniZip: Audio-Guided Dynamic Token Compression for Fast Omnimodal Large Language "
                  "Models, arXiv:2511.14582")
    # read for the audio items; the adapter computes it for every item it hands over (as for any method)
    requires: ClassVar[tuple[str, ...]] = ("cls_attention",)
    last_windows = per_call(factory=list, published=True)  # per thread, as last_stats (tokenzip/callstate.py)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("audio_retain", "video_retain"):
            value = getattr(self, name)
            if value is not None:
                try:
                    self.budgets[name.split("_")[0]] = Budget(retain=value)
                except (TypeError, ValueError) as e:
                    raise type(e)(f"{name}: {e}") from None
        for name in ("window_seconds", "audio_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) > 0 \
                    or math.isinf(float(value)):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if isinstance(self.neighbors, bool) or not isinstance(self.neighbors, int) or self.neighbors < 1:
            raise ValueError(f"neighbors must be an int >= 1, got {self.neighbors!r}")
        self.last_windows: list[list[Window]] = []

    def __repr__(self) -> str:
        extra = "".join(f", {m}_retain={b.retain:g}" for m, b in self.budgets.items())
        return f"{type(self).__name__}({self.budget}{extra})"

    def compress_items(self, items: list, needs: frozenset[str]) -> list[CompressOutput]:
        self.last_windows = []  # one call, one plan per sample
        return super().compress_items(items, needs)

    def compress(self, tokens: torch.Tensor, *, grid: object = None, k: int | None = None,
                 **signals: torch.Tensor) -> CompressOutput:
        self.last_windows = []
        return super().compress(tokens, grid=grid, k=k, **signals)

    # ---- the work -----------------------------------------------------------------------------------------------
    def _compress_sample(self, items: list[JointItem]) -> list[CompressOutput]:
        audios = [i for i, it in enumerate(items) if it.modality == "audio"]
        videos = [i for i, it in enumerate(items) if it.modality == "video"]
        outs: list[CompressOutput | None] = [None] * len(items)
        kept_masks: dict[int, torch.Tensor] = {}
        for i in audios:
            it = items[i]
            keep = ops.stable_topk(it.signals["cls_attention"][0].float(), it.k)
            outs[i] = ops.select(it.tokens, keep.unsqueeze(0))
            mask = torch.zeros(it.n, dtype=torch.bool, device=it.tokens.device)
            mask[keep] = True
            kept_masks[i] = mask
        paired = any(it.partner is not None for it in items)
        windows = []
        for j, i in enumerate(videos):
            if paired:  # the adapter's pairing (a video and its own soundtrack); a video without one goes alone
                pair = items[i].partner if items[i].partner in kept_masks else None
            else:
                pair = audios[j] if j < len(audios) else None
            outs[i], plan = self._video(items[i], None if pair is None else items[pair],
                                        None if pair is None else kept_masks[pair])
            windows.append(plan)
        self.last_windows.append(windows)
        return outs  # type: ignore[return-value]

    def _audio_seconds(self, audio: JointItem) -> torch.Tensor:
        if audio.seconds is not None:
            return audio.seconds.double().cpu()
        return torch.arange(audio.n, dtype=torch.float64) / float(self.audio_rate)

    def _video(self, video: JointItem, audio: JointItem | None, kept: torch.Tensor | None
               ) -> tuple[CompressOutput, list[Window]]:
        tokens, layout = video.tokens, video.grid
        markers, kv = ops.reserve_markers(layout, video.k)
        frames = ops.visual_frames(layout)
        if video.seconds is not None:
            times = [float(video.seconds[start]) for start, _, _ in frames]
        elif audio is not None:
            secs = self._audio_seconds(audio)
            duration = float(secs[-1]) + 1.0 / float(self.audio_rate)
            times = [f * duration / len(frames) for f in range(len(frames))]
        else:
            times = [0.0] * len(frames)  # one window: no time axis to guide by
        sizes = [h * w for _, h, w in frames]
        plan = plan_windows(times, sizes, kv, float(self.window_seconds),
                            None if audio is None else self._audio_seconds(audio),
                            None if kept is None else kept.cpu())
        if video.k >= video.n:
            return ops.select(tokens, torch.arange(video.n, device=tokens.device).unsqueeze(0)), plan
        assign = torch.full((video.n,), -1, dtype=torch.long, device=tokens.device)
        groups = 0
        for p in markers:
            assign[p] = groups
            groups += 1
        for win in plan:
            alloc = ops.split_budget([sizes[f] for f in win.frames], win.keep)
            for offset, (f, kk) in enumerate(zip(win.frames, alloc)):
                start, h, w = frames[f]
                size = h * w
                if kk == 0:
                    continue
                prev = win.frames[offset - 1] if offset % 2 == 1 else None
                if prev is not None and frames[prev][1:] == (h, w):
                    # odd frame: keep what changed since the previous frame
                    sim = ops.same_position_similarity(tokens, start, frames[prev][0], size)[0]
                    keep = ops.stable_topk(-sim, kk)
                    assign[start + keep] = torch.arange(groups, groups + kk, device=tokens.device)
                elif kk >= size:
                    assign[start: start + size] = torch.arange(groups, groups + size, device=tokens.device)
                else:  # even frame (or no comparable previous one): spatial DPC-KNN merging
                    x = tokens[0, start: start + size]
                    centres, dist = dpc_knn_centres(x, kk, self.neighbors)
                    centres = torch.sort(centres).values
                    slot = torch.argmin(dist[:, centres], dim=1)
                    slot[centres] = torch.arange(kk, device=tokens.device)
                    assign[start: start + size] = groups + slot
                groups += kk
        return ops.merge(tokens, assign.unsqueeze(0), groups), plan
