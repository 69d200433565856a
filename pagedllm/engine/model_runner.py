"""Flattens a step's scheduled work into one ragged batch, runs the model over the paged cache, and samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.config import EngineConfig, ModelConfig
from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.request import Sequence
from pagedllm.engine.scheduler import ScheduledSequence, SchedulerOutput
from pagedllm.layers.attention import AttentionMetadata, KVPool, copy_blocks
from pagedllm.layers.kv_quant import KV_CACHE_BITS, QuantizedKVPool
from pagedllm.layers.sampler import Sampler, SamplerOutput, SamplingBatch
from pagedllm.model.fused_decode import FusedDecode
from pagedllm.model.llama import LlamaForCausalLM
from pagedllm.sampling_params import SamplingParams


@dataclass
class SampledToken:
    sequence: Sequence
    token_id: int
    logprob: float | None  # the drawn token's, when logprobs are asked for
    logprobs: dict[int, float] | None  # the drawn token's and the top tokens' logprobs


@dataclass
class StepResult:
    samples: list[SampledToken]
    prompt_logprobs: dict[Sequence, list[dict[int, float]]]  # new entries, in prompt order


def kv_cache_bytes_per_block(
    model_config: ModelConfig, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto"
) -> int:
    """K and V of every layer for one block, a quantized cache's scales and zero points included."""
    mc = model_config
    if kv_cache_dtype == "auto":
        per_token = mc.num_kv_heads * mc.head_dim * dtype.itemsize
    else:
        per_token = QuantizedKVPool.bytes_per_token(mc.num_kv_heads, mc.head_dim, KV_CACHE_BITS[kv_cache_dtype])
    return 2 * mc.num_layers * block_size * per_token


def allocate_kv_pool(model_config: ModelConfig, config: EngineConfig, num_blocks: int, device: torch.device) -> KVPool:
    """One layer's K or V pool: a tensor in the model dtype (kv_cache_dtype auto), else quantized."""
    shape = (num_blocks, config.block_size, model_config.num_kv_heads, model_config.head_dim)
    if config.kv_cache_dtype == "auto":
        return torch.zeros(shape, dtype=config.torch_dtype, device=device)
    return QuantizedKVPool(*shape, KV_CACHE_BITS[config.kv_cache_dtype], config.torch_dtype, device)


class ModelRunner:
    """Owns the model, the KV pools and the sampler, and picks each step's forward: all-decode steps that the
    fused kernel takes run every layer in one call (`fused_decode`), any other step the model's own forward."""

    def __init__(self, model: LlamaForCausalLM, config: EngineConfig, num_blocks: int, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.block_size = config.block_size
        mc = model.config
        self.k_pools = [allocate_kv_pool(mc, config, num_blocks, device) for _ in range(mc.num_layers)]
        self.v_pools = [allocate_kv_pool(mc, config, num_blocks, device) for _ in range(mc.num_layers)]
        model.bind_kv_cache(self.k_pools, self.v_pools)
        self.fused_decode = FusedDecode.of(model, self.k_pools, self.v_pools) if config.fused_decode else None
        self.sampler = Sampler(torch.Generator(device=device).manual_seed(config.seed))
        self.vocab_size = mc.vocab_size
        self.bytes_per_block = kv_cache_bytes_per_block(
            mc, config.block_size, config.torch_dtype, config.kv_cache_dtype
        )

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, block_manager: BlockManager) -> StepResult:
        # Sequences with one new token first, longest context first: attention batches runs of similar length.
        items = sorted(
            out.scheduled,
            key=lambda item: (item.num_new_tokens != 1, -item.sequence.num_computed_tokens - item.num_new_tokens),
        )
        batch = _FlatBatch()
        for item in items:
            batch.add(item, block_manager)
        rows = batch.sample_rows + [row for _, rows in batch.prompt_logprob_rows for row in rows]
        logits = self._forward(out.block_copies, batch, rows)
        num_samples = len(batch.sample_rows)
        prompt_logprobs = self._prompt_logprobs(logits[num_samples:], batch)
        return StepResult(self._sample(logits[:num_samples], batch.sample_seqs), prompt_logprobs)

    def _forward(self, block_copies: list[tuple[int, int]], batch: _FlatBatch, rows: list[int]) -> torch.Tensor:
        """Float32 logits of the batch's `rows`, after the copy-on-write block copies."""
        self._copy_blocks(block_copies)
        meta = AttentionMetadata.build(
            batch.slots, batch.block_tables, batch.query_lens, batch.seq_lens, self.block_size, self.device
        )
        input_ids = torch.tensor(batch.input_ids, device=self.device)
        positions = torch.tensor(batch.positions, device=self.device)
        if self.fused_decode is not None and self.fused_decode.takes(meta):
            hidden = self.fused_decode.forward(self.model.embed_tokens(input_ids), positions, meta)
        else:
            hidden = self.model(input_ids, positions, meta)
        return self.model.compute_logits(hidden[rows])

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for cache in (*self.k_pools, *self.v_pools):
            copy_blocks(cache, src, dst)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
        if not seqs:
            return []
        batch = self._sampling_batch(seqs)
        result = self.sampler(logits, batch)
        return [
            SampledToken(
                seq,
                token,
                result.token_logprobs[row] if result.token_logprobs is not None else None,
                _logprob_dict(result, row, seq.request.params.logprobs),
            )
            for row, (seq, token) in enumerate(zip(seqs, result.token_ids))
        ]

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        params = [seq.request.params for seq in seqs]

        def column(name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=self.device)

        batch = SamplingBatch(
            temperature=column("temperature"),
            top_k=column("top_k", torch.int64),
            top_p=column("top_p"),
            min_p=column("min_p"),
            repetition_penalty=column("repetition_penalty"),
            presence_penalty=column("presence_penalty"),
            frequency_penalty=column("frequency_penalty"),
            generators=[seq.generator for seq in seqs],
            num_logprobs=max((_num_logprobs(p) for p in params), default=-1),
        )
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            batch.output_counts = self._token_counts([seq.output_token_ids for seq in seqs])
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = [seq.request.prompt_token_ids + seq.output_token_ids for seq in seqs]
            batch.seen_mask = self._token_counts(seen) > 0
        banned = [_banned_tokens(seq) for seq in seqs]
        if any(banned):
            batch.banned_mask = self._token_counts(banned) > 0
        return batch

    def _token_counts(self, token_lists: list[list[int]]) -> torch.Tensor:
        """[rows, vocab] how often each token occurs in each row's list."""
        counts = torch.zeros(len(token_lists), self.vocab_size, device=self.device)
        for row, tokens in enumerate(token_lists):
            if tokens:
                ids = torch.tensor(tokens, device=self.device)
                counts[row].index_add_(0, ids, torch.ones(len(tokens), device=self.device))
        return counts

    def _prompt_logprobs(self, logits: torch.Tensor, batch: _FlatBatch) -> dict[Sequence, list[dict[int, float]]]:
        if not batch.prompt_logprob_rows:
            return {}
        logprobs = torch.log_softmax(logits, dim=-1)
        result: dict[Sequence, list[dict[int, float]]] = {}
        offset = 0
        for seq, rows in batch.prompt_logprob_rows:
            first = len(seq.request.prompt_logprobs)
            targets = torch.tensor(seq.request.prompt_token_ids[first : first + len(rows)], device=self.device)
            block = logprobs[offset : offset + len(rows)]
            offset += len(rows)
            chosen = block.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
            top_values, top_ids = block.topk(seq.request.params.prompt_logprobs or 1, dim=-1)
            k = seq.request.params.prompt_logprobs or 0
            result[seq] = [
                {**dict(zip(ids[:k], values[:k])), target: value}
                for target, value, ids, values in zip(targets.tolist(), chosen, top_ids.tolist(), top_values.tolist())
            ]
        return result


