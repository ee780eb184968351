"""The method registry: one line per method."""

from __future__ import annotations

from ..base import Compressor
from .atome import AToMe
from .attn_topk import AttnTopK
from .auroracap import AuroraCap
from .avg_pool import AvgPool
from .bilinear import Bilinear
from .cls_topk import ClsTopK
from .divprune import DivPrune
from .dpc_knn import DpcKnn
from .evit import EViT
from .fastv import FastV
from .folder import Folder
from .prumerge_plus import PruMergePlus
from .pyramiddrop import PyramidDrop
from .random_prune import RandomPrune
from .sparsevlm import SparseVLM
from .speechprune import SpeechPrune
from .tome import ToMe
from .trim import Trim
from .vad_prune import VadPrune
from .visionzip import VisionZip
from .vispruner import VisPruner
from .vtw import VTW
from .zipvl import ZipVL

# A method's `info.modalities` names only what an adapter can hand it: no adapter compresses video yet (LLaVA-OneVision
# and Qwen2-VL pass videos through uncompressed), so no method declares "video" until one does.
METHODS: list[type[Compressor]] = [
    RandomPrune,
    AvgPool,
    Bilinear,
    ToMe,
    DivPrune,
    DpcKnn,
    ClsTopK,
    PruMergePlus,
    VisionZip,
    VisPruner,
    Trim,
    AToMe,
    AttnTopK,
    VadPrune,
    SpeechPrune,
    FastV,
    PyramidDrop,
    VTW,
    SparseVLM,
    ZipVL,
    AuroraCap,
    Folder,
    EViT,
]

__all__ = ["METHODS"] + [cls.__name__ for cls in METHODS]
