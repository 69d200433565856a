"""Flattens a step's scheduled work into one ragged batch, runs the model over the paged cache, and samples."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from pagedllm.config import EngineConfig, ModelConfig
from pagedllm.engine.block_manager import BlockManager, HasBlocks
from pagedllm.engine.candidate_branches import keep_branch
from pagedllm.engine.request import Sequence
from pagedllm.engine.scheduler import ScheduledSequence, SchedulerOutput
from pagedllm.layers.attention import AttentionMetadata, KVPool, copy_blocks
from pagedllm.layers.dola import dola_logits, premature_layers
from pagedllm.layers.kv_cache_groups import kv_cache_layout
from pagedllm.layers.kv_compaction import KVEviction, compact_kv, rotate_kv
from pagedllm.layers.kv_quant import KV_CACHE_BITS, QuantizedKVPool
from pagedllm.layers.rejection_sampler import DraftBatch, RejectionSampler, VerifiedTokens
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.layers.sampler import Sampler, SamplerOutput, SamplingBatch, process_logits
from pagedllm.model.fused_decode import FusedDecode
from pagedllm.model.hidden_states import HiddenCapture, capturing_layers
from pagedllm.model.llama import LlamaForCausalLM
from pagedllm.sampling_params import SamplingParams
from pagedllm.structured_output.manager import StructuredOutputManager


@dataclass
class SampledToken:
    sequence: Sequence
    token_id: int
    logprob: float | None  # the drawn token's, when logprobs are asked for
    logprobs: dict[int, float] | None  # the drawn token's and the top tokens' logprobs


@dataclass
class Verification:
    """How many of a sequence's drafts the step verified and how many of them it accepted."""

    sequence: Sequence
    num_draft_tokens: int
    num_accepted: int


@dataclass
class StepResult:
    samples: list[SampledToken]  # a verifying sequence's accepted drafts and its next token, in order
    prompt_logprobs: dict[Sequence, list[dict[int, float]]]  # new entries, in prompt order
    verifications: list[Verification] = field(default_factory=list)


def kv_cache_bytes_per_block(
    model_config: ModelConfig, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto"
) -> int:
    """K and V of one KV-cache group's layers for one block, a quantized cache's scales and zero points included."""
    mc = model_config
    if kv_cache_dtype == "auto":
        per_token = mc.num_kv_heads * mc.head_dim * dtype.itemsize
    else:
        per_token = QuantizedKVPool.bytes_per_token(mc.num_kv_heads, mc.head_dim, KV_CACHE_BITS[kv_cache_dtype])
    return 2 * kv_cache_layout(mc).layers_per_group * block_size * per_token


def kv_cache_shape(model: nn.Module) -> ModelConfig:
    """The model's shape with the K/V heads this process holds (a tensor-parallel rank holds those its query heads
    read); num_heads is set to them too, since a rank's share of query heads need not be a multiple of them."""
    heads = model.layers[0].self_attn.attn.num_kv_heads
    return dataclasses.replace(model.config, num_heads=heads, num_kv_heads=heads)


def allocate_kv_pool(model_config: ModelConfig, config: EngineConfig, num_blocks: int, device: torch.device) -> KVPool:
    """One layer's K or V pool: a tensor in the model dtype (kv_cache_dtype auto), else quantized."""
    shape = (num_blocks, config.block_size, model_config.num_kv_heads, model_config.head_dim)
    if config.kv_cache_dtype == "auto":
        return torch.zeros(shape, dtype=config.torch_dtype, device=device)
    return QuantizedKVPool(*shape, KV_CACHE_BITS[config.kv_cache_dtype], config.torch_dtype, device)


