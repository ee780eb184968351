"""tokenzip served by vLLM on a tiny Qwen3-VL (DeepStack levels after vision blocks 0 and 1): images only, the
invariants of the Qwen2.5-VL module. Engines one at a time: stock vLLM, tokenzip at retain=1, VisionZip (pruning) and
ToMe (merging: each merged token's DeepStack rows are its group's mean, as on the HF path)."""

from __future__ import annotations

import pytest
import torch
import vllm_case as V
from tiny_checkpoint import build, image

import tokenzip as tz
import tokenzip.vllm as tzv

IMAGES_ONLY = {"limit_mm_per_prompt": {"image": 3, "video": 0}}
METHODS = {"visionzip": 0.25, "tome": 0.5}
# a wide image, a tall one (the text after it continues at its height), two images of different sizes
REQUESTS = [
    (V.chat(V.IMAGE_PROMPT), {"image": image(128, 192, 0)}),
    (V.chat(V.IMAGE_PROMPT), {"image": image(192, 128, 1)}),
    (V.chat(V.IMAGE_PROMPT + V.IMAGE_PROMPT, "compare"), {"image": [image(64, 128, 2), image(128, 128, 3)]}),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen3_vl")
    V.set_env(str(tmp))
    return str(build(tmp / "ckpt", "qwen3_vl"))


@pytest.fixture(scope="module")
def stock(ckpt):
    llm = V.engine(ckpt, **IMAGES_ONLY)
    out = V.generate(llm, REQUESTS)
    V.close(llm)
    return out


@pytest.fixture(scope="module")
def full(ckpt, stock):
    llm = V.engine(ckpt, tzv.overrides("visionzip", model=ckpt, retain=1.0), **IMAGES_ONLY)
    out = V.generate(llm, REQUESTS)
    V.close(llm)
    return out


@pytest.fixture(scope="module", params=sorted(METHODS))
def compressed(request, ckpt, stock, full):  # after the others: one engine alive at a time
    name = request.param
    llm = V.engine(ckpt, tzv.overrides(name, model=ckpt, retain=METHODS[name]), **IMAGES_ONLY)
    yield name, llm
    V.close(llm)


def test_overrides_select_the_qwen3_vl_class(ckpt):
    assert tzv.overrides("visionzip", model=ckpt, retain=0.5)["architectures"] == [
        "TokenzipQwen3VLForConditionalGeneration"]


def test_retain_one_equals_stock_vllm(stock, full):
    for s, f in zip(stock, full, strict=True):
        assert f.prompt_token_ids == s.prompt_token_ids
        assert f.outputs[0].token_ids == s.outputs[0].token_ids
        assert V.logprobs(f) == V.logprobs(s)


def test_uncompressed_hf_path_matches_stock_vllm(ckpt, stock):
    """The reference the parity tests lean on: HF and vLLM agree on the tiny checkpoint uncompressed."""
    prompt, data = REQUESTS[1]
    tokens, _ = V.hf_generate(V.hf_model(ckpt, "qwen3_vl"), V.hf_inputs(ckpt, prompt, [data["image"]]))
    assert list(stock[1].outputs[0].token_ids) == tokens


def test_exactly_k_placeholders_per_image(compressed, stock):
    name, llm = compressed
    cfg = llm.llm_engine.model_config.hf_config
    method = tz.get(name, retain=METHODS[name])
    for out, ref in zip(V.generate(llm, REQUESTS, "count"), stock, strict=True):
        full_images = V.runs(ref.prompt_token_ids, cfg.image_token_id)
        assert V.runs(out.prompt_token_ids, cfg.image_token_id) == [method.budget.count(n) for n in full_images]
        assert len(out.prompt_token_ids) < len(ref.prompt_token_ids)


@pytest.mark.parametrize("which", range(len(REQUESTS)))
def test_same_tokens_and_output_as_hf_path(ckpt, compressed, which):
    """Same weights and inputs: vLLM keeps (merges) the tokens tokenzip's HF path keeps, each with its DeepStack
    rows, and generates the same tokens."""
    name, llm = compressed
    prompt, data = REQUESTS[which]
    images, _ = V.media(data)
    V.clear_kept(llm)
    out = V.generate(llm, [(prompt, data)], f"parity-{name}-{which}")[0]
    tokens, hf_kept = V.hf_generate(V.hf_model(ckpt, "qwen3_vl"), V.hf_inputs(ckpt, prompt, images),
                                    tz.get(name, retain=METHODS[name]))
    assert V.by_modality(V.kept(llm))["image"] == hf_kept["image"]
    assert list(out.outputs[0].token_ids) == tokens


def test_batched_requests_equal_each_alone(compressed):
    name, llm = compressed
    batched = V.generate(llm, REQUESTS, f"batched-{name}")
    for i, (req, b) in enumerate(zip(REQUESTS, batched, strict=True)):
        alone = V.generate(llm, [req], f"alone-{name}-{i}")[0]
        assert b.prompt_token_ids == alone.prompt_token_ids
        assert b.outputs[0].token_ids == alone.outputs[0].token_ids
        torch.testing.assert_close(torch.tensor(V.logprobs(b)), torch.tensor(V.logprobs(alone)), rtol=1e-4,
                                   atol=1e-4)


def test_videos_refused_at_engine_load(ckpt):
    """Qwen3-VL's per-grid timestamped video runs do not fit a placeholder count fixed before the encoder."""
    with pytest.raises(Exception, match="images only.*limit_mm_per_prompt"):
        V.engine(ckpt, tzv.overrides("visionzip", model=ckpt, retain=0.5))  # videos allowed by default
    with pytest.raises(Exception, match="compresses videos"):
        V.engine(ckpt, tzv.overrides("vidcom2", model=ckpt, retain=0.5), **IMAGES_ONLY)
