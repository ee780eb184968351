"""tokenzip.vllm without vLLM: hf_overrides, the checks on what vLLM can serve, lazy imports. (The engine tests are
in tests/vllm, run by `make test-vllm`.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import tokenzip as tz
import tokenzip.vllm as tzv
from tokenzip.deps import MissingDependency


def test_overrides_is_json_with_architecture_and_method():
    ov = tzv.overrides("visionzip", model="Qwen2_5_VLForConditionalGeneration", retain=0.1)
    assert ov == {"architectures": ["TokenzipQwen2_5_VLForConditionalGeneration"],
                  "tokenzip": {"method": "visionzip", "retain": 0.1}}
    assert json.loads(json.dumps(ov)) == ov
    ov = tzv.overrides("divprune", model="Qwen2VLForConditionalGeneration", tokens=16)
    assert ov["architectures"] == ["TokenzipQwen2VLForConditionalGeneration"]
    assert ov["tokenzip"] == {"method": "divprune", "tokens": 16}
    assert tzv.overrides("tome", model="Qwen3VLForConditionalGeneration", retain=0.5)["architectures"] == [
        "TokenzipQwen3VLForConditionalGeneration"]


def test_every_architecture_names_its_module():
    from tokenzip.vllm.config import MODULES

    assert set(MODULES) == set(tzv.ARCHITECTURES.values())
    assert MODULES["TokenzipQwen3VLForConditionalGeneration"] == "tokenzip.vllm.qwen3_vl"


def test_overrides_reads_a_checkpoint_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl",
                                                      "architectures": ["Qwen2VLForConditionalGeneration"]}))
    assert tzv.overrides("tome", model=str(tmp_path), retain=0.5)["architectures"] == [
        "TokenzipQwen2VLForConditionalGeneration"]


def test_method_from_config_round_trip():
    class Cfg:
        tokenzip = {"method": "visionzip", "retain": 0.25}

    method = tzv.method_from_config(Cfg())
    assert isinstance(method, tz.method_class("visionzip")) and method.budget.count(16) == 4


@pytest.mark.parametrize("method,match", [
    ("nosuchmethod", "unknown method"),
    ("fastv", "slot mapping"),          # LLM stage
    ("sparsevlm", "slot mapping"),
    ("trim", "prompt text"),            # query-aware pre-LLM
    ("evit", "vision encoder's layers"),  # stage "encoder"
    ("uniform_frames", "model's inputs"),  # stage "input"
    ("omnizip", "slot mapping|together|prompt"),
    ("attn_topk", "compresses \\['audio'\\]"),
])
def test_unservable_methods_are_refused(method, match):
    with pytest.raises(ValueError, match=match):
        tzv.overrides(method, model="Qwen2_5_VLForConditionalGeneration", retain=0.5)


def test_bad_budget_and_model_are_refused():
    with pytest.raises(ValueError, match="retain"):
        tzv.overrides("visionzip", model="Qwen2_5_VLForConditionalGeneration", retain=1.5)
    with pytest.raises(ValueError, match="serves"):
        tzv.overrides("visionzip", model="LlavaForConditionalGeneration", retain=0.5)
    with pytest.raises(TypeError, match="model"):
        tzv.overrides("visionzip", model=None, retain=0.5)
    with pytest.raises(ValueError, match="hf_overrides"):
        tzv.method_from_config(object())


def test_serving_methods_all_pass_the_check():
    names = tzv.serving_methods()
    assert {"visionzip", "divprune", "tome", "random", "vidcom2"} <= set(names)
    assert not {"fastv", "trim", "omnizip", "evit"} & set(names)
    for name in names:
        tzv.check_method(name, retain=0.5)


def test_import_without_vllm_names_the_extra():
    code = ("import sys; sys.modules['vllm'] = None\n"
            "import tokenzip, tokenzip.vllm\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'vllm' and sys.modules[m] is not None]\n"
            "for mod in ('qwen_vl', 'qwen3_vl'):\n"
            "    try:\n        __import__('tokenzip.vllm.' + mod)\n"
            "    except ImportError as e:\n        print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("MissingDependency") == 2 and 'pip install "tokenzip[vllm]"' in out.stdout
    assert issubclass(MissingDependency, ImportError)


def test_bench_engine_vllm_checks_its_arguments():
    from tokenzip.bench.cli import run

    with pytest.raises(SystemExit, match="qwen2-vl-2b"):
        run(["--engine", "vllm", "--model", "llava-1.5-7b"])
    with pytest.raises(SystemExit, match="requests"):
        run(["--engine", "vllm", "--model", "qwen2-vl-2b", "--requests", "0"])