class ModelRunner:
    """Owns the model, the KV pools and the sampler, and picks each step's forward: all-decode steps that the
    fused kernel takes run every layer in one call (`fused_decode`), any other step the model's own forward."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        config: EngineConfig,
        num_blocks: int,
        device: torch.device,
        structured_output: StructuredOutputManager | None,
    ) -> None:
        """`structured_output` is None on a tensor-parallel rank, which computes logits and never samples."""
        self.model = model
        self.device = device
        self.block_size = config.block_size
        # The h2o policy evicts by the attention each cached token received: every step reports it.
        self.report_attention = config.kv_cache_policy == "h2o"
        mc = kv_cache_shape(model)
        # Layer j of every KV-cache group keeps its K/V in pool j; a block id belongs to one group at a time.
        layout = kv_cache_layout(mc)
        self.kv_cache_windows = layout.sliding_windows
        self.k_pools = [allocate_kv_pool(mc, config, num_blocks, device) for _ in range(layout.layers_per_group)]
        self.v_pools = [allocate_kv_pool(mc, config, num_blocks, device) for _ in range(layout.layers_per_group)]
        self.layer_k_pools = [self.k_pools[layout.pool_of(layer)] for layer in range(mc.num_layers)]
        self.layer_v_pools = [self.v_pools[layout.pool_of(layer)] for layer in range(mc.num_layers)]
        model.bind_kv_cache(self.layer_k_pools, self.layer_v_pools)
        self.fused_decode = (
            FusedDecode.of(model, self.layer_k_pools, self.layer_v_pools) if config.fused_decode else None
        )
        self._set_up_sampling(config, mc.vocab_size, structured_output)
        self.bytes_per_block = kv_cache_bytes_per_block(
            mc, config.block_size, config.torch_dtype, config.kv_cache_dtype
        )

    def _set_up_sampling(
        self, config: EngineConfig, vocab_size: int, structured_output: StructuredOutputManager | None
    ) -> None:
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(config.seed))
        self.structured_output = structured_output
        self.rejection_sampler = RejectionSampler(self.sampler)
        self.vocab_size = vocab_size

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, block_manager: BlockManager) -> StepResult:
        prepared = self.prepare(out, block_manager)
        if self.report_attention:  # in this process only: worker processes refuse the h2o policy
            prepared.step.report_attention = True
            logits, meta = self._run(prepared.step, prepared.capture)
            assert meta.attention_scores is not None
            _accumulate_scores(prepared.batch.spans, meta.attention_scores)
        else:
            logits = self.forward(prepared.step, prepared.capture)
        return self.sample(prepared, logits, block_manager)

    def prepare(self, out: SchedulerOutput, block_manager: BlockManager) -> PreparedStep:
        """The scheduled batch flattened into the step's forward, and what its sampling needs afterwards."""
        # A block an eviction frees may be a copy's destination or take new K/V in this very step.
        self._evict(out.kv_evictions)
        # Sequences with one new token first, longest context first: attention batches runs of similar length.
        items = sorted(
            out.scheduled,
            key=lambda item: (
                item.num_new_tokens - item.num_draft_tokens != 1,
                -item.sequence.num_computed_tokens - item.num_new_tokens,
            ),
        )
        batch = _FlatBatch()
        for item in items:
            batch.add(item)
        rows = batch.sample_rows + batch.candidate_rows + [row for _, rows in batch.prompt_logprob_rows for row in rows]
        step = step_input(block_manager, batch.input_ids, batch.positions, batch.spans, out.block_copies, rows)
        return PreparedStep(batch, step, self._hidden_capture(batch))

    @torch.inference_mode()
    def sample(self, prepared: PreparedStep, logits: torch.Tensor, block_manager: BlockManager) -> StepResult:
        """The step's tokens (and prompt logprobs, verifications) from the logits of its forward."""
        batch, capture = prepared.batch, prepared.capture
        num_samples, num_candidates = len(batch.sample_rows), len(batch.candidate_rows)
        prompt_logprobs = self._prompt_logprobs(logits[num_samples + num_candidates :], batch)
        if any(batch.sample_drafts):
            samples, verifications = self._verify(logits[:num_samples], batch)
            return StepResult(samples, prompt_logprobs, verifications)
        candidate_hidden = self._extend_contexts(batch, capture)
        samples = self._sample(self._apply_dola(logits[:num_samples], batch.sample_seqs, capture), batch.sample_seqs)
        candidate_logits = logits[num_samples : num_samples + num_candidates]
        samples += self._choose_candidates(batch, candidate_logits, candidate_hidden, block_manager)
        return StepResult(samples, prompt_logprobs)

    @torch.inference_mode()
    def forward(self, step: StepInput, capture: HiddenCapture | None = None) -> torch.Tensor:
        """Float32 logits of the step's logit_rows from this process's model and K/V pools, after the step's
        copy-on-write block copies; with `capture`, the hidden states it names are kept in it."""
        return self._run(step, capture)[0]

    def _run(self, step: StepInput, capture: HiddenCapture | None = None) -> tuple[torch.Tensor, AttentionMetadata]:
        """forward's logits, and the step's attention metadata (its attention scores added up where reported)."""
        hidden, meta = self.hidden_states(step, capture)
        if capture is not None and capture.final_rows:
            capture.final = self.model.norm(hidden[capture.final_rows])
        return self.model.compute_logits(hidden[step.logit_rows]), meta

    def hidden_states(
        self, step: StepInput, capture: HiddenCapture | None = None
    ) -> tuple[torch.Tensor, AttentionMetadata]:
        """The final hidden states of every token of the step (a pipeline stage's own layers' output), and the
        step's attention metadata.

        Early layers' states come from the model's own forward: a step that captures them skips the fused decode.
        """
        self.copy_blocks(step.block_copies)
        meta = step.attention_metadata(self.block_size, self.device)
        input_ids = torch.tensor(step.input_ids, device=self.device)
        positions = torch.tensor(step.positions, device=self.device)
        capture = capture or HiddenCapture()
        if self.fused_decode is not None and self.fused_decode.takes(meta) and not capture.layers:
            return self.fused_decode.forward(self.model.embed_tokens(input_ids), positions, meta), meta
        with capturing_layers(self.model.layers, capture, self.device) if capture.layers else nullcontext():
            return self.model(input_ids, positions, meta), meta

    def _hidden_capture(self, batch: _FlatBatch) -> HiddenCapture | None:
        """The hidden states the batch's contrastive and DoLa sequences need; None when no sequence needs any."""
        capture = HiddenCapture(
            final_rows=[row for _, rows in batch.context_rows for row in rows] + batch.candidate_rows
        )
        for row, seq in zip(batch.sample_rows, batch.sample_seqs):
            layers = self.dola_layers(seq.request.params)
            if layers:
                capture.layer_rows.append(row)
                capture.layers = sorted(set(capture.layers) | set(layers))
        return capture if capture.wants_anything else None

    def dola_layers(self, params: SamplingParams) -> list[int]:
        """A request's candidate premature layers; none without DoLa."""
        if params.dola_layers is None:
            return []
        config = self.model.config
        return premature_layers(params.dola_layers, config.num_layers, config.tie_word_embeddings)

    def _apply_dola(self, logits: torch.Tensor, seqs: list[Sequence], capture: HiddenCapture | None) -> torch.Tensor:
        """The sample rows' logits, DoLa's contrast in place of the final logits for the sequences that use it."""
        if capture is None or not capture.layers:
            return logits
        logits = logits.clone()
        index = 0  # into the captured rows, which follow the DoLa sequences' sample rows in order
        for row, seq in enumerate(seqs):
            layers = self.dola_layers(seq.request.params)
            if layers:
                early = torch.stack([capture.by_layer[layer][index] for layer in layers])
                logits[row] = dola_logits(logits[row], self.model.compute_logits(early))
                index += 1
        return logits

    def _extend_contexts(self, batch: _FlatBatch, capture: HiddenCapture | None) -> torch.Tensor | None:
        """Add the step's computed tokens to their contrastive contexts; the candidates' hidden states remain."""
        if capture is None or capture.final is None:
            return None
        offset = 0
        for seq, rows in batch.context_rows:
            assert seq.contrastive is not None
            seq.contrastive.append(capture.final[offset : offset + len(rows)])
            offset += len(rows)
        return capture.final[offset:]

    def _choose_candidates(
        self,
        batch: _FlatBatch,
        logits: torch.Tensor,
        hidden: torch.Tensor | None,
        block_manager: BlockManager,
    ) -> list[SampledToken]:
        """Each branching sequence's best candidate: its token, its K/V kept, and the next step's candidates."""
        if not batch.branch_items:
            return []
        assert hidden is not None
        samples, next_rows, chosen = [], [], []
        start = 0
        for item in batch.branch_items:
            seq, state = item.sequence, item.sequence.contrastive
            assert state is not None
            num = len(item.branches)
            best = state.choose(hidden[start : start + num])
            token = state.candidate_ids[best]
            state.append(hidden[start + best : start + best + 1])
            keep_branch(block_manager, seq, item.branches[best])
            samples.append(SampledToken(seq, token, None, None))
            next_rows.append(start + best)
            chosen.append([token])
            start += num
        seqs = [item.sequence for item in batch.branch_items]
        self._set_candidates(logits[next_rows], seqs, chosen)
        return samples

    def _set_candidates(self, logits: torch.Tensor, seqs: list[Sequence], row_drafts: list[list[int]]) -> None:
        """Contrastive sequences' next candidates from their next-token logits, the penalties and bans applied as
        if each output already ended with its row's drafts (the token chosen with these logits)."""
        batch = self.sampling_batch(seqs, row_drafts)
        batch.temperature = torch.zeros_like(batch.temperature)  # candidates come from the unscaled distribution
        processed = process_logits(logits, batch).logits
        for row, seq in enumerate(seqs):
            assert seq.contrastive is not None
            seq.contrastive.set_candidates(processed[row])

    def _evict(self, evictions: list[KVEviction]) -> None:
        for eviction in evictions:
            self.copy_blocks(eviction.block_copies)
            for k_pool, v_pool in zip(self.k_pools, self.v_pools, strict=True):
                for compaction in eviction.compactions:
                    compact_kv(k_pool, v_pool, self._rotary_of(compaction.group), compaction, self.device)
                for rotation in eviction.rotations:
                    rotate_kv(k_pool, v_pool, self._rotary_of(rotation.group), rotation, self.device)

    def _rotary_of(self, group: int) -> RotaryEmbedding:
        """The RoPE tables of a KV-cache group's layers (Gemma 3's local and global layers have their own)."""
        return self.model.rotary_for(self.kv_cache_windows[group])

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: each (source, destination) block of every K/V pool."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for cache in (*self.k_pools, *self.v_pools):
            copy_blocks(cache, src, dst)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
        """Draw the sequences' next tokens; a contrastive sequence gets its first candidates instead."""
        contrastive = [row for row, seq in enumerate(seqs) if seq.contrastive is not None]
        if contrastive:
            rows = [seqs[row] for row in contrastive]
            self._set_candidates(logits[contrastive], rows, [[] for _ in rows])
            kept = [row for row in range(len(seqs)) if seqs[row].contrastive is None]
            logits, seqs = logits[kept], [seqs[row] for row in kept]
        if not seqs:
            return []
        batch = self.sampling_batch(seqs)
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

    def _verify(self, logits: torch.Tensor, batch: _FlatBatch) -> tuple[list[SampledToken], list[Verification]]:
        """Accept a prefix of each sequence's drafts and draw its next token; rows j of a sequence with drafts d
        are sampled as if its output already ended with d[:j] (penalties and min_tokens see them)."""
        seqs, drafts = batch.sample_seqs, batch.sample_drafts
        row_seqs = [seq for seq, tokens in zip(seqs, drafts) for _ in range(len(tokens) + 1)]
        row_drafts = [tokens[:j] for tokens in drafts for j in range(len(tokens) + 1)]
        probs = [p for p, tokens in zip(batch.sample_draft_probs, drafts) if tokens]
        draft_probs = torch.cat(probs) if probs and all(p is not None for p in probs) else None
        draft_batch = DraftBatch(
            [len(tokens) for tokens in drafts], [t for tokens in drafts for t in tokens], draft_probs
        )
        result = self.rejection_sampler(logits, self.sampling_batch(row_seqs, row_drafts), draft_batch)
        samples = [
            SampledToken(
                seq,
                token,
                result.token_logprobs[index][j] if result.token_logprobs is not None else None,
                _verified_logprob_dict(result, index, j, seq.request.params.logprobs),
            )
            for index, seq in enumerate(seqs)
            for j, token in enumerate(result.token_ids[index])
        ]
        verifications = [
            Verification(seq, len(tokens), accepted)
            for seq, tokens, accepted in zip(seqs, drafts, result.num_accepted)
            if tokens
        ]
        return samples, verifications

    def sampling_batch(self, seqs: list[Sequence], row_drafts: list[list[int]] | None = None) -> SamplingBatch:
        """One row per sequence; with `row_drafts`, each row's output continues with its drafts."""
        params = [seq.request.params for seq in seqs]
        drafts = row_drafts or [[] for _ in seqs]

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
            batch.output_counts = self._token_counts([seq.output_token_ids + d for seq, d in zip(seqs, drafts)])
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = [seq.request.prompt_token_ids + seq.output_token_ids + d for seq, d in zip(seqs, drafts)]
            batch.seen_mask = self._token_counts(seen) > 0
        banned = [_banned_tokens(seq, len(d)) for seq, d in zip(seqs, drafts)]
        if any(banned):
            batch.banned_mask = self._token_counts(banned) > 0
        if any(p.logit_bias for p in params):
            batch.logit_bias = self._logit_bias(params)
        if self.structured_output is not None:
            batch.allowed_bitmask = self.structured_output.bitmask(seqs)
        return batch

    def _logit_bias(self, params: list[SamplingParams]) -> torch.Tensor:
        bias = torch.zeros(len(params), self.vocab_size, device=self.device)
        for row, p in enumerate(params):
            for token, value in (p.logit_bias or {}).items():
                bias[row, token] = value
        return bias

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
        self.spans: list[tuple[HasBlocks, int, int]] = []  # each sequence's (or branch's) new positions [start, end)
        self.sample_rows: list[int] = []
        self.sample_seqs: list[Sequence] = []
        self.sample_drafts: list[list[int]] = []  # per sample sequence: drafts verified on its rows
        self.sample_draft_probs: list[torch.Tensor | None] = []  # their distributions (None: one-hot)
        self.prompt_logprob_rows: list[tuple[Sequence, list[int]]] = []
        self.context_rows: list[tuple[Sequence, list[int]]] = []  # contrastive sequences' computed tokens
        self.candidate_rows: list[int] = []  # the branches' rows, item after item
        self.branch_items: list[ScheduledSequence] = []

    def add(self, item: ScheduledSequence) -> None:
        seq = item.sequence
        if item.branches:
            self._add_branches(item)
            return
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + item.num_new_tokens
        drafts = seq.draft_token_ids[: item.num_draft_tokens]
        offset = len(self.input_ids)
        self.input_ids += seq.token_ids(start, end - len(drafts)) + drafts
        # Positions within the cache: token positions unless tokens left it (an evicting KV-cache policy).
        evicted = seq.num_evicted_tokens
        self.positions += range(start - evicted, end - evicted)
        if drafts:
            # A decode with drafts (drafts follow one uncomputed token) runs as one decode row per position over
            # its own prefix: each row is computed, and rounded, as a lone decode of that position would be, and
            # the fused decode takes the step. Every row's K/V is written before any row attends.
            self.spans += [(seq, position - evicted, position - evicted + 1) for position in range(start, end)]
        else:
            self.spans.append((seq, start - evicted, end - evicted))
        if item.completes:
            # The last verified token's row scores the first draft, each draft's row the next; the last is a bonus.
            first_row = offset + item.num_new_tokens - 1 - len(drafts)
            for sample in (seq, *item.forks):
                self.sample_rows += range(first_row, first_row + len(drafts) + 1)
                self.sample_seqs.append(sample)
                self.sample_drafts.append(drafts)
                self.sample_draft_probs.append(seq.draft_probs if drafts else None)
        request = seq.request
        if request.params.prompt_logprobs is not None and seq.index == 0:
            # The logits at position p score prompt token p + 1; entry 0 (no context) is None.
            first_missing = len(request.prompt_logprobs)
            positions = range(max(start, first_missing - 1), min(end, seq.prompt_len - 1))
            if len(positions):
                self.prompt_logprob_rows.append((seq, [offset + p - start for p in positions]))
        if seq.contrastive is not None:
            self.context_rows.append((seq, list(range(offset, offset + item.num_new_tokens))))

    def _add_branches(self, item: ScheduledSequence) -> None:
        """One row per candidate at the sequence's next position, each over its own branch's blocks."""
        seq = item.sequence
        assert seq.contrastive is not None
        position = seq.num_computed_tokens
        offset = len(self.input_ids)
        self.input_ids += seq.contrastive.candidate_ids
        self.positions += [position] * len(item.branches)
        self.spans += [(branch, position, position + 1) for branch in item.branches]
        self.candidate_rows += range(offset, offset + len(item.branches))
        self.branch_items.append(item)


