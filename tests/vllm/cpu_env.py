"""CPU-only fixes for the vLLM test environment (``make test-vllm`` installs this file as ``sitecustomize.py`` of
``.venv-vllm``, so it also applies to engine processes vLLM spawns). Never part of tokenzip's user path: a GPU
install of vLLM needs none of it.

1. **torchvision without its C ops.** The package registry's torchvision 0.28.0 is a CUDA build: its ``_C.so`` needs
   ``libc10_cuda`` and does not load against the CPU torch, and ``torchvision/_meta_registrations.py`` then fails
   (``RuntimeError: operator torchvision::nms does not exist``) registering fake kernels for the ops that did not
   load. transformers needs torchvision to build ``Qwen2_5_VLProcessor`` (its video processor), and the processor
   uses no torchvision C op. Fix: while that module is imported, ``torch.library.register_fake`` skips the
   ``torchvision::`` ops when torchvision's C ops are absent. (torchcodec and torchaudio, CUDA-linked too, are
   uninstalled by the Makefile: vLLM treats them as optional.)
2. **Pruning on the CPU runner.** vLLM 0.32 switches its multimodal pruning path on only in
   ``GPUModelRunner.load_model`` (``is_multimodal_pruning_enabled``, which makes the runner call the model's
   ``recompute_mrope_positions``); ``CPUModelRunner.load_model`` replaces that method and never sets it. Fix: after
   ``CPUModelRunner.load_model``, set it exactly as the GPU runner does.

Both patches are applied lazily, when the module concerned is first imported (a ``sys.meta_path`` finder), so an
interpreter that never imports them pays nothing. ``APPLIED`` records what was patched (the tests check it).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

APPLIED: set[str] = set()


def _patch_torchvision_meta(module_exec):
    def exec_module(module):
        import torch.library
        import torchvision.extension

        if torchvision.extension._has_ops():
            return module_exec(module)
        real = torch.library.register_fake

        def register_fake(op, *args, **kwargs):
            if isinstance(op, str) and op.startswith("torchvision::"):
                return lambda fn: fn
            return real(op, *args, **kwargs)

        torch.library.register_fake = register_fake
        try:
            module_exec(module)
        finally:
            torch.library.register_fake = real
        APPLIED.add("torchvision")

    return exec_module


def _patch_cpu_runner(module_exec):
    def exec_module(module):
        module_exec(module)
        runner = module.CPUModelRunner
        load_model = runner.load_model

        def load_model_with_pruning(self, *args, **kwargs):
            from vllm.model_executor.models.interfaces import supports_multimodal_pruning

            load_model(self, *args, **kwargs)
            mm = self.model_config.multimodal_config
            self.is_multimodal_pruning_enabled = (supports_multimodal_pruning(self.get_model()) and mm is not None
                                                  and mm.is_multimodal_pruning_enabled())

        runner.load_model = load_model_with_pruning
        APPLIED.add("cpu_runner")

    return exec_module


PATCHES = {"torchvision._meta_registrations": _patch_torchvision_meta,
           "vllm.v1.worker.cpu_model_runner": _patch_cpu_runner}


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        spec.loader.exec_module = PATCHES[name](spec.loader.exec_module)
        return spec


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
