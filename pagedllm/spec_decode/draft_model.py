"""Draft-model speculation: a second model of the same vocabulary (smaller, or the same file quantized) drafts each
decoding sequence's next tokens, one batched forward per draft position, before the target verifies them.

The draft's K/V lives in pools of its own, addressed through the target's block tables, so the block manager's
allocation, sharing, copy-on-write, prefix caching, preemption and freeing govern both caches at once. Only steps
that draft run the draft model, and only over their drafting sequences:
- its first pass catches each drafting sequence's K/V up with the target's (from where the draft's ends: a decode's
  last token, or everything computed since the sequence last drafted, its prompt included) and draws the first
  draft from the last row;
- each further pass feeds every drafting sequence its previous draft at the next position.
Where the draft's K/V of a sequence ends is remembered between steps (`computed_until`); the positions after it,
up to the target's computed tokens, are caught up the next time the sequence drafts, so a step too large to draft
costs the draft model nothing. Rejected drafts' K/V lies past the target's computed tokens, where it is overwritten
before anything reads it. A block whose draft K/V was never computed (its sequence finished without drafting
again) can reach the prefix cache; a sequence that finds it there drafts from stale K/V, so its drafts may be
accepted less often, its outputs stay the same.

Drafts are reserved before scheduling, since the draft writes their K/V into the blocks the scheduler allocates for
their verification, and drawn after it. A sampled request's drafts come with the distribution q each was drawn from
(the request's settings applied to the draft's logits) for the rejection sampler; a greedy one's are its argmax.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from pagedllm.config import EngineConfig, ModelConfig
from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.model_runner import ModelRunner, StepInput, step_input
from pagedllm.engine.request import Sequence
from pagedllm.engine.scheduler import SchedulerOutput
from pagedllm.errors import ConfigError
from pagedllm.layers.kv_cache_groups import kv_cache_layout
from pagedllm.layers.quantization import LinearQuantization
from pagedllm.layers.sampler import first_max_index, process_logits
from pagedllm.model.llama import LlamaForCausalLM
from pagedllm.model.loader import build_model, load_checkpoint
from pagedllm.model.registry import resolve_model_path
from pagedllm.model.tokenizer import Tokenizer
from pagedllm.spec_decode.config import SpeculativeConfig

logger = logging.getLogger(__name__)

RESERVED_DRAFT = -1  # a draft the scheduler counts before the draft model draws it


def load_draft_model(
    spec: SpeculativeConfig, config: EngineConfig, target: ModelConfig, tokenizer: Tokenizer, max_model_len: int
) -> LlamaForCausalLM:
    """The draft model, loaded as the engine loads the target (dtype, attention, group size) with the draft's own
    `quantization` (default: the engine's); refused unless it shares the target's tokenizer and KV-cache groups."""
    assert spec.model is not None
    path = resolve_model_path(spec.model)
    quantization = spec.quantization or config.quantization
    checkpoint = load_checkpoint(path, config.torch_dtype, keep_quantized=quantization == "auto")
    draft = checkpoint.config
    draft_tokenizer = Tokenizer.from_model_path(path, draft.eos_token_ids)
    if draft.vocab_size != target.vocab_size or draft_tokenizer.hf.get_vocab() != tokenizer.hf.get_vocab():
        raise ConfigError(
            f"speculative_config.model {spec.model!r} has another vocabulary than the target's "
            f"({draft.vocab_size} logits, {draft_tokenizer.vocab_size} tokens; the target's: {target.vocab_size} "
            f"logits, {tokenizer.vocab_size} tokens): a draft model must share the target's tokenizer",
            "model",
        )
    if kv_cache_layout(draft).sliding_windows != kv_cache_layout(target).sliding_windows:
        raise ConfigError(
            f"speculative_config.model {spec.model!r} groups its layers' attention windows otherwise than the "
            "target: its K/V is read through the target's block tables",
            "model",
        )
    if draft.max_position_embeddings < max_model_len:
        raise ConfigError(
            f"speculative_config.model {spec.model!r} has a context of {draft.max_position_embeddings} tokens, "
            f"less than max_model_len={max_model_len}",
            "model",
        )
    linear = LinearQuantization(quantization, config.quant_group_size, config.dense_matmul_min_rows)
    model = build_model(checkpoint, max_model_len, config.attention_impl, linear)
    logger.info("draft model %s: %.1f MiB of weights (%s)", path.name, model.weight_bytes() / 2**20, quantization)
    return model


@dataclass
class _Pass:
    """The rows of one forward of the draft model."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    spans: list[tuple[Sequence, int, int]] = field(default_factory=list)

    def add(self, seq: Sequence, token_ids: list[int], start: int, one_row_spans: bool) -> None:
        """Positions [start, start + len(token_ids)); as one-token decode rows (the fused decode takes those)."""
        end = start + len(token_ids)
        self.input_ids += token_ids
        self.positions += range(start, end)
        self.spans += [(seq, p, p + 1) for p in range(start, end)] if one_row_spans else [(seq, start, end)]

    def step(self, block_manager: BlockManager, logit_rows: list[int]) -> StepInput:
        return step_input(block_manager, self.input_ids, self.positions, self.spans, [], logit_rows)


class DraftModel:
    """Runs the draft model over the target's block tables; `propose` every step, `forget` finished sequences."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        # Where a sequence's draft K/V ends, for those it may lag (steps without drafting) or lead (drafts fed, of
        # which the verification may reject some): it is valid up to the lesser of this and the target's computed
        # tokens. A sequence not here has its draft K/V wherever the target's is.
        self.computed_until: dict[Sequence, int] = {}

    @torch.inference_mode()
    def propose(self, out: SchedulerOutput, block_manager: BlockManager) -> None:
        """Catch the drafting sequences' draft K/V up with the target's, then draw every reserved draft."""
        self.runner.copy_blocks(out.block_copies)
        drafting = [item for item in out.scheduled if item.num_draft_tokens]
        for item in out.scheduled:
            if not item.num_draft_tokens:
                self._lag(item.sequence)
        if not drafting:
            return
        first = _Pass()
        last_rows = []
        for item in drafting:
            seq = item.sequence
            start = min(self.computed_until.pop(seq, seq.num_computed_tokens), seq.num_computed_tokens)
            end = seq.num_computed_tokens + item.num_new_tokens - item.num_draft_tokens
            first.add(seq, seq.token_ids(start, end), start, one_row_spans=end - start == 1)
            last_rows.append(len(first.input_ids) - 1)
        logits = self.runner.forward(first.step(block_manager, last_rows))
        seqs = [item.sequence for item in drafting]
        with_probs = any(seq.request.params.temperature > 0 for seq in seqs)
        drafts: dict[Sequence, list[int]] = {seq: [] for seq in seqs}
        probs: dict[Sequence, list[torch.Tensor]] = {seq: [] for seq in seqs}
        self._draw(logits, seqs, drafts, probs, with_probs)
        for j in range(1, max(item.num_draft_tokens for item in drafting)):
            seqs = [item.sequence for item in drafting if item.num_draft_tokens > j]
            step = _Pass()
            for seq in seqs:
                step.add(seq, drafts[seq][-1:], seq.num_computed_tokens + j, one_row_spans=True)
            logits = self.runner.forward(step.step(block_manager, list(range(len(step.input_ids)))))
            self._draw(logits, seqs, drafts, probs, with_probs)
        for item in drafting:
            seq = item.sequence
            seq.draft_token_ids = drafts[seq]
            seq.draft_probs = torch.stack(probs[seq]) if with_probs else None
            # It fed the drafts but the last: its K/V ends one position before the verification's.
            self.computed_until[seq] = seq.num_computed_tokens + item.num_draft_tokens

    def _draw(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        drafts: dict[Sequence, list[int]],
        probs: dict[Sequence, list[torch.Tensor]],
        with_probs: bool,
    ) -> None:
        """Append each sequence's next draft, drawn from its row as the target's sampler would draw it (the drafts
        so far count as output), and with `with_probs` its distribution: one-hot for a greedy row."""
        target = process_logits(logits, self.runner.sampling_batch(seqs, [drafts[seq] for seq in seqs]))
        tokens = first_max_index(target.logits)
        rows = torch.tensor(target.random_rows, dtype=torch.int64, device=logits.device)
        row_probs = torch.softmax(target.logits[rows], dim=-1)
        if target.random_rows:
            tokens[rows] = self.runner.sampler.draw(row_probs, [seqs[row].generator for row in target.random_rows])
        if with_probs:
            q = torch.nn.functional.one_hot(tokens, logits.shape[1]).to(logits.dtype)
            q[rows] = row_probs
            for seq, row in zip(seqs, q):
                probs[seq].append(row)
        for seq, token in zip(seqs, tokens.tolist()):
            drafts[seq].append(token)

    def _lag(self, seq: Sequence) -> None:
        """A sequence that does not draft this step: its draft K/V stays where it ends (at most the target's)."""
        self.computed_until[seq] = min(self.computed_until.get(seq, seq.num_computed_tokens), seq.num_computed_tokens)

    def forget(self, seq: Sequence) -> None:
        self.computed_until.pop(seq, None)