@dataclass
class PreparedStep:
    """A step between its batch's flattening and its sampling: the forward to run and the batch it came from."""

    batch: _FlatBatch
    step: StepInput
    capture: HiddenCapture | None  # the hidden states the step's sampling needs; None when it needs none


@dataclass
class StepInput:
    """One step's forward as plain lists: everything a process holding the model (or a rank's shard of it) needs."""

    input_ids: list[int]
    positions: list[int]
    query_lens: list[int]
    seq_lens: list[list[int]]  # per KV-cache group: each sequence's context length after the step
    slot_mappings: list[list[int]]  # per KV-cache group: each new token's slot
    block_tables: list[list[list[int]]]  # per KV-cache group: each sequence's block ids
    logit_rows: list[int]  # rows of the batch whose logits are sampled or scored, in that order
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (source, destination), before the forward
    report_attention: bool = False  # the attention each cached token receives is summed (the h2o policy)

    def attention_metadata(self, block_size: int, device: torch.device) -> AttentionMetadata:
        """KV-cache group 0's metadata, linking every group's."""
        metas = [
            AttentionMetadata.build(slots, tables, self.query_lens, seq_lens, block_size, device)
            for slots, tables, seq_lens in zip(self.slot_mappings, self.block_tables, self.seq_lens, strict=True)
        ]
        if len(metas) > 1:
            metas[0].kv_cache_groups = metas
        if self.report_attention:
            # Group 0 sees the whole context, as does any group that reports: all of them add to one tensor.
            width = metas[0].block_tables.shape[1] * block_size
            scores = torch.zeros(len(self.query_lens), width, device=device)
            for meta in metas:
                meta.attention_scores = scores
        return metas[0]


