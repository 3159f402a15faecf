# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    := out

DEMO_PROMPT := A tabby cat looks around, blinks and purrs softly; warm afternoon light, gentle room tone.

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first and pinned: the CPU build on these machines; anything else pulls CUDA wheels.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	@mkdir -p $(OUT)
	$(BIN)/reelserve generate --image serving/assets/sample_photo.jpg \
		--prompt "$(DEMO_PROMPT)" --seconds 2 --size 384x256 --seed 7 --out $(OUT)/demo.mp4
	@echo "demo video: $(abspath $(OUT)/demo.mp4)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
