"""The engine: admits requests, runs one scheduling step at a time, and reports per-request outputs."""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from pagedllm.config import EngineConfig, ModelConfig, SpeculativeConfig
from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.candidate_branches import num_scratch_blocks, release_branches
from pagedllm.engine.distributed_runner import DistributedModelRunner, distributed_bytes_per_block
from pagedllm.engine.executor import MultiprocExecutor
from pagedllm.engine.faults import StepFaults
from pagedllm.engine.host_memory import (
    HeapTrimmer,
    limit_malloc_arenas,
    release_freed_memory,
    resident_bytes,
    reuse_freed_step_memory,
)
from pagedllm.engine.kv_cache_policy import eviction_policy
from pagedllm.engine.model_runner import (
    ModelRunner,
    PreparedStep,
    StepResult,
    Verification,
    kv_cache_bytes_per_block,
    kv_cache_shape,
)
from pagedllm.engine.output import RequestOutput, append_token, finish_grammar, make_request_output
from pagedllm.engine.prefix_cache import PrefixCache
from pagedllm.engine.ray_executor import RayExecutor
from pagedllm.engine.request import FinishReason, Request, Sequence
from pagedllm.engine.scheduler import Scheduler, SchedulerOutput
from pagedllm.engine.worker import load_model
from pagedllm.errors import ConfigError, InvalidArgumentError, RequestTooLongError
from pagedllm.layers.contrastive import ContrastiveState
from pagedllm.layers.dola import premature_layers
from pagedllm.layers.kv_cache_groups import kv_cache_layout
from pagedllm.model.loader import load_model_config
from pagedllm.model.registry import model_display_name, resolve_model_path
from pagedllm.model.tokenizer import IncrementalDetokenizer, Tokenizer
from pagedllm.sampling_params import SamplingParams
from pagedllm.search import BeamSearchRequest, BestOfRequest, SearchDriver
from pagedllm.spec_decode.draft_model import load_draft_model
from pagedllm.spec_decode.speculator import SpecDecodeStats, Speculator
from pagedllm.structured_output.backend import GrammarBackend
from pagedllm.structured_output.manager import StructuredOutputManager

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefixCacheStats:
    """Prompt tokens looked up in one prefix cache, and those found there."""

    queried_tokens: int
    hit_tokens: int

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