def _accumulate_scores(spans: list[tuple[Sequence, int, int]], scores: torch.Tensor) -> None:
    """Add a step's attention scores to each sequence's: row i holds span i's, over its cache positions [0, end)."""
    for row, (seq, start, end) in enumerate(spans):
        total = scores[row, :end].clone()
        if seq.kv_scores is not None:
            total[:start] += seq.kv_scores
        seq.kv_scores = total


def step_input(
    block_manager: BlockManager,
    input_ids: list[int],
    positions: list[int],
    spans: list[tuple[HasBlocks, int, int]],
    block_copies: list[tuple[int, int]],
    logit_rows: list[int],
) -> StepInput:
    """The forward of rows that compute each span's cache positions [start, end), in order, as plain lists."""
    return StepInput(
        input_ids,
        positions,
        [end - start for _, start, end in spans],
        *_kv_cache_places(block_manager, spans),
        logit_rows,
        block_copies,
    )


def _kv_cache_places(
    block_manager: BlockManager, spans: list[tuple[HasBlocks, int, int]]
) -> tuple[list[list[int]], list[list[int]], list[list[list[int]]]]:
    """Per KV-cache group: the spans' context lengths, the slots of their new positions, and their block tables.

    A sliding-window group's tables count token positions: its spans start past their cache positions by the
    tokens evicted (none but under an evicting policy)."""
    seq_lens, slot_mappings, block_tables = [], [], []
    for group, window in enumerate(block_manager.sliding_windows):
        offsets = [seq.num_evicted_tokens if window is not None else 0 for seq, _, _ in spans]
        seq_lens.append([end + offset for (_, _, end), offset in zip(spans, offsets)])
        slot_mappings.append(
            [
                block_manager.slot(seq, p + offset, group)
                for (seq, start, end), offset in zip(spans, offsets)
                for p in range(start, end)
            ]
        )
        block_tables.append([block_manager.tables(seq)[group] for seq, _, _ in spans])
    return seq_lens, slot_mappings, block_tables


