"""Beam search: equal to transformers' beam search, and exact about the KV blocks its beams share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.engine.engine import LLMEngine
from pagedllm.errors import InvalidArgumentError
from tests.conftest import ROOMY_KV_BYTES

PROMPTS = ["The capital of France is", "Once upon a time,"]
CHAT = [{"role": "user", "content": "Say hello in one short sentence."}]


@pytest.fixture(scope="module")
def dense_llm() -> LLM:
    """The embedded model with transformers' own (dequantized, float32) weights: beams are discrete choices, so
    agreeing with the reference needs the same numbers, not the int4 kernels' close ones."""
    return LLM(dtype="float32", kv_cache_memory=ROOMY_KV_BYTES, quantization="none")


@torch.inference_mode()
def hf_beam_search(
    model, token_ids: list[int], width: int, max_new_tokens: int, **options
) -> list[tuple[list[int], float]]:
    """transformers' beam search: each returned hypothesis's new tokens (padding cut off) and score, best first."""
    fill = model.generation_config.pad_token_id  # the EOS token here: hypotheses are padded after their EOS
    out = model.generate(
        torch.tensor([token_ids]),
        attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
        num_beams=width,
        num_return_sequences=width,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        return_dict_in_generate=True,
        output_scores=True,
        **options,
    )
    results = []
    for sequence, score in zip(out.sequences, out.sequences_scores):
        new = sequence[len(token_ids) :].tolist()
        while len(new) > 1 and new[-1] == fill and new[-2] == fill:
            new.pop()
        results.append((new, score.item()))
    return results


def check_same_hypotheses(llm: LLM, hf_model, token_ids: list[int], width: int, max_tokens: int, **options) -> None:
    params = SamplingParams(n=width, use_beam_search=True, max_tokens=max_tokens, **options)
    ours = llm.generate([token_ids], params)[0].outputs
    theirs = hf_beam_search(hf_model, token_ids, width, max_tokens, **options)
    assert [o.token_ids for o in ours] == [tokens for tokens, _ in theirs]
    length_penalty = options.get("length_penalty", 1.0)
    for output, (tokens, score) in zip(ours, theirs):
        assert output.cumulative_logprob / len(tokens) ** length_penalty == pytest.approx(score, abs=1e-3)


@pytest.mark.reference
@pytest.mark.parametrize("width", [2, 4])
def test_beam_search_equals_transformers(dense_llm: LLM, hf_model, width: int) -> None:
    for prompt in PROMPTS:
        check_same_hypotheses(dense_llm, hf_model, dense_llm.tokenizer.encode(prompt), width, max_tokens=10)


@pytest.mark.reference
@pytest.mark.parametrize(
    "options",
    [{}, {"early_stopping": True}, {"early_stopping": "never", "length_penalty": 0.5}],
    ids=["heuristic", "early", "never"],
)
def test_beam_search_with_finished_hypotheses_equals_transformers(dense_llm: LLM, hf_model, options: dict) -> None:
    """A chat reply ends in EOS well before max_tokens: hypotheses finish early and the stopping rules decide."""
    token_ids = dense_llm.tokenizer.encode_chat(CHAT)
    check_same_hypotheses(dense_llm, hf_model, token_ids, 3, max_tokens=24, **options)


def referenced_blocks(engine: LLMEngine) -> dict[int, int]:
    """Block id -> how many block tables of live or kept sequences hold it."""
    counts: dict[int, int] = {}
    sequences = [seq for request in engine.requests.values() for seq in request.sequences]
    for seq in sequences + list(engine.kept.values()):
        for block_id in seq.block_ids:
            counts[block_id] = counts.get(block_id, 0) + 1
    return counts


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama_dir: Path) -> LLM:
    return LLM(model=str(tiny_llama_dir), kv_cache_memory=2**22, block_size=4, max_num_batched_tokens=64)


def test_beams_share_blocks_and_free_all_of_them(tiny_llm: LLM) -> None:
    engine = tiny_llm.engine
    allocator = engine.block_manager.allocator
    free_before = engine.block_manager.num_free_blocks
    prompt = list(range(100, 130))  # 7 full blocks of 4 and a partial one
    params = SamplingParams(n=2, use_beam_search=True, beam_width=4, max_tokens=12, ignore_eos=True)
    engine.add_request("beams", prompt, params)
    saw_sharing = False
    while engine.has_unfinished_requests():
        engine.step()
        counts = referenced_blocks(engine)
        # Every reference the allocator counts is one block-table entry of a live beam, and nothing else is held.
        assert all(allocator.ref_counts[block_id] == count for block_id, count in counts.items())
        assert engine.block_manager.num_free_blocks == free_before - len(counts)
        # Each live beam is an engine request of the search.
        beams = [request.sequences[0] for request in engine.requests.values()]
        if len(beams) == 4:
            first_blocks = [seq.block_ids[0] for seq in beams if seq.block_ids]
            saw_sharing = saw_sharing or (len(set(first_blocks)) == 1 and allocator.ref_counts[first_blocks[0]] == 4)
    assert saw_sharing, "the beams never shared the prompt's first block"
    assert engine.block_manager.num_free_blocks == free_before
    assert sum(allocator.ref_counts) == 0


