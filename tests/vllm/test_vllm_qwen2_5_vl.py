"""tokenzip served by vLLM (CPU build, in-process engine) on a tiny Qwen2.5-VL checkpoint: the invariants across
engines. Engines are built once per module: stock vLLM, tokenzip at retain=1, and VisionZip at retain=0.25."""

from __future__ import annotations

import pytest
import torch
import vllm_case as V
from tiny_checkpoint import build, image, video

import tokenzip as tz
import tokenzip.vllm as tzv

RETAIN = 0.25
# (prompt, multi_modal_data): a wide image, a tall one (the text after it continues at its height, not its width),
# two images of different sizes, an image and a clip
IMAGES = {"wide": image(112, 168, 0), "tall": image(168, 112, 1), "small": image(56, 112, 2),
          "square": image(112, 112, 3)}
CLIP = V.video_item(video(4, 112, 112, 4))
REQUESTS = [
    (V.chat(V.IMAGE_PROMPT), {"image": IMAGES["wide"]}),
    (V.chat(V.IMAGE_PROMPT), {"image": IMAGES["tall"]}),
    (V.chat(V.IMAGE_PROMPT + V.IMAGE_PROMPT, "compare"), {"image": [IMAGES["small"], IMAGES["square"]]}),
    (V.chat(V.IMAGE_PROMPT + V.VIDEO_PROMPT, "what happens"), {"image": IMAGES["tall"], "video": CLIP}),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen2_5_vl")
    V.set_env(str(tmp))
    return str(build(tmp / "ckpt", "qwen2_5_vl"))


@pytest.fixture(scope="module")
def stock(ckpt):
    llm = V.engine(ckpt)
    out = V.generate(llm, REQUESTS)
    V.close(llm)
    return out


@pytest.fixture(scope="module")
def full(ckpt):
    llm = V.engine(ckpt, tzv.overrides("visionzip", model=ckpt, retain=1.0))
    out = V.generate(llm, REQUESTS)
    V.close(llm)
    return out


@pytest.fixture(scope="module")
def compressed(ckpt, stock, full):  # after the others: one engine alive at a time
    llm = V.engine(ckpt, tzv.overrides("visionzip", model=ckpt, retain=RETAIN))
    yield llm
    V.close(llm)


def test_cpu_environment_applied(stock):
    import sitecustomize

    assert {"torchvision", "cpu_runner"} <= sitecustomize.APPLIED


def test_retain_one_equals_stock_vllm(stock, full):
    for s, f in zip(stock, full, strict=True):
        assert f.prompt_token_ids == s.prompt_token_ids
        assert f.outputs[0].token_ids == s.outputs[0].token_ids
        assert V.logprobs(f) == V.logprobs(s)


def test_exactly_k_placeholders_per_item(ckpt, compressed, stock):
    cfg = compressed.llm_engine.model_config.hf_config
    method = tz.get("visionzip", retain=RETAIN)
    outs = V.generate(compressed, REQUESTS)
    for out, ref in zip(outs, stock, strict=True):
        full_images = V.runs(ref.prompt_token_ids, cfg.image_token_id)
        assert V.runs(out.prompt_token_ids, cfg.image_token_id) == [method.budget.count(n) for n in full_images]
        # VisionZip compresses images only: the clip keeps all its placeholders
        assert V.runs(out.prompt_token_ids, cfg.video_token_id) == V.runs(ref.prompt_token_ids, cfg.video_token_id)
        assert len(out.prompt_token_ids) < len(ref.prompt_token_ids)


@pytest.mark.parametrize("which", range(len(REQUESTS)))
def test_same_tokens_and_output_as_hf_path(ckpt, compressed, which):
    """Same weights and inputs: vLLM keeps the tokens tokenzip's HF path keeps, and generates the same tokens."""
    prompt, data = REQUESTS[which]
    images, videos = V.media(data)
    V.clear_kept(compressed)
    out = V.generate(compressed, [(prompt, data)], f"parity-{which}")[0]
    model = V.hf_model(ckpt)
    tokens, hf_kept = V.hf_generate(model, V.hf_inputs(ckpt, prompt, images, videos),
                                    tz.get("visionzip", retain=RETAIN))
    assert V.by_modality(V.kept(compressed))["image"] == hf_kept["image"]
    assert list(out.outputs[0].token_ids) == tokens


def test_uncompressed_hf_path_matches_stock_vllm(ckpt, stock):
    """The reference the parity test leans on: HF and vLLM agree on the tiny checkpoint uncompressed."""
    prompt, data = REQUESTS[1]
    tokens, _ = V.hf_generate(V.hf_model(ckpt), V.hf_inputs(ckpt, prompt, [data["image"]]))
    assert list(stock[1].outputs[0].token_ids) == tokens


def test_batched_requests_equal_each_alone(compressed):
    batched = V.generate(compressed, REQUESTS, "batched")
    for i, (req, b) in enumerate(zip(REQUESTS, batched, strict=True)):
        alone = V.generate(compressed, [req], f"alone-{i}")[0]
        assert b.prompt_token_ids == alone.prompt_token_ids
        assert b.outputs[0].token_ids == alone.outputs[0].token_ids
        torch.testing.assert_close(torch.tensor(V.logprobs(b)), torch.tensor(V.logprobs(alone)), rtol=1e-4,
                                   atol=1e-4)