@dataclass
class EngineStats:
    """Counters and gauges of the engine, read by metrics."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    spec_decode: SpecDecodeStats = field(default_factory=SpecDecodeStats)
    replica_prefix_caches: tuple[PrefixCacheStats, ...] = ()  # each data-parallel replica's, in order; () for one


class LLMEngine:
    """add_request / step / abort over a loaded model, its paged KV cache and a continuous-batching scheduler."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        # The engine thread's step transients share the loader's heap instead of keeping one of their own.
        limit_malloc_arenas(1)
        reuse_freed_step_memory()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)  # process-wide, once: the math's threads never outnumber them
        path = resolve_model_path(config.model)
        self.model_name = model_display_name(config.model)
        self.model_config: ModelConfig = load_model_config(path)
        self.max_model_len = self._max_model_len(self.model_config)
        self.tokenizer = Tokenizer.from_model_path(path, self.model_config.eos_token_ids)
        self.grammars = GrammarBackend(self.tokenizer, self.model_config.vocab_size)
        self.structured_output = StructuredOutputManager(self.grammars)
        spec = config.speculative_config if isinstance(config.speculative_config, SpeculativeConfig) else None
        self.runner, self.draft_runner = (
            (self._start_workers(), None) if config.executor_backend != "uni" else self._load_model(spec)
        )
        logger.info("weights: %.1f MiB (quantization %s)", self.weight_bytes / 2**20, config.quantization)
        if self.file_weight_bytes:
            ratio = self.weight_bytes / self.file_weight_bytes
            logger.info("weights: %.2fx the checkpoint's %.1f MiB", ratio, self.file_weight_bytes / 2**20)
        salt = f"{path.name}:{config.dtype}:{config.kv_cache_dtype}:{config.quantization}:{config.quant_group_size}"
        prefix_cache = PrefixCache(config.block_size, salt=salt) if config.enable_prefix_caching else None
        sliding_windows = kv_cache_layout(self.model_config).sliding_windows
        self.eviction = eviction_policy(config, self.model_config, self.max_model_len)
        self.block_manager = BlockManager(
            self.num_blocks, config.block_size, prefix_cache, sliding_windows, self.eviction
        )
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.heap = HeapTrimmer()
        self.faults = StepFaults.from_environment()
        self.requests: dict[str, Request] = {}
        self.kept: dict[str, Sequence] = {}  # finished keep_kv requests' sequences, holding their blocks
        self.searches = SearchDriver(self)
        self.speculator = Speculator(spec, self.max_model_len, self.draft_runner) if spec is not None else None
        self.max_concurrent_batches = self._max_concurrent_batches()
        self.batches: deque[tuple[SchedulerOutput, PreparedStep]] = deque()  # in flight, oldest first
        self.prompt_tokens = 0
        self.generation_tokens = 0
        logger.info(
            "%s loaded: %d KV blocks of %d tokens (%d tokens), context %d",
            self.model_name,
            self.num_blocks,
            config.block_size,
            self.num_blocks * config.block_size,
            self.max_model_len,
        )
        self._log_resident_memory()

    def _load_model(self, spec: SpeculativeConfig | None) -> tuple[ModelRunner, ModelRunner | None]:
        """The model and its KV pools in this process and the runner over them, and with draft-model speculation
        the draft's runner (its pools take a block of their own for every block id: it reads them through the
        same tables)."""
        config = self.config
        loaded = load_model(config, self.max_model_len)
        self.weight_bytes, self.file_weight_bytes = loaded.weight_bytes, loaded.file_weight_bytes
        models = [loaded.model]
        if spec is not None and spec.method == "draft_model":
            draft = load_draft_model(spec, config, self.model_config, self.tokenizer, self.max_model_len)
            self.weight_bytes += draft.weight_bytes()
            models.append(draft)
            release_freed_memory()  # the draft loader's dequantized copies: freed, but resident until returned
        self.num_blocks = self._num_blocks(
            sum(
                kv_cache_bytes_per_block(
                    kv_cache_shape(m), config.block_size, config.torch_dtype, config.kv_cache_dtype
                )
                for m in models
            )
        )
        runners = [
            ModelRunner(m.to(self.device), config, self.num_blocks, self.device, self.structured_output) for m in models
        ]
        return runners[0], runners[1] if len(runners) > 1 else None

    def _log_resident_memory(self) -> None:
        """This process's resident memory once loaded, beside the weights and KV cache it holds."""
        resident = resident_bytes()
        if resident is None:
            return
        if self.config.executor_backend != "uni":
            logger.info("resident memory: %.1f MiB (the weights and KV cache are the workers')", resident / 2**20)
            return
        logger.info(
            "resident memory: %.1f MiB, %.2fx the weights (%.1f MiB) and KV cache (%.1f MiB)",
            resident / 2**20,
            resident / (self.weight_bytes + self.kv_cache_bytes),
            self.weight_bytes / 2**20,
            self.kv_cache_bytes / 2**20,
        )

    def _start_workers(self) -> ModelRunner:
        """A worker process per rank, each loading its shard and the KV pools of its heads, and the runner here that
        batches, sends each step to them and samples."""
        self.num_blocks = self._num_blocks(distributed_bytes_per_block(self.model_config, self.config))
        executor_class = RayExecutor if self.config.executor_backend == "ray" else MultiprocExecutor
        executor = executor_class(self.config, self.num_blocks, self.max_model_len, self.config.world_size)
        self.weight_bytes, self.file_weight_bytes = executor.weight_bytes, executor.file_weight_bytes
        return DistributedModelRunner(executor, self.model_config, self.config, self.device, self.structured_output)

    def _max_concurrent_batches(self) -> int:
        """Scheduled batches in flight at once: one per pipeline stage with pipeline_micro_batches, so that every
        stage works on one; else one, each step run through every stage before the next is scheduled."""
        config = self.config
        if config.pipeline_parallel_size == 1 or not config.pipeline_micro_batches:
            return 1
        # A speculating step's drafts are proposed from its sequences' latest tokens and its rejected drafts'
        # blocks go back before the next step is scheduled: it runs one step at a time.
        if self.speculator is not None:
            return 1
        return config.pipeline_parallel_size

    def shutdown(self) -> None:
        """Stop the worker processes, if the model runs in any."""
        if isinstance(self.runner, DistributedModelRunner):
            self.runner.executor.shutdown()

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes the KV cache's pools hold, the draft model's included."""
        runners = [runner for runner in (self.runner, self.draft_runner) if runner is not None]
        return self.num_blocks * sum(runner.bytes_per_block for runner in runners)

    @property
    def _max_seq_len(self) -> int:
        """The longest a sequence runs: the context, or without a limit where its cache keeps only a window."""
        return self.max_model_len if self.eviction is None else sys.maxsize

    def _max_model_len(self, model_config: ModelConfig) -> int:
        limit = model_config.max_position_embeddings
        if self.config.max_model_len is None:
            return limit
        if self.config.max_model_len > limit:
            raise ConfigError(f"max_model_len={self.config.max_model_len} exceeds the model's limit of {limit}")
        return self.config.max_model_len

    def _num_blocks(self, per_block: int) -> int:
        num_blocks = self.config.kv_cache_bytes() // per_block
        if num_blocks < 1:
            raise ConfigError(
                f"kv_cache_memory={self.config.kv_cache_memory} holds no block; one block needs {per_block} bytes"
            )
        return num_blocks

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        keep_kv: bool = False,
    ) -> None:
        """Queue a prompt (text or token ids); raises InvalidArgumentError if it can never be served.

        Beam search and best_of > n run as searches above the core, through ordinary requests. With `keep_kv`,
        the finished request keeps its blocks for `fork_request` until `release_request`.
        """
        self._check_unused(request_id)
        if self.eviction is not None:
            self.eviction.check_request(params, keep_kv)
        text = prompt if isinstance(prompt, str) else None
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check_fits(token_ids, params)
        self._check_decoding_strategy(params)
        if params.structured_outputs is not None:
            self.grammars.compile(params.structured_outputs)  # refused here, before it is queued, if invalid
        arrival_time = arrival_time or time.monotonic()
        if params.use_beam_search:
            self.searches.start(BeamSearchRequest(request_id, text, token_ids, params, arrival_time, self.tokenizer))
        elif params.num_samples > params.n:
            self.searches.start(BestOfRequest(request_id, text, token_ids, params, arrival_time))
        else:
            self._queue(Request(request_id, text, token_ids, params, arrival_time, keep_kv=keep_kv))

    def fork_request(
        self, source_id: str, request_id: str, token_ids: list[int], params: SamplingParams, keep_kv: bool = False
    ) -> None:
        """Queue a request whose prompt is a kept request's prompt followed by `token_ids`.

        It starts from the K/V the source computed for its prompt: the blocks are shared by reference and a
        partially filled one is copied before the new request writes to it.
        """
        self._check_unused(request_id)
        source = self.kept.get(source_id)
        if source is None:
            raise InvalidArgumentError(f"request {source_id!r} is not kept: it cannot be forked", "request_id")
        prompt_token_ids = source.request.prompt_token_ids + list(token_ids)
        self._check_fits(prompt_token_ids, params)
        request = Request(request_id, None, prompt_token_ids, params, time.monotonic(), keep_kv=keep_kv)
        self._queue(request, fork_of=source)

    def release_request(self, request_id: str) -> None:
        """Free the blocks of a finished `keep_kv` request; unknown ids are ignored."""
        seq = self.kept.pop(request_id, None)
        if seq is not None:
            self.block_manager.free(seq)

    def _check_decoding_strategy(self, params: SamplingParams) -> None:
        """Refuse contrastive search and DoLa where this engine cannot run them."""
        name = "penalty_alpha" if params.uses_contrastive_search else "dola_layers"
        if not params.uses_contrastive_search and params.dola_layers is None:
            return
        # Both read hidden states in this process, and rank the model's own next-token distribution each step.
        if self.config.executor_backend != "uni":
            raise InvalidArgumentError(f"{name} is not supported with tensor or pipeline parallelism", name)
        if self.speculator is not None:
            raise InvalidArgumentError(f"{name} is not supported with speculative decoding", name)
        if params.uses_contrastive_search and self.eviction is not None:
            raise InvalidArgumentError(
                f"penalty_alpha is not supported with the {self.config.kv_cache_policy} KV-cache policy", name
            )
        if params.dola_layers is not None:
            mc = self.model_config
            premature_layers(params.dola_layers, mc.num_layers, mc.tie_word_embeddings)

    def _check_unused(self, request_id: str) -> None:
        if request_id in self.requests or request_id in self.kept or self.searches.has(request_id):
            raise InvalidArgumentError(f"request id {request_id!r} is already in use", "request_id")

    def _queue(self, request: Request, fork_of: Sequence | None = None) -> None:
        params = request.params
        if request.keep_kv and params.n > 1:
            raise InvalidArgumentError("keep_kv takes requests of one sequence (n=1)", "n")
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params.skip_special_tokens)
        first = Sequence(request, 0, request.generator(0, self.device), detokenizer, pending_forks=params.n - 1)
        if params.uses_contrastive_search:
            first.contrastive = ContrastiveState(params.penalty_alpha, params.top_k)
        if fork_of is not None:
            num_shared = fork_of.prompt_len
            self.block_manager.fork(fork_of, first, num_shared)
            first.num_computed_tokens = num_shared
            first.block_hashes = fork_of.block_hashes[: num_shared // self.config.block_size]
            first.num_registered_blocks = min(fork_of.num_registered_blocks, len(first.block_hashes))
        request.sequences.append(first)
        self.requests[request.request_id] = request
        self.scheduler.add(first)

    def _check_fits(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise InvalidArgumentError("the prompt is empty", "prompt")
        if min(token_ids) < 0 or max(token_ids) >= self.model_config.vocab_size:
            raise InvalidArgumentError(f"prompt token ids must be in [0, {self.model_config.vocab_size})", "prompt")
        if params.logit_bias and max(params.logit_bias) >= self.model_config.vocab_size:
            raise InvalidArgumentError(f"logit_bias keys must be in [0, {self.model_config.vocab_size})", "logit_bias")
        total = len(token_ids) + params.max_tokens
        if total > self.max_model_len and self.eviction is None:
            raise RequestTooLongError(
                f"this model's context is {self.max_model_len} tokens, but the prompt has {len(token_ids)} and "
                f"max_tokens is {params.max_tokens} ({total} in all)",
                "max_tokens",
            )
        # Contrastive search's candidates hold a scratch block each (per KV-cache group) during their step.
        scratch = num_scratch_blocks(self.block_manager, params.top_k) if params.uses_contrastive_search else 0
        needed = self.block_manager.blocks_for(total, self.config.max_num_batched_tokens) + scratch
        if needed > self.num_blocks:
            # Counted in blocks: with sliding-window layers a sequence holds blocks in several KV-cache groups, so
            # no single token capacity describes the cache.
            raise RequestTooLongError(
                f"the prompt has {len(token_ids)} tokens and max_tokens is {params.max_tokens} ({total} in all), "
                f"which needs {needed} KV-cache blocks of {self.config.block_size} tokens, but the cache has "
                f"{self.num_blocks}; raise kv_cache_memory",
                "max_tokens",
            )
        if params.n > self.config.max_num_seqs:
            raise InvalidArgumentError(f"n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}", "n")
        width, name = (params.beam_width, "beam_width") if params.use_beam_search else (params.num_samples, "best_of")
        if width is not None and width > self.config.max_num_seqs:
            raise InvalidArgumentError(f"{name}={width} exceeds max_num_seqs={self.config.max_num_seqs}", name)

    def abort_request(self, request_id: str) -> None:
        """Drop a request now, freeing its blocks; unknown or finished ids are ignored."""
        if self.searches.abort(request_id):
            return
        self.release_request(request_id)
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.sequences:
            if seq.finish_reason is None:
                seq.finish_reason = FinishReason.ABORT
                self._finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or self.searches.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one iteration; return the outputs of every request that advanced."""
        if self.max_concurrent_batches > 1:
            return self._step_with_micro_batches()
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        scheduled = self.scheduler.schedule()
        if not scheduled.scheduled:
            return []
        with self._returned_on_failure(scheduled):
            self.faults.check()
            if self.speculator is not None:
                self.speculator.draft(scheduled, self.block_manager)
            result = self.runner.execute(scheduled, self.block_manager)
        self.heap.after_step()
        return self._process(scheduled, result)

    @contextmanager
    def _returned_on_failure(self, scheduled: SchedulerOutput) -> Iterator[None]:
        """A batch whose run fails is no longer in flight: its sequences can be scheduled again (and a failed
        executor then fails that step at once)."""
        try:
            yield
        except BaseException:
            self.scheduler.complete(scheduled)
            raise

    def _step_with_micro_batches(self) -> list[RequestOutput]:
        """Schedule a batch and hand it to the pipeline's first stage while fewer than max_concurrent_batches are
        in flight (returning no outputs: the stages work on it meanwhile); once they are that many, or nothing more
        could be scheduled, wait for the oldest batch and apply its outputs, batches in the order scheduled."""
        assert isinstance(self.runner, DistributedModelRunner)
        if len(self.batches) < self.max_concurrent_batches:
            # Each batch takes its share of the live sequences, so that the batches in flight are alike in size.
            num_live = len(self.scheduler.running) + len(self.scheduler.waiting)
            scheduled = self.scheduler.schedule(max_batch_seqs=-(-num_live // self.max_concurrent_batches) or None)
            if scheduled.scheduled:
                with self._returned_on_failure(scheduled):
                    self.faults.check()
                    self.batches.append((scheduled, self.runner.submit(scheduled, self.block_manager)))
                if len(self.batches) < self.max_concurrent_batches:
                    return []
        if not self.batches:
            return []
        scheduled, pending = self.batches.popleft()
        with self._returned_on_failure(scheduled):
            result = self.runner.collect(pending, self.block_manager)
        self.heap.after_step()
        return self._process(scheduled, result)

    def _process(self, scheduled: SchedulerOutput, result: StepResult) -> list[RequestOutput]:
        now = time.monotonic()
        self.scheduler.complete(scheduled)
        for item in scheduled.scheduled:
            seq = item.sequence
            if seq.finish_reason is not None:
                continue  # aborted while its batch was in flight: its blocks are already free
            if item.branches:
                release_branches(self.block_manager, item.branches)
                continue  # the chosen candidate's K/V counts once it is appended, below
            if seq.num_computed_tokens < seq.prompt_len:
                self.prompt_tokens += min(item.num_new_tokens, seq.prompt_len - seq.num_computed_tokens)
            # Drafts have K/V only once accepted (below); a sequence's tokens so far all have theirs now.
            seq.num_computed_tokens += item.num_new_tokens - item.num_draft_tokens
            self.block_manager.cache_computed_blocks(seq)
            self.block_manager.release_out_of_window(seq)
        for seq, entries in result.prompt_logprobs.items():
            seq.request.prompt_logprobs += entries
        advanced: dict[str, Request] = {}
        for sample in result.samples:
            seq = sample.sequence
            if seq.finish_reason is not None:
                continue  # a stop among its accepted drafts ended it: the tokens after it are dropped
            request = seq.request
            request.first_token_time = request.first_token_time or now
            if sample.logprobs is not None:
                seq.logprobs.append(sample.logprobs)
            if sample.logprob is not None:
                seq.cumulative_logprob += sample.logprob
            append_token(seq, sample.token_id, self.tokenizer.eos_token_ids, self._max_seq_len)
            if self.structured_output.accept(seq, sample.token_id):
                finish_grammar(seq)
            self.generation_tokens += 1
            if seq.finish_reason is not None:
                self._finish(seq, free_blocks=not request.keep_kv)
                if request.keep_kv:
                    self.kept[request.request_id] = seq
            advanced[request.request_id] = request
        for verification in result.verifications:
            self._keep_accepted(verification)
        for item in scheduled.scheduled:
            if item.branches and item.sequence.finish_reason is None:
                item.sequence.num_computed_tokens += 1
                self.block_manager.cache_computed_blocks(item.sequence)
                self.block_manager.release_out_of_window(item.sequence)
        outputs = [make_request_output(request) for request in advanced.values()]
        for output in outputs:
            if output.finished:
                del self.requests[output.request_id]
        return self.searches.process(outputs)

    def _keep_accepted(self, verification: Verification) -> None:
        """The accepted drafts' K/V, written by this step, becomes the sequence's; blocks of rejected ones go back."""
        seq = verification.sequence
        assert self.speculator is not None
        self.speculator.verified(seq, verification.num_draft_tokens, verification.num_accepted)
        seq.draft_token_ids = []
        seq.draft_probs = None
        if seq.finish_reason is None:
            seq.num_computed_tokens += verification.num_accepted
            self.block_manager.free_rejected(seq)
            self.block_manager.cache_computed_blocks(seq)

    def _finish(self, seq: Sequence, free_blocks: bool = True) -> None:
        """Drop a finished or aborted sequence (its blocks freed unless kept); its speculation state is forgotten."""
        self.scheduler.finish(seq, free_blocks)
        if self.speculator is not None:
            self.speculator.finished(seq)

    def stats(self) -> EngineStats:
        prefix_cache = self.block_manager.prefix_cache
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.block_manager.usage,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            prefix_cache_queried_tokens=prefix_cache.queried_tokens if prefix_cache else 0,
            prefix_cache_hit_tokens=prefix_cache.hit_tokens if prefix_cache else 0,
            spec_decode=replace(self.speculator.stats) if self.speculator is not None else SpecDecodeStats(),
        )
