"""Qwen2-VL on vLLM (its in-tree class has no pruning hooks; tokenzip's subclass adds them): ToMe (merging, on the
last vision block's keys) against tokenzip's HF path on the same tiny checkpoint (one engine for the module)."""

from __future__ import annotations

import pytest
import vllm_case as V
from tiny_checkpoint import build, image, video

import tokenzip as tz
import tokenzip.vllm as tzv

METHOD, RETAIN = "tome", 0.5
REQUESTS = [
    (V.chat(V.IMAGE_PROMPT), {"image": image(168, 112, 0)}),
    (V.chat(V.IMAGE_PROMPT + V.IMAGE_PROMPT, "compare"), {"image": [image(112, 168, 1), image(56, 56, 2)]}),
    (V.chat(V.VIDEO_PROMPT + V.IMAGE_PROMPT, "what happens"),
     {"video": V.video_item(video(4, 112, 112, 3)), "image": image(112, 112, 4)}),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen2_vl")
    V.set_env(str(tmp))
    return str(build(tmp / "ckpt", "qwen2_vl"))


@pytest.fixture(scope="module")
def llm(ckpt):
    engine = V.engine(ckpt, tzv.overrides(METHOD, model=ckpt, retain=RETAIN))
    yield engine
    V.close(engine)


@pytest.mark.parametrize("which", range(len(REQUESTS)))
def test_placeholders_kept_tokens_and_output_match_hf_path(ckpt, llm, which):
    prompt, data = REQUESTS[which]
    V.clear_kept(llm)
    out = V.generate(llm, [(prompt, data)], f"qwen2-{which}")[0]
    images, videos = V.media(data)
    inputs = V.hf_inputs(ckpt, prompt, images, videos)
    cfg = llm.llm_engine.model_config.hf_config
    method = tz.get(METHOD, retain=RETAIN)
    ids = inputs["input_ids"][0].tolist()
    assert V.runs(out.prompt_token_ids, cfg.image_token_id) == [method.budget.count(n)
                                                                 for n in V.runs(ids, cfg.image_token_id)]
    assert V.runs(out.prompt_token_ids, cfg.video_token_id) == V.runs(ids, cfg.video_token_id)  # ToMe: images only
    tokens, hf_kept = V.hf_generate(V.hf_model(ckpt, "qwen2_vl"), inputs, method)
    assert V.by_modality(V.kept(llm))["image"] == hf_kept["image"]
    assert list(out.outputs[0].token_ids) == tokens
