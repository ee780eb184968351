"""The method registry: one line per method."""

from __future__ import annotations

from ..base import Compressor
from .adafv import AdaFV
from .atome import AToMe
from .attn_topk import AttnTopK
from .auroracap import AuroraCap
from .avg_pool import AvgPool
from .bilinear import Bilinear
from .cdpruner import CDPruner
from .cls_topk import ClsTopK
from .crops import Crops
from .dart import DART
from .divprune import DivPrune
from .dpc_knn import DpcKnn
from .dpc_knn_events import DpcKnnEvents
from .dycoke import DyCoke
from .dycoke_kv import DyCokeKV
from .evit import EViT
from .evs import EVS
from .fastv import FastV
from .fastv_av import FastVAudioVideo
from .fastvid import FastVID
from .fitprune import FitPrune, FitPruneRecipe
from .flashvid import FlashVID
from .folder import Folder
from .frame_dedup_dinov2 import FrameDedupDinov2
from .frame_dedup_pixel import FrameDedupPixel
from .framefusion import FrameFusion
from .globalcom2 import GlobalCom2
from .hiprune import HiPrune
from .holitom import HoliTom
from .holov import HoloV
from .llava_scissor import LlavaScissor
from .longvu_query import LongVUQuery
from .mustdrop import MustDrop
from .omnizip import OmniZip
from .pixelprune import PixelPrune
from .pllava_pool import PLLaVAPool
from .prumerge_plus import PruMergePlus
from .prunevid import PruneVid
from .pyramiddrop import PyramidDrop
from .random_prune import RandomPrune
from .resize import Resize
from .scope import SCOPE
from .slowfast import SlowFast
from .sparsevlm import SparseVLM
from .speechprune import SpeechPrune
from .st3 import ST3
from .sttm import STTM
from .tokencarve import TokenCarve
from .tome import ToMe
from .topv import TopV
from .trim import Trim
from .uniform_frames import UniformFrames
from .vad_prune import VadPrune
from .vidcom2 import VidCom2
from .visionzip import VisionZip
from .vispruner import VisPruner
from .vscan import VScan
from .vtw import VTW
from .zipvl import ZipVL

# A method's `info.modalities` names only what an adapter can hand it (tests/test_methods.py checks every claimed
# modality is compressed by some adapter).
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
    PLLaVAPool,
    SlowFast,
    DyCoke,
    EVS,
    VidCom2,
    FastVID,
    HoliTom,
    PruneVid,
    LlavaScissor,
    DpcKnnEvents,
    FlashVID,
    Resize,
    Crops,
    AuroraCap,
    Folder,
    EViT,
    UniformFrames,
    FrameDedupPixel,
    FrameDedupDinov2,
    LongVUQuery,
    FrameFusion,
    DyCokeKV,
    OmniZip,
    FastVAudioVideo,
    DART,
    CDPruner,
    SCOPE,
    HiPrune,
    TokenCarve,
    AdaFV,
    GlobalCom2,
    HoloV,
    STTM,
    PixelPrune,
    ST3,
    MustDrop,
    VScan,
    FitPrune,
    TopV,
]

__all__ = ["METHODS", "FitPruneRecipe"] + [cls.__name__ for cls in METHODS]
