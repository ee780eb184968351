import functools

import pytest
import torch

import tokenzip as tz
from tokenzip.testing import CASES

torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def built(case: str, attn: str = "sdpa") -> torch.nn.Module:
    return CASES[case].build(attn)


def compatible(method_cls, case) -> bool:
    info = method_cls.info
    return info.stage in case.stages and bool(set(info.modalities) & set(case.modalities))


class InEncoderEntry:
    """A registered pre-LLM method run inside the encoder (``tz.InEncoder``), callable like a method class."""

    def __init__(self, cls, layer: int = 1):
        self.cls, self.layer = cls, layer
        self.info = tz.InEncoder(cls(retain=1.0), layer=layer).info

    def __call__(self, **budget):
        return tz.InEncoder(self.cls(**budget), layer=self.layer)


# every pre-LLM method that can compress audio, also inside the (2-layer) tiny encoders, cut after layer 1
ENCODER_STAGE = [InEncoderEntry(m) for m in tz.METHODS if m.info.stage == "pre_llm" and "audio" in m.info.modalities]


def method_case_pairs():
    return [pytest.param(m, c, id=f"{m.info.name}-{c}") for m in [*tz.METHODS, *ENCODER_STAGE] for c in CASES
            if compatible(m, CASES[c])]


@pytest.fixture
def model_factory():
    return built