class _FlatBatch:
    """Host-side lists describing one step's ragged batch."""

    def __init__(self) -> None:
        self.input_ids: list[int] = []
        self.positions: list[int] = []
        self.slots: list[int] = []
        self.block_tables: list[list[int]] = []
        self.query_lens: list[int] = []
        self.seq_lens: list[int] = []
        self.sample_rows: list[int] = []
        self.sample_seqs: list[Sequence] = []
        self.prompt_logprob_rows: list[tuple[Sequence, list[int]]] = []

    def add(self, item: ScheduledSequence, block_manager: BlockManager) -> None:
        seq = item.sequence
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + item.num_new_tokens
        offset = len(self.input_ids)
        self.input_ids += seq.token_ids(start, end)
        self.positions += range(start, end)
        self.slots += [block_manager.slot(seq, position) for position in range(start, end)]
        self.block_tables.append(seq.block_ids)
        self.query_lens.append(item.num_new_tokens)
        self.seq_lens.append(end)
        if item.completes:
            for sample in (seq, *item.forks):
                self.sample_rows.append(offset + item.num_new_tokens - 1)
                self.sample_seqs.append(sample)
        request = seq.request
        if request.params.prompt_logprobs is not None and seq.index == 0:
            # The logits at position p score prompt token p + 1; entry 0 (no context) is None.
            first_missing = len(request.prompt_logprobs)
            positions = range(max(start, first_missing - 1), min(end, seq.prompt_len - 1))
            if len(positions):
                self.prompt_logprob_rows.append((seq, [offset + p - start for p in positions]))


def _banned_tokens(seq: Sequence) -> list[int]:
    """Tokens that would end the sequence before min_tokens."""
    params = seq.request.params
    if len(seq.output_token_ids) >= params.min_tokens:
        return []
    eos = [] if params.ignore_eos else list(seq.detokenizer.tokenizer.eos_token_ids)
    return eos + params.stop_token_ids


def _num_logprobs(params: SamplingParams) -> int:
    """Top logprobs the sampler computes for a request; 0 still gives the drawn token's, -1 none."""
    return -1 if params.logprobs is None else params.logprobs


def _logprob_dict(result: SamplerOutput, row: int, num_logprobs: int | None) -> dict[int, float] | None:
    if num_logprobs is None or result.token_logprobs is None:
        return None
    top = dict(zip(result.top_ids[row][:num_logprobs], result.top_logprobs[row][:num_logprobs]))
    return {**top, result.token_ids[row]: result.token_logprobs[row]}
