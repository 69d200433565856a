"""Helpers for comparing pagedllm with Hugging Face transformers."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from pagedllm.engine.engine import LLMEngine
from pagedllm.engine.model_runner import attention_metadata

TOP_LOGPROBS = 5


@torch.inference_mode()
def paged_last_logits(engine: LLMEngine, token_ids: list[int], chunk_size: int) -> torch.Tensor:
    """Prefill `token_ids` chunk by chunk through the engine's paged KV cache; the last position's logits."""
    model, blocks = engine.runner.model, engine.block_manager
    seq = SimpleNamespace(block_ids=[], group_block_ids=[], num_computed_tokens=0, num_evicted_tokens=0)
    try:
        for start in range(0, len(token_ids), chunk_size):
            end = min(len(token_ids), start + chunk_size)
            blocks.allocate_slots(seq, end - start)
            meta = attention_metadata(blocks, [(seq, start, end)], engine.device)
            hidden = model(torch.tensor(token_ids[start:end]), torch.arange(start, end), meta)
            seq.num_computed_tokens = end
            blocks.release_out_of_window(seq)
        return model.compute_logits(hidden[-1:])[0]
    finally:
        blocks.free(seq)


@torch.inference_mode()
def hf_greedy(model, token_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[dict[int, float]]]:
    """transformers' greedy generate: the new tokens and, per step, the top logprobs of the raw logits."""
    out = model.generate(
        torch.tensor([token_ids]),
        attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    new_tokens = out.sequences[0, len(token_ids) :].tolist()
    tops = []
    for logits in out.logits:
        values, ids = torch.log_softmax(logits[0].float(), dim=-1).topk(TOP_LOGPROBS)
        tops.append(dict(zip(ids.tolist(), values.tolist())))
    return new_tokens, tops


def check_logprobs_close(
    ours: tuple[list[int], list[dict[int, float]]], theirs: tuple[list[int], list[dict[int, float]]], name: str
) -> None:
    """Equal token for token, or at the first difference each side's token is in the other's top logprobs."""
    our_tokens, our_tops = ours
    their_tokens, their_tops = theirs
    assert len(our_tokens) == len(their_tokens), f"{name}: {len(our_tokens)} vs {len(their_tokens)} tokens"
    for i, (a, b) in enumerate(zip(our_tokens, their_tokens)):
        if a != b:
            assert a in their_tops[i], (
                f"{name}: at {i} our token {a} not in reference top-{TOP_LOGPROBS} {their_tops[i]}"
            )
            assert b in our_tops[i], f"{name}: at {i} reference token {b} not in our top-{TOP_LOGPROBS} {our_tops[i]}"
            return
