"""Bad configurations fail when vLLM loads the engine, with a clear error (no engine stays alive in this module)."""

from __future__ import annotations

import pytest
import vllm_case as V
from tiny_checkpoint import build


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen2_5_vl_errors")
    V.set_env(str(tmp))
    return str(build(tmp / "ckpt", "qwen2_5_vl"))


def test_bad_configuration_fails_at_engine_load(ckpt):
    with pytest.raises(Exception, match="slot mapping"):  # an LLM-stage method
        V.engine(ckpt, {"architectures": ["TokenzipQwen2_5_VLForConditionalGeneration"],
                        "tokenzip": {"method": "fastv", "retain": 0.5}})
    # another architecture's class on this checkpoint: vLLM's own config check (the processor) or tokenzip's
    with pytest.raises(Exception, match="Invalid type of HuggingFace config|serves 'qwen2_vl' checkpoints"):
        V.engine(ckpt, {"architectures": ["TokenzipQwen2VLForConditionalGeneration"],
                        "tokenzip": {"method": "visionzip", "retain": 0.5}})
    with pytest.raises(Exception, match="video_pruning_rate"):  # vLLM's EVS beside tokenzip's selection
        V.engine(ckpt, {"architectures": ["TokenzipQwen2_5_VLForConditionalGeneration"],
                        "tokenzip": {"method": "visionzip", "retain": 0.5}}, video_pruning_rate=0.3)
