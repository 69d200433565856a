"""The h2o KV-cache policy end to end: bounded blocks past max_model_len, the tokens it keeps against a plain
simulation of the paper's rule, the attention it reports, its agreement across attention paths, with a quantized cache
and under preemption."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.engine.kv_cache_policy import H2OPolicy
from pagedllm.engine.request import Sequence
from pagedllm.errors import ConfigError, InvalidArgumentError
from tests.checkpoints import write_checkpoint
from tests.engine.eviction import (
    BLOCK,
    BUDGET,
    GREEDY,
    H2O,
    H2O_BOUND,
    MAX_MODEL_LEN,
    random_tokens,
    tiny,
    tiny_with_blocks,
)

NUM_HEAVY = BUDGET // 2
NUM_RECENT = BUDGET - NUM_HEAVY
BOUND = H2O_BOUND


def test_kept_positions_are_the_heaviest_earlier_tokens_and_the_recent_ones() -> None:
    policy = H2OPolicy("h2o", num_kept=8, block_size=4, max_cache_len=64)
    assert policy.kept_positions(10, torch.zeros(10)) is None  # 10 - 7 < one block
    scores = torch.tensor([9.0, 1.0, 5.0, 5.0, 0.5, 7.0, 2.0, 3.0, 8.0, 0.0, 1.0])
    # Recent: the last num_recent - 1 = 3 positions; heavy: the 4 largest of positions 0..7, the earlier of a tie.
    assert policy.kept_positions(11, scores) == [0, 2, 3, 5, 8, 9, 10]
    with pytest.raises(RuntimeError, match="accumulated attention"):
        policy.kept_positions(11, None)


def stream(llm: LLM, token_ids: list[int]) -> tuple[list[float], Sequence]:
    """Each token's logprob but the first's, fed one token per step (max_num_batched_tokens=1), and the sequence."""
    engine = llm.engine
    engine.add_request("stream", token_ids, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))
    seq = engine.requests["stream"].sequences[0]
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [output for output in engine.step() if output.finished]
    [output] = outputs
    assert output.prompt_logprobs is not None
    return [entry[token] for entry, token in zip(output.prompt_logprobs[1:], token_ids[1:], strict=True)], seq


def test_sequence_runs_four_contexts_long_in_blocks_bounded_by_the_budget(tiny_llama_dir: Path) -> None:
    num_blocks = BOUND + 2
    llm = tiny_with_blocks(tiny_llama_dir, num_blocks, **H2O)
    engine = llm.engine
    engine.add_request("long", random_tokens(10, 0), SamplingParams(max_tokens=4 * MAX_MODEL_LEN, **GREEDY))
    seq = engine.requests["long"].sequences[0]
    while engine.has_unfinished_requests():
        engine.step()
        assert len(seq.block_ids) <= BOUND
        cache_len = seq.num_computed_tokens - seq.num_evicted_tokens
        assert seq.kv_scores is not None and seq.kv_scores.shape == (cache_len,)
    assert seq.num_tokens == 10 + 4 * MAX_MODEL_LEN and seq.finish_reason == "length"
    assert seq.num_evicted_tokens > 3 * MAX_MODEL_LEN
    assert engine.block_manager.num_free_blocks == num_blocks


def simulated_h2o(llm: LLM, token_ids: list[int]) -> tuple[list[float], dict[int, float]]:
    """H2O written plainly over a one-layer model whose K/V depend on a token and its position alone: each step runs
    a fresh forward over the kept tokens and the query at positions 0, 1, ..., reads the query's attention
    probabilities off its q and k, and adds them to the tokens' scores; a block's worth leaves by the policy's rule.
    Returns each next token's logprob and the scores of the tokens kept after the last step."""
    attention = llm.engine.runner.model.layers[0].self_attn.attn
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    attention.register_forward_hook(lambda module, inputs, output: captured.append((inputs[0], inputs[1])))
    scores: dict[int, float] = {}
    kept: list[int] = []
    logprobs = []
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    for p in range(len(token_ids)):
        if len(kept) - (BUDGET - 1) >= BLOCK:
            first_recent = len(kept) - (NUM_RECENT - 1)
            by_weight = sorted(kept[:first_recent], key=lambda t: (-scores[t], t))
            kept = sorted(by_weight[:NUM_HEAVY]) + kept[first_recent:]
        context = [*kept, p]
        captured.clear()
        following = token_ids[p + 1 : p + 2]  # the token this step's query predicts, if any
        [output] = llm.generate([[token_ids[t] for t in context] + following], params, use_tqdm=False)
        logprobs += [output.prompt_logprobs[-1][token] for token in following]
        [(q, k)] = captured
        q, k = q[len(context) - 1], k[: len(context)].repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        probs = (torch.einsum("hd,khd->hk", q, k) * attention.scale).softmax(dim=-1).sum(dim=0)
        for t, received in zip(context, probs.tolist(), strict=True):
            scores[t] = scores.get(t, 0.0) + received
        kept = context
    return logprobs, {t: scores[t] for t in kept}


