"""The evicting KV-cache policies on a model with sliding-window layers (a tiny random Gemma 3): the global layers'
cache follows the policy, the local layers keep their window, and the positions agree with the paper's formula."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from pagedllm import SamplingParams
from pagedllm.arithmetic import ceil_div
from pagedllm.layers.attention import FREED_BLOCK
from tests.engine.eviction import (
    BLOCK,
    GREEDY,
    H2O,
    H2O_BOUND,
    MAX_MODEL_LEN,
    STREAMING,
    STREAMING_BOUND,
    random_tokens,
    streamed_logprobs,
    streaming_kept,
    tiny,
    tiny_with_blocks,
)
from tests.model.test_gemma3 import write_tiny_gemma3

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
# A local window shorter than the streaming window, and one reaching past it into tokens the global layers evicted.
SHORT_LOCAL, LONG_LOCAL = 6, 24


@pytest.fixture(scope="module")
def gemma3(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> tuple:
    """A 3-layer Gemma 3 (local, global, local) with the sliding window the test names: folder, window, HF model."""
    window = request.param
    folder = tmp_path_factory.mktemp(f"gemma3-local{window}")
    model = write_tiny_gemma3(
        folder, tokenizer_dir, num_hidden_layers=3, layer_types=LAYER_TYPES, sliding_window=window
    )
    return folder, window, model


def held(table: list[int]) -> list[int]:
    return [block for block in table if block != FREED_BLOCK]


@pytest.mark.parametrize(
    ("gemma3", "policy", "bound"),
    [(LONG_LOCAL, STREAMING, STREAMING_BOUND), (SHORT_LOCAL, H2O, H2O_BOUND)],
    ids=["streaming", "h2o"],
    indirect=["gemma3"],
)
def test_sequence_runs_four_contexts_long_with_every_group_bounded_and_freed_blocks_reused(
    gemma3: tuple, policy: dict[str, Any], bound: int
) -> None:
    folder, window, _ = gemma3
    local_bound = ceil_div(window, BLOCK) + 1
    num_blocks = bound + 2 * local_bound + 3 * 3  # the long sequence, and one short one at a time
    llm = tiny_with_blocks(folder, num_blocks, **policy)
    engine, manager = llm.engine, llm.engine.block_manager
    assert engine.num_blocks == num_blocks
    engine.add_request("long", random_tokens(10, 0), SamplingParams(max_tokens=4 * MAX_MODEL_LEN, **GREEDY))
    seq = engine.requests["long"].sequences[0]
    released_by_long: set[int] = set()
    reused = step = 0
    while "long" in engine.requests:
        before = {block for table in manager.tables(seq) for block in held(table)}
        engine.step()
        step += 1
        global_table, *local_tables = manager.tables(seq)
        assert len(global_table) <= bound
        assert local_tables and all(len(held(table)) <= local_bound for table in local_tables)
        released_by_long |= before - {block for table in manager.tables(seq) for block in held(table)}
        others = [s for s in engine.scheduler.running if s is not seq]
        reused += bool(
            released_by_long & {block for s in others for table in manager.tables(s) for block in held(table)}
        )
        if step % 16 == 0 and not others and not engine.scheduler.waiting:
            engine.add_request(f"short{step}", random_tokens(6, step), SamplingParams(max_tokens=6, **GREEDY))
    assert seq.num_tokens == 10 + 4 * MAX_MODEL_LEN and seq.finish_reason == "length"
    assert seq.num_evicted_tokens > 3 * MAX_MODEL_LEN
    assert reused > 0
    while engine.has_unfinished_requests():
        engine.step()
    assert manager.num_free_blocks == num_blocks


@pytest.mark.parametrize("gemma3", [LONG_LOCAL], indirect=True)
def test_window_longer_than_the_sequence_equals_no_policy(gemma3: tuple) -> None:
    folder, _, _ = gemma3
    prompts = [random_tokens(20, 1), random_tokens(45, 2), random_tokens(7, 3)]
    params = SamplingParams(max_tokens=15, **GREEDY)
    full = tiny(folder, max_num_batched_tokens=16).generate(prompts, params)
    streaming = tiny(folder, kv_cache_policy="streaming", kv_window=256, max_num_batched_tokens=16).generate(
        prompts, params
    )
    for expected, got in zip(full, streaming, strict=True):
        assert got.outputs[0].token_ids == expected.outputs[0].token_ids


def rope(x: torch.Tensor, positions: list[int], theta: float) -> torch.Tensor:
    """x [tokens, heads, head_dim] rotated for `positions` (the rotate-half pairing of Gemma's checkpoints)."""
    head_dim = x.shape[-1]
    inverse = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.tensor(positions, dtype=torch.float64)[:, None] * inverse[None, :]
    cos, sin = (f(torch.cat([angles, angles], dim=-1)).float()[:, None, :] for f in (torch.cos, torch.sin))
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """One query [heads, head_dim] over keys and values [tokens, kv_heads, head_dim]: [heads * head_dim]."""
    group = q.shape[0] // keys.shape[1]
    keys, values = (x.repeat_interleave(group, dim=1).transpose(0, 1) for x in (keys, values))
    probs = (torch.einsum("hd,htd->ht", q, keys) * scale).softmax(dim=-1)
    return torch.einsum("ht,htd->hd", probs, values).flatten()


@torch.inference_mode()
def paper_logprobs(model: transformers.Gemma3ForCausalLM, token_ids: list[int]) -> list[float]:
    """StreamingLLM's formula token by token: each token's K/V computed once, when it is the query; a global layer
    attends over the sinks and the window (streaming_kept) at their positions within that list, a local layer over
    its window of the most recent tokens at their distances from the query."""
    config, decoder = model.config, model.model
    thetas = {kind: config.rope_parameters[kind]["rope_theta"] for kind in set(config.layer_types)}
    scale = config.query_pre_attn_scalar**-0.5
    num_heads, num_kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    keys: list[list[torch.Tensor]] = [[] for _ in decoder.layers]
    values: list[list[torch.Tensor]] = [[] for _ in decoder.layers]
    kept_lists = streaming_kept(len(token_ids))
    logprobs = []
    for p, token in enumerate(token_ids[:-1]):
        x = decoder.embed_tokens(torch.tensor([[token]]))[0]
        for i, (layer, kind) in enumerate(zip(decoder.layers, config.layer_types, strict=True)):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_norm(attn.q_proj(h).view(num_heads, head_dim))
            keys[i].append(attn.k_norm(attn.k_proj(h).view(num_kv_heads, head_dim)))
            values[i].append(attn.v_proj(h).view(num_kv_heads, head_dim))
            if kind == "full_attention":
                kept = kept_lists[p]
                key_positions, query_position = list(range(len(kept))), len(kept) - 1
            else:
                kept = list(range(max(0, p - config.sliding_window + 1), p + 1))
                key_positions, query_position = kept, p
            k = rope(torch.stack([keys[i][t] for t in kept]), key_positions, thetas[kind])
            v = torch.stack([values[i][t] for t in kept])
            q = rope(q[None], [query_position], thetas[kind])[0]
            x = x + layer.post_attention_layernorm(attn.o_proj(attend(q, k, v, scale)[None]))
            x = x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
        logits = model.lm_head(decoder.norm(x))[0].float()
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
        logprobs.append(logits.log_softmax(dim=-1)[token_ids[p + 1]].item())
    return logprobs


@pytest.mark.parametrize(
    ("gemma3", "attention_impl"),
    [(SHORT_LOCAL, "fast"), (LONG_LOCAL, "fast"), (LONG_LOCAL, "reference")],
    indirect=["gemma3"],
)
def test_stream_equals_the_papers_formula_with_local_layers_at_their_true_distances(
    gemma3: tuple, attention_impl: str
) -> None:
    """Global layers see the sinks and the window at positions within the cache; local layers see exactly their
    window, at the distances the tokens have in the text, however many tokens left the global layers' cache."""
    folder, _, model = gemma3
    token_ids = random_tokens(2 * MAX_MODEL_LEN, 4)
    llm = tiny(folder, **STREAMING, attention_impl=attention_impl, max_num_batched_tokens=1)
    streamed = streamed_logprobs(llm, token_ids)
    assert llm.engine.requests == {} and llm.engine.block_manager.num_free_blocks == llm.engine.num_blocks
    assert streamed == pytest.approx(paper_logprobs(model, token_ids), abs=1e-3)


@pytest.mark.parametrize("gemma3", [SHORT_LOCAL], indirect=True)
def test_h2o_fast_and_reference_attention_agree_across_evictions(gemma3: tuple) -> None:
    """The global layers report the attention h2o keeps by; the local layers attend by their kernels."""
    folder, _, _ = gemma3
    token_ids = random_tokens(2 * MAX_MODEL_LEN, 5)
    logprobs = {
        impl: streamed_logprobs(tiny(folder, **H2O, attention_impl=impl, max_num_batched_tokens=1), token_ids)
        for impl in ("reference", "fast")
    }
    assert logprobs["fast"] == pytest.approx(logprobs["reference"], abs=1e-4)


@pytest.mark.parametrize("gemma3", [LONG_LOCAL], indirect=True)
def test_a_prefix_cache_hit_streams_as_a_fresh_prefill_and_shared_local_blocks_stay_intact(gemma3: tuple) -> None:
    """The second request starts from the first one's cached blocks: its eviction re-rotates private copies of the
    local blocks it shares, so it, and a third request from the same cache, generate what a cold run does."""
    folder, _, _ = gemma3
    prompt = random_tokens(30, 7)
    params = SamplingParams(max_tokens=40, **GREEDY)
    cold = tiny(folder, **STREAMING, max_num_batched_tokens=16).generate([prompt], params)[0].outputs[0].token_ids
    llm = tiny(folder, **STREAMING, max_num_batched_tokens=16, enable_prefix_caching=True)
    runs = [llm.generate([prompt], params)[0] for _ in range(3)]
    assert [run.outputs[0].token_ids for run in runs] == [cold] * 3
    assert all(run.num_cached_tokens > 0 for run in runs[1:])
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_blocks
