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


def method_case_pairs():
    return [pytest.param(m, c, id=f"{m.info.name}-{c}") for m in tz.METHODS for c in CASES
            if compatible(m, CASES[c])]


@pytest.fixture
def model_factory():
    return built