def test_one_layer_h2o_keeps_exactly_what_a_plain_simulation_keeps(one_layer_dir: Path) -> None:
    """Every streamed logprob equals the simulation's, whose context is the top-accumulated tokens and the recent
    window: a different kept set would give a different logprob. The engine's final scores are the simulation's."""
    token_ids = random_tokens(MAX_MODEL_LEN + 40, 4)
    streamed, seq = stream(tiny(one_layer_dir, **H2O, max_num_batched_tokens=1), token_ids)
    simulated, final_scores = simulated_h2o(tiny(one_layer_dir, attention_impl="reference"), token_ids)
    assert streamed == pytest.approx(simulated, abs=1e-4)
    assert seq.kv_scores is not None
    assert seq.kv_scores.tolist() == pytest.approx(list(final_scores.values()), abs=1e-4)


def test_budget_longer_than_the_sequence_equals_full_attention(tiny_llama_dir: Path) -> None:
    """The scoring attention path gives the same outputs as the kernels when nothing is evicted."""
    prompts = [random_tokens(20, 1), random_tokens(45, 2), random_tokens(7, 3)]
    params = SamplingParams(max_tokens=30, **GREEDY)
    full = tiny(tiny_llama_dir, max_num_batched_tokens=16).generate(prompts, params)
    h2o = tiny(tiny_llama_dir, kv_cache_policy="h2o", kv_budget=256, max_num_batched_tokens=16).generate(
        prompts, params
    )
    for expected, got in zip(full, h2o, strict=True):
        assert got.outputs[0].token_ids == expected.outputs[0].token_ids


@pytest.mark.parametrize("max_num_batched_tokens", [1, 8])
def test_reference_and_fast_attention_agree_on_outputs_and_scores(
    tiny_llama_dir: Path, max_num_batched_tokens: int
) -> None:
    """One token per step takes the batched decode groups, eight the per-sequence prefill path."""
    token_ids = random_tokens(3 * MAX_MODEL_LEN, 5)
    runs = {
        impl: stream(
            tiny(tiny_llama_dir, **H2O, attention_impl=impl, max_num_batched_tokens=max_num_batched_tokens),
            token_ids,
        )
        for impl in ("reference", "fast")
    }
    (fast_logprobs, fast_seq), (reference_logprobs, reference_seq) = runs["fast"], runs["reference"]
    assert fast_logprobs == pytest.approx(reference_logprobs, abs=1e-4)
    assert fast_seq.num_evicted_tokens == reference_seq.num_evicted_tokens > 0
    assert fast_seq.kv_scores is not None and reference_seq.kv_scores is not None
    assert torch.allclose(fast_seq.kv_scores, reference_seq.kv_scores, atol=1e-4)


def test_settings_it_does_not_compose_with_are_refused(
    tiny_llama_dir: Path, tmp_path: Path, tokenizer_dir: Path
) -> None:
    with pytest.raises(ConfigError, match="kv_budget .*exceeds max_model_len") as raised:
        tiny(tiny_llama_dir, **{**H2O, "kv_budget": MAX_MODEL_LEN})
    assert raised.value.param == "kv_budget"
    write_checkpoint("mistral-mqa", tmp_path, tokenizer_dir)  # sliding-window layers
    with pytest.raises(ConfigError, match="every layer of this model has a sliding window"):
        tiny(tmp_path, **H2O)
    llm = tiny(tiny_llama_dir, **H2O)
    for params in (SamplingParams(n=2), SamplingParams(best_of=2), SamplingParams(use_beam_search=True, beam_width=2)):
        with pytest.raises(InvalidArgumentError, match="h2o takes requests of one sample"):
            llm.engine.add_request("shared", [1, 2, 3], params)
