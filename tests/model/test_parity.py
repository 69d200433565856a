"""The embedded model against Hugging Face transformers on the same GGUF weights."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from tests.reference import TOP_LOGPROBS, check_logprobs_close, hf_greedy, paged_last_logits

pytestmark = pytest.mark.reference

LOGIT_PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "请用中文介绍一下长城的历史。",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "In 1905, Albert Einstein published four papers that changed physics. The first explained the photoelectric "
    "effect, the second Brownian motion, the third special relativity, and the fourth",
    "Emoji test 🎉🚀 and accents: café, naïve, Zürich —",
]

GREEDY_PROMPTS = [
    "Hi",
    "The best way to learn a new language is",
    "List three primary colors:",
    "Write a haiku about the sea.",
    "量子计算机的基本原理是",
    "Once upon a time, in a small village at the edge of a vast forest, there lived an old clockmaker who",
    "Q: What is the boiling point of water at sea level in Celsius?\nA:",
    "Summarize the following text in one sentence: The mitochondria is an organelle found in most eukaryotic "
    "cells. It generates most of the chemical energy needed to power the cell's biochemical reactions, stored in "
    "a small molecule called adenosine triphosphate (ATP). Mitochondria have their own DNA and ribosomes.",
]
NEW_TOKENS = 64


@pytest.mark.parametrize("prompt", LOGIT_PROMPTS)
def test_last_position_logits_match_transformers(llm: LLM, hf_model, prompt: str) -> None:
    token_ids = llm.tokenizer.encode(prompt)
    ours = paged_last_logits(llm.engine, token_ids, chunk_size=7)
    with torch.inference_mode():
        theirs = hf_model(torch.tensor([token_ids])).logits[0, -1].float()
    assert (ours - theirs).abs().max().item() < 1e-3


@pytest.fixture(scope="module")
def hf_greedy_outputs(llm: LLM, hf_model) -> list[tuple[list[int], list[dict[int, float]]]]:
    return [hf_greedy(hf_model, llm.tokenizer.encode(p), NEW_TOKENS) for p in GREEDY_PROMPTS]


GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=TOP_LOGPROBS)


def _as_tokens_and_tops(output) -> tuple[list[int], list[dict[int, float]]]:
    completion = output.outputs[0]
    return completion.token_ids, completion.logprobs


def test_batched_greedy_matches_transformers(llm: LLM, hf_greedy_outputs) -> None:
    outputs = llm.generate(GREEDY_PROMPTS, GREEDY)
    for prompt, output, reference in zip(GREEDY_PROMPTS, outputs, hf_greedy_outputs):
        check_logprobs_close(_as_tokens_and_tops(output), reference, prompt[:30])


@pytest.mark.slow  # test_batched_greedy_matches_transformers stays in the default run, preemption in tests/engine
def test_greedy_under_preemption_matches_unpreempted_and_transformers(llm: LLM, hf_greedy_outputs) -> None:
    unpreempted = llm.generate(GREEDY_PROMPTS, GREEDY)
    # 20 blocks of 16 tokens: any one request fits, all eight at once cannot.
    tight = LLM(
        dtype="float32",
        quantization="none",
        kv_cache_memory=20 * llm.engine.runner.bytes_per_block,
        max_num_batched_tokens=64,
    )
    preempted = tight.generate(GREEDY_PROMPTS, GREEDY)
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.block_manager.num_free_blocks == tight.engine.num_blocks
    for prompt, output, roomy, reference in zip(GREEDY_PROMPTS, preempted, unpreempted, hf_greedy_outputs):
        assert output.outputs[0].token_ids == roomy.outputs[0].token_ids, prompt[:30]
        check_logprobs_close(_as_tokens_and_tops(output), reference, prompt[:30])


def test_bfloat16_engine_tracks_the_float32_reference(hf_model) -> None:
    bf16 = LLM(dtype="bfloat16", quantization="none", kv_cache_memory=2**26)
    assert bf16.engine.runner.k_pools[0].dtype == torch.bfloat16
    for prompt in LOGIT_PROMPTS:
        token_ids = bf16.tokenizer.encode(prompt)
        ours = paged_last_logits(bf16.engine, token_ids, chunk_size=7)
        with torch.inference_mode():
            theirs = hf_model(torch.tensor([token_ids])).logits[0, -1].float()
        assert ours.argmax().item() in theirs.topk(2).indices.tolist()
        assert torch.nn.functional.cosine_similarity(ours, theirs, dim=0).item() > 0.99
