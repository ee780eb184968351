"""Video on vLLM: a clip compressed by a video method (VidCom2) beside an image that reaches the LLM whole, on the
tiny Qwen2.5-VL (one engine for the module)."""

from __future__ import annotations

import pytest
import vllm_case as V
from tiny_checkpoint import build, image, video

import tokenzip as tz
import tokenzip.vllm as tzv

METHOD, RETAIN = "vidcom2", 0.5
REQUESTS = [
    (V.chat(V.VIDEO_PROMPT, "what happens"), {"video": V.video_item(video(4, 112, 168, 0))}),
    (V.chat(V.IMAGE_PROMPT + V.VIDEO_PROMPT, "what happens"),
     {"image": image(168, 112, 1), "video": V.video_item(video(6, 168, 112, 2))}),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen2_5_vl_video")
    V.set_env(str(tmp))
    return str(build(tmp / "ckpt", "qwen2_5_vl"))


@pytest.fixture(scope="module")
def llm(ckpt):
    engine = V.engine(ckpt, tzv.overrides(METHOD, model=ckpt, retain=RETAIN))
    yield engine
    V.close(engine)


@pytest.mark.parametrize("which", range(len(REQUESTS)))
def test_video_placeholders_kept_tokens_and_output_match_hf_path(ckpt, llm, which):
    prompt, data = REQUESTS[which]
    V.clear_kept(llm)
    out = V.generate(llm, [(prompt, data)], f"video-{which}")[0]
    images, videos = V.media(data)
    inputs = V.hf_inputs(ckpt, prompt, images, videos)
    cfg = llm.llm_engine.model_config.hf_config
    method = tz.get(METHOD, retain=RETAIN)
    full_clip = V.runs(inputs["input_ids"][0].tolist(), cfg.video_token_id)
    assert V.runs(out.prompt_token_ids, cfg.video_token_id) == [method.budget.count(n) for n in full_clip]
    assert V.runs(out.prompt_token_ids, cfg.image_token_id) == V.runs(inputs["input_ids"][0].tolist(),
                                                                       cfg.image_token_id)  # the image: whole
    tokens, hf_kept = V.hf_generate(V.hf_model(ckpt), inputs, method)
    assert V.by_modality(V.kept(llm))["video"] == hf_kept["video"]
    assert list(out.outputs[0].token_ids) == tokens