def test_n_samples_hold_a_long_prompt_once_and_match_separate_seeds(llm: LLM) -> None:
    engine = llm.engine
    block_size = engine.config.block_size
    prompt = llm.tokenizer.encode(" ".join(f"Item {i} is a {('red', 'blue', 'green')[i % 3]} box." for i in range(115)))
    assert 900 <= len(prompt) <= 1200
    free_before = engine.block_manager.num_free_blocks
    params = SamplingParams(n=8, max_tokens=6, temperature=1.0, seed=11, ignore_eos=True)
    engine.add_request("long-n", prompt, params)
    request = engine.requests["long-n"]
    while len(request.sequences) < 8:
        engine.step()
    # After the step that drew the first tokens, the prompt's full blocks are shared by all eight samples.
    num_full = len(prompt) // block_size
    for index in range(num_full):
        block_ids = {seq.block_ids[index] for seq in request.sequences}
        assert len(block_ids) == 1
        assert engine.block_manager.allocator.ref_counts[block_ids.pop()] == 8
    assert free_before - engine.block_manager.num_free_blocks == -(-len(prompt) // block_size)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_free_blocks == free_before
    together = [seq.output_token_ids for seq in sorted(request.sequences, key=lambda s: s.index)]
    separate = [
        llm.generate([prompt], SamplingParams(max_tokens=6, temperature=1.0, seed=11 + i, ignore_eos=True))[0]
        .outputs[0]
        .token_ids
        for i in range(8)
    ]
    assert together == separate
    assert len({tuple(tokens) for tokens in separate}) > 1


def test_best_of_returns_the_samples_with_the_highest_cumulative_logprob(tiny_llm: LLM) -> None:
    prompt = list(range(200, 210))
    options = dict(max_tokens=8, temperature=1.0, ignore_eos=True, logprobs=0)
    best = tiny_llm.generate([prompt], SamplingParams(n=2, best_of=5, seed=3, **options))[0].outputs
    candidates = [tiny_llm.generate([prompt], SamplingParams(seed=3 + i, **options))[0].outputs[0] for i in range(5)]
    ranked = sorted(candidates, key=lambda c: c.cumulative_logprob, reverse=True)
    assert [o.index for o in best] == [0, 1]
    assert [o.token_ids for o in best] == [c.token_ids for c in ranked[:2]]
    assert [o.cumulative_logprob for o in best] == pytest.approx([c.cumulative_logprob for c in ranked[:2]])
    assert ranked[0].cumulative_logprob > ranked[-1].cumulative_logprob


def test_beam_search_settings_are_checked_against_the_engine(tiny_llm: LLM) -> None:
    too_wide = SamplingParams(use_beam_search=True, beam_width=tiny_llm.engine.config.max_num_seqs + 1)
    with pytest.raises(InvalidArgumentError, match="beam_width"):
        tiny_llm.generate([[5, 6, 7]], too_wide)


@pytest.mark.parametrize(
    ("settings", "param"),
    [
        (dict(n=3, best_of=2), "best_of"),
        (dict(n=3, use_beam_search=True, beam_width=2), "beam_width"),
        (dict(beam_width=2), "beam_width"),
        (dict(use_beam_search=True, stop=["."]), "stop"),
        (dict(use_beam_search=True, repetition_penalty=1.2), "repetition_penalty"),
        (dict(use_beam_search=True, early_stopping="sometimes"), "early_stopping"),
        (dict(use_beam_search=True, early_stopping=1), "early_stopping"),
        (dict(use_beam_search="yes"), "use_beam_search"),
        (dict(use_beam_search=True, length_penalty=float("nan")), "length_penalty"),
    ],
)
def test_invalid_beam_and_best_of_settings_name_their_parameter(settings: dict, param: str) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        SamplingParams(**settings)
    assert error.value.param == param


def test_beam_width_defaults_to_best_of_then_n() -> None:
    assert SamplingParams(n=2, use_beam_search=True).beam_width == 2
    assert SamplingParams(n=2, best_of=5, use_beam_search=True).beam_width == 5
    assert SamplingParams(n=2, best_of=5).num_samples == 5
    assert SamplingParams(n=2, best_of=5, use_beam_search=True).num_samples == 1


def test_beam_logprobs_add_up_to_the_cumulative_logprob(tiny_llm: LLM) -> None:
    params = SamplingParams(n=2, use_beam_search=True, beam_width=3, max_tokens=6, logprobs=2, ignore_eos=True)
    outputs = tiny_llm.generate([list(range(300, 320))], params)[0].outputs
    assert len(outputs) == 2
    assert outputs[0].cumulative_logprob >= outputs[1].cumulative_logprob
    for output in outputs:
        assert len(output.logprobs) == len(output.token_ids) == 6
        assert all(token in entry and len(entry) in (2, 3) for token, entry in zip(output.token_ids, output.logprobs))
        chosen = sum(entry[token] for token, entry in zip(output.token_ids, output.logprobs))
        assert output.cumulative_logprob == pytest.approx(chosen, abs=1e-4)
