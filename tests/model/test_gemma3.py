"""Gemma 3: a tiny random HF checkpoint against transformers, and sliding-window layers' blocks freed and reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from pagedllm import LLM, SamplingParams
from pagedllm.layers.attention import FREED_BLOCK
from pagedllm.layers.kv_cache_groups import kv_cache_layout
from tests.reference import paged_last_logits

WINDOW = 512
BLOCK_SIZE = 16


def write_tiny_gemma3(folder: Path, tokenizer_dir: Path, **overrides) -> transformers.Gemma3ForCausalLM:
    """A random 7-layer Gemma 3 (layers 0-4 and 6 local, 5 global) with distinct RoPE bases and MQA."""
    torch.manual_seed(3)
    settings = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=7,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=24,
        sliding_window=WINDOW,
        max_position_embeddings=8192,
        final_logit_softcapping=30.0,
    )
    config = transformers.Gemma3TextConfig(**{**settings, **overrides})
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    model.save_pretrained(str(folder))
    for file in tokenizer_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return model


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("tiny-gemma3")
    return folder, write_tiny_gemma3(folder, tokenizer_dir)


@pytest.mark.parametrize("attention_impl", ["fast", "reference"])
def test_tiny_gemma3_logits_match_transformers_across_the_window(tiny_gemma3, attention_impl: str) -> None:
    folder, reference = tiny_gemma3
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    llm = LLM(
        model=str(folder),
        dtype="float32",
        quantization="none",
        kv_cache_memory=2**24,
        block_size=BLOCK_SIZE,
        attention_impl=attention_impl,
    )
    assert llm.engine.model_config.full_attention_layers == (5,)
    token_ids = torch.randint(3, 49152, (1200,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        theirs = reference(torch.tensor([token_ids])).logits[0, -1].float()
    # In chunks of 300: later chunks read the local layers' window back from blocks, the ones before it freed.
    ours = paged_last_logits(llm.engine, token_ids, chunk_size=300)
    assert (ours - theirs).abs().max().item() < 1e-3
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_blocks
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    with torch.inference_mode():
        expected = reference.generate(
            torch.tensor([token_ids[:600]]), max_new_tokens=16, do_sample=False, pad_token_id=0
        )[0, 600:].tolist()
    assert llm.generate([token_ids[:600]], params)[0].outputs[0].token_ids == expected


def test_kv_cache_layout_groups_gemma3_layers_by_span(tiny_gemma3) -> None:
    folder, _ = tiny_gemma3
    llm = LLM(model=str(folder), dtype="float32", quantization="none", kv_cache_memory=2**22)
    layout = kv_cache_layout(llm.engine.model_config)
    # 6 local layers and 1 global: groups of one layer, the global one first.
    assert layout.sliding_windows == [None] + [WINDOW] * 6
    assert layout.groups[0].layers == (5,)
    assert layout.layers_per_group == 1


def test_local_layers_hold_only_their_window_and_free_blocks_are_reused(tiny_gemma3) -> None:
    folder, _ = tiny_gemma3
    # 700 blocks of 4 KiB (one layer per KV-cache group): a 4,000-token sequence keeping every local layer's
    # blocks would need 7 x 250.
    llm = LLM(
        model=str(folder),
        dtype="float32",
        quantization="none",
        kv_cache_memory=700 * 4096,
        block_size=BLOCK_SIZE,
        max_num_batched_tokens=512,
    )
    engine, manager = llm.engine, llm.engine.block_manager
    assert engine.num_blocks == 700
    bound = -(-WINDOW // BLOCK_SIZE) + 1
    prompt = torch.randint(3, 49152, (3990,), generator=torch.Generator().manual_seed(1)).tolist()
    engine.add_request("long", prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    (long_seq,) = engine.requests["long"].sequences
    held_by_local_layers: set[int] = set()
    short_seq, short_blocks = None, set()
    while engine.has_unfinished_requests():
        engine.step()
        if short_seq is not None:
            short_blocks |= {block for table in manager.tables(short_seq) for block in table}
        if long_seq.finish_reason is not None:
            continue
        global_table, *local_tables = manager.tables(long_seq)
        for table in local_tables:
            held = [block for block in table if block != FREED_BLOCK]
            assert len(held) <= bound, f"{len(held)} blocks held at {long_seq.num_computed_tokens} tokens"
            held_by_local_layers |= set(held)
        assert len(global_table) == -(-long_seq.num_computed_tokens // BLOCK_SIZE)
        if long_seq.num_computed_tokens >= 3000 and short_seq is None:
            engine.add_request("short", prompt[:100], SamplingParams(max_tokens=2, temperature=0))
            (short_seq,) = engine.requests["short"].sequences
    assert long_seq.num_tokens == 4000 and engine.scheduler.num_preemptions == 0
    # Every block the short request ran on had been given back by the long one's local layers.
    assert short_seq is not None and len(short_seq.output_token_ids) == 2
    assert short_blocks and short_blocks <= held_by_local_layers
    assert manager.num_free_blocks == engine.num_blocks


def test_a_prefix_cache_hit_serves_sliding_window_layers_from_the_blocks_their_window_needs(tiny_gemma3) -> None:
    folder, reference = tiny_gemma3
    llm = LLM(model=str(folder), dtype="float32", quantization="none", kv_cache_memory=2**24, block_size=BLOCK_SIZE)
    tokens = torch.randint(3, 49152, (1037,), generator=torch.Generator().manual_seed(5)).tolist()
    llm.generate([tokens[:1000]], SamplingParams(max_tokens=1, temperature=0))
    # 62 full blocks were computed; the local layers' first 30 of them fell out of the window and went back.
    (output,) = llm.generate([tokens], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert output.num_cached_tokens == 62 * BLOCK_SIZE
    with torch.inference_mode():
        expected = reference.generate(torch.tensor([tokens]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert output.outputs[0].token_ids == expected[0, len(tokens) :].tolist()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_blocks
