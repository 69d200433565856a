"""Greedy outputs of two engines compared as vLLM's check_logprobs_close compares them."""

from __future__ import annotations

from typing import Any

from pagedllm import LLM, SamplingParams
from pagedllm.engine.output import RequestOutput
from pagedllm.serving.logprobs import TokenStrings

NUM_LOGPROBS = 5


def greedy(llm: LLM, prompts: list[str] | list[list[int]], max_tokens: int) -> list[RequestOutput]:
    """Greedy outputs of `max_tokens` tokens each, with the top NUM_LOGPROBS logprobs of every position."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=NUM_LOGPROBS)
    return llm.generate(prompts, params)


def assert_greedy_close(expected: list[RequestOutput], actual: list[RequestOutput]) -> None:
    """Greedy tokens equal until the first difference, where each side's token must be among the other's top
    logprobs (a near-tie that another order of float sums may flip); the rest is not compared."""
    for one, other in zip(expected, actual, strict=True):
        a, b = one.outputs[0], other.outputs[0]
        for position, (token_a, token_b) in enumerate(zip(a.token_ids, b.token_ids)):
            if token_a != token_b:
                assert token_a in b.logprobs[position] and token_b in a.logprobs[position], (one.prompt, position)
                break
        else:
            assert a.token_ids == b.token_ids


def assert_served_greedy_close(
    expected: list[RequestOutput], served: list[dict[str, Any]], strings: TokenStrings
) -> None:
    """assert_greedy_close's rule between offline outputs and the completions `logprobs` objects a server answered
    with, which name each token by its text."""
    for one, logprobs in zip(expected, served, strict=True):
        sample = one.outputs[0]
        tokens = [strings.text(token_id) for token_id in sample.token_ids]
        for position, (token_a, token_b) in enumerate(zip(tokens, logprobs["tokens"])):
            if token_a != token_b:
                top_a = {strings.text(token_id) for token_id in sample.logprobs[position]}
                assert token_a in logprobs["top_logprobs"][position] and token_b in top_a, (one.prompt, position)
                break
        else:
            assert tokens == logprobs["tokens"]
