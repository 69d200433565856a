"""Draft-model speculation on the tiny random Llama: a model drafting for itself has every draft accepted (its K/V
follows the target's through preemption and the prefix cache, or its drafts would drift), a draft of other weights
leaves the target's greedy outputs as they are on ShareGPT prompts while many of its drafts are rejected, sampled
requests verify the distributions their drafts were drawn from, and a draft of another vocabulary is refused at load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.datasets import load_sharegpt_pairs, sharegpt_path
from pagedllm.benchmarks.speculative import build_requests
from pagedllm.errors import ConfigError
from pagedllm.layers.rejection_sampler import DraftBatch, RejectionSampler
from tests.checkpoints import write_checkpoint

NUM_SPECULATIVE_TOKENS = 4
PROMPTS = [[(37 * i + 11 * j) % 4000 + 100 for j in range(40 + 13 * i)] for i in range(4)]
# Blocks of 16 tokens hold 8 KiB of the tiny model's K/V, and as much again of its draft's: 16 blocks, about a
# third of what the four requests need at once.
TINY_KV_BYTES = 2**18


def draft_llm(target: Path, draft: Path, disable_by_batch_size: int | None = None, **settings) -> LLM:
    """Four sequences draft all their tokens at once unless `disable_by_batch_size` says otherwise."""
    spec = {
        "method": "draft_model",
        "model": str(draft),
        "num_speculative_tokens": NUM_SPECULATIVE_TOKENS,
        "disable_by_batch_size": disable_by_batch_size,
    }
    return LLM(model=str(target), dtype="float32", speculative_config=spec, **settings)


def test_a_model_drafting_for_itself_is_always_right(tiny_llama_dir: Path) -> None:
    params = SamplingParams(max_tokens=48, temperature=0.0)
    plain = LLM(model=str(tiny_llama_dir), dtype="float32", kv_cache_memory=2**22)
    expected = [output.outputs[0].token_ids for output in plain.generate(PROMPTS, params)]

    preempting = draft_llm(tiny_llama_dir, tiny_llama_dir, kv_cache_memory=TINY_KV_BYTES)
    assert preempting.engine.num_blocks == 16
    assert [output.outputs[0].token_ids for output in preempting.generate(PROMPTS, params)] == expected
    assert preempting.engine.stats().num_preemptions > 0
    stats = preempting.engine.stats().spec_decode
    assert stats.num_draft_tokens > len(PROMPTS) * 8 and stats.acceptance_rate == 1.0

    roomy = draft_llm(tiny_llama_dir, tiny_llama_dir, kv_cache_memory=2**22)
    for _ in range(2):  # the second time, the prompts' blocks (and their draft K/V) come from the prefix cache
        assert [output.outputs[0].token_ids for output in roomy.generate(PROMPTS, params)] == expected
    stats = roomy.engine.stats()
    assert stats.prefix_cache_hit_tokens > 0 and stats.spec_decode.acceptance_rate == 1.0
    assert stats.spec_decode.mean_accepted_length > 3
    assert not any(roomy.engine.block_manager.allocator.ref_counts)


def test_a_draft_of_other_weights_leaves_the_targets_outputs_through_preemption_and_the_prefix_cache(
    tiny_llama_dir: Path, tiny_llama_draft_dir: Path
) -> None:
    params = SamplingParams(max_tokens=32, temperature=0.0)
    plain = LLM(model=str(tiny_llama_dir), dtype="float32", kv_cache_memory=2**22)
    with sharegpt_path() as path:
        requests = build_requests(load_sharegpt_pairs(path), "grounded", 4, plain.tokenizer, 3, max_reply_tokens=32)
    prompts = [request.prompt_token_ids for request in requests]
    expected = [output.outputs[0].token_ids for output in plain.generate(prompts, params)]

    # 12 blocks for target and draft: two prompts fit at once, and their outputs do not.
    preempting = draft_llm(tiny_llama_dir, tiny_llama_draft_dir, kv_cache_memory=12 * 2 * 8 * 2**10)
    assert preempting.engine.num_blocks == 12
    assert [output.outputs[0].token_ids for output in preempting.generate(prompts, params)] == expected
    assert preempting.engine.stats().num_preemptions > 0
    assert 0.2 < preempting.engine.stats().spec_decode.acceptance_rate < 0.9

    roomy = draft_llm(tiny_llama_dir, tiny_llama_draft_dir, kv_cache_memory=2**22)
    for _ in range(2):  # the second time, the prompts' blocks (and their draft K/V) come from the prefix cache
        assert [output.outputs[0].token_ids for output in roomy.generate(prompts, params)] == expected
    stats = roomy.engine.stats()
    assert stats.prefix_cache_hit_tokens >= sum(len(prompt) // 16 * 16 for prompt in prompts) - 16 * len(prompts)
    assert 0.2 < stats.spec_decode.acceptance_rate < 0.9
    assert not any(roomy.engine.block_manager.allocator.ref_counts)


def test_steps_too_large_to_draft_skip_the_draft_model_which_catches_up_later(tiny_llama_dir: Path) -> None:
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in (12, 20, 36, 48)]
    plain = LLM(model=str(tiny_llama_dir), dtype="float32", kv_cache_memory=2**22)
    expected = [output.outputs[0].token_ids for output in plain.generate(PROMPTS, params)]

    llm = draft_llm(tiny_llama_dir, tiny_llama_dir, disable_by_batch_size=3, kv_cache_memory=2**22)
    runner, running_at_forward = llm.engine.draft_runner, []
    forward = runner.forward

    def spy(step):
        running_at_forward.append(len(llm.engine.scheduler.running))
        return forward(step)

    runner.forward = spy
    assert [output.outputs[0].token_ids for output in llm.generate(PROMPTS, params)] == expected
    # Three or four running sequences draft nothing and run no draft pass; the last two catch up their prompts and
    # outputs when they first draft, or their drafts would part from the target's.
    assert running_at_forward and max(running_at_forward) <= 2
    stats = llm.engine.stats().spec_decode
    assert stats.num_draft_tokens > 16 and stats.acceptance_rate == 1.0


def test_sampled_requests_verify_their_drafts_distributions(tiny_llama_dir: Path, monkeypatch) -> None:
    verified: list[DraftBatch] = []
    verify = RejectionSampler.__call__

    def spy(self, logits: torch.Tensor, batch, drafts: DraftBatch):
        verified.append(drafts)
        return verify(self, logits, batch, drafts)

    monkeypatch.setattr(RejectionSampler, "__call__", spy)
    llm = draft_llm(tiny_llama_dir, tiny_llama_dir, kv_cache_memory=2**22)
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    sampled = SamplingParams(max_tokens=24, temperature=0.8, top_k=50, seed=1)
    llm.generate(PROMPTS[:2], greedy)
    assert verified and all(drafts.draft_probs is None for drafts in verified)  # greedy drafts: one-hot

    verified.clear()
    llm.generate(PROMPTS[:2], [greedy, sampled])
    assert verified and all(drafts.draft_probs is not None for drafts in verified)
    q = torch.cat([drafts.draft_probs for drafts in verified])
    tokens = torch.tensor([token for drafts in verified for token in drafts.draft_token_ids])
    assert q.sum(dim=1) == pytest.approx(torch.ones(len(q)), abs=1e-5)
    assert bool((q[torch.arange(len(q)), tokens] > 0).all())
    support = (q > 0).sum(dim=1)
    assert bool((support == 1).any())  # the greedy request's drafts
    spread = support[support > 1]
    assert len(spread) and bool((spread <= 50).all())  # the sampled request's: its top_k applies to q too


def test_a_draft_of_another_vocabulary_is_refused(tiny_llama_dir: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    fewer_logits = tmp_path / "fewer-logits"
    fewer_logits.mkdir()
    write_checkpoint("llama-gqa", fewer_logits, tokenizer_dir, vocab_size=1000)
    with pytest.raises(ConfigError, match="another vocabulary"):
        draft_llm(tiny_llama_dir, fewer_logits, kv_cache_memory=2**22)

    other_ids = tmp_path / "other-ids"
    shutil.copytree(tiny_llama_dir, other_ids)
    tokenizer = json.loads((other_ids / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = (token for token, index in vocab.items() if index in (1000, 1001))
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other_ids / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ConfigError, match="another vocabulary"):
        draft_llm(tiny_llama_dir, other_ids, kv_cache_memory=2**22)