def attention_metadata(
    block_manager: BlockManager, spans: list[tuple[HasBlocks, int, int]], device: torch.device
) -> AttentionMetadata:
    """The metadata of sequences computing positions [start, end): KV-cache group 0's, linking every group's."""
    step = StepInput([], [], [end - start for _, start, end in spans], *_kv_cache_places(block_manager, spans), [])
    return step.attention_metadata(block_manager.block_size, device)


def _banned_tokens(seq: Sequence, num_drafted: int = 0) -> list[int]:
    """Tokens that would end the sequence before min_tokens (its output continued by `num_drafted` drafts)."""
    params = seq.request.params
    if len(seq.output_token_ids) + num_drafted >= params.min_tokens:
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


def _verified_logprob_dict(
    result: VerifiedTokens, index: int, j: int, num_logprobs: int | None
) -> dict[int, float] | None:
    """The logprobs of sequence `index`'s j-th emitted token, as _logprob_dict gives a sampled token's."""
    if num_logprobs is None or result.token_logprobs is None:
        return None
    assert result.top_ids is not None and result.top_logprobs is not None
    top = dict(zip(result.top_ids[index][j][:num_logprobs], result.top_logprobs[index][j][:num_logprobs]))
    return {**top, result.token_ids[index][j]: result.token_logprobs[index][j]}
