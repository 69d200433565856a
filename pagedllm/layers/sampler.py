"""From the last logits of each sequence to its next token: penalties → temperature → top-k/top-p/min-p → draw."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SamplingBatch:
    """Per-row sampling settings of one step, as tensors of shape [rows] unless noted."""

    temperature: torch.Tensor
    top_k: torch.Tensor  # 0 disables
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    generators: list[torch.Generator | None]  # None: the engine-wide generator
    output_counts: torch.Tensor | None = None  # [rows, vocab] occurrences of each token in the output so far
    seen_mask: torch.Tensor | None = None  # [rows, vocab] token appears in prompt or output
    banned_mask: torch.Tensor | None = None  # [rows, vocab] tokens that may not be drawn (EOS before min_tokens)
    logit_bias: torch.Tensor | None = None  # [rows, vocab] added to the logits after the penalties
    allowed_bitmask: torch.Tensor | None = None  # [rows, ceil(vocab / 32)] int32: bit t % 32 of word t // 32 allows t
    num_logprobs: int = -1  # top logprobs to return per row; -1: none


@dataclass
class SamplerOutput:
    token_ids: list[int]
    token_logprobs: list[float] | None  # logprob of each drawn token
    top_ids: list[list[int]] | None
    top_logprobs: list[list[float]] | None


class Sampler:
    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: float32 [rows, vocab], as the model produced them."""
        raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.num_logprobs >= 0 else None
        target = process_logits(logits, batch)
        token_ids = first_max_index(target.logits)
        if target.random_rows:
            rows = torch.tensor(target.random_rows, device=logits.device)
            generators = [batch.generators[row] for row in target.random_rows]
            token_ids[rows] = self.draw(torch.softmax(target.logits[rows], dim=-1), generators)
        return with_logprobs(token_ids, raw_logprobs, batch.num_logprobs)

    def draw(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """Sample each row by the exponential race (argmax p/E, E ~ Exp(1)); seeded rows use their own generator."""
        noise = torch.empty_like(probs)
        shared_rows = [row for row, generator in enumerate(generators) if generator is None]
        if shared_rows:
            shared = torch.empty(len(shared_rows), probs.shape[1], device=probs.device)
            noise[shared_rows] = shared.exponential_(generator=self.generator)
        for row, generator in enumerate(generators):
            if generator is not None:
                noise[row].exponential_(generator=generator)
        return first_max_index(probs / noise)


@dataclass
class TargetLogits:
    """The logits each row's token is chosen from: greedy rows take the argmax, random rows sample the softmax."""

    logits: torch.Tensor  # [rows, vocab]
    random_rows: list[int]  # rows with temperature > 0: scaled by their temperature and truncated


def process_logits(logits: torch.Tensor, batch: SamplingBatch) -> TargetLogits:
    """Apply a batch's settings to raw logits: penalties, logit bias, banned and grammar-forbidden tokens, then
    temperature and top-k/top-p/min-p."""
    logits = apply_penalties(logits, batch)
    if batch.logit_bias is not None:
        logits = logits + batch.logit_bias
    if batch.banned_mask is not None:
        logits = logits.masked_fill(batch.banned_mask, float("-inf"))
    if batch.allowed_bitmask is not None:
        logits = apply_token_bitmask(logits, batch.allowed_bitmask)
    random_rows = [row for row, temperature in enumerate(batch.temperature.tolist()) if temperature > 0]
    if random_rows:
        rows = torch.tensor(random_rows, device=logits.device)
        scaled = logits[rows] / batch.temperature[rows].unsqueeze(1)
        scaled = apply_top_k_top_p_min_p(scaled, batch.top_k[rows], batch.top_p[rows], batch.min_p[rows])
        logits = logits.index_put((rows,), scaled)
    return TargetLogits(logits, random_rows)


def first_max_index(x: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (the first of equal maxima, or of NaNs)."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        # NumPy's argmax is one vectorized pass on the calling thread; PyTorch's CPU max over rows of the
        # vocabulary is several times slower (a verification's 6 rows: about 10x) and wakes its thread pool.
        return torch.from_numpy(x.numpy().argmax(axis=-1))
    return x.max(dim=-1).indices


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """-inf at every token whose bit is 0 (a grammar forbids it)."""
    forbidden = forbidden_tokens(bitmask, logits.shape[1])
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        # One single-threaded pass: torch would hand the comparison and the fill, each a vocabulary wide, to its
        # thread pool, whose wake-ups cost more than the work and stall on cores that other threads hold.
        return torch.from_numpy(np.where(forbidden, np.float32(-np.inf), logits.numpy()))
    return logits.masked_fill(torch.from_numpy(forbidden).to(logits.device), float("-inf"))


def forbidden_tokens(bitmask: torch.Tensor, vocab_size: int) -> np.ndarray:
    """[rows, vocab_size] bool: True where the host-side mask's bit is 0. Its little-endian int32 words are read as
    bytes, inverted and unpacked in one call (token t is bit t % 8 of byte t // 8); unpacked 0/1 bytes are bools."""
    inverted = np.invert(bitmask.numpy().view(np.uint8))
    return np.unpackbits(inverted, axis=1, count=vocab_size, bitorder="little").view(np.bool_)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition (prompt and output, divisive as in CTRL), presence and frequency (output only, subtractive)."""
    if batch.seen_mask is not None:
        penalty = batch.repetition_penalty.unsqueeze(1)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(batch.seen_mask, penalized, logits)
    if batch.output_counts is not None:
        counts = batch.output_counts
        logits = logits - batch.frequency_penalty.unsqueeze(1) * counts
        logits = logits - batch.presence_penalty.unsqueeze(1) * (counts > 0).to(logits.dtype)
    return logits


def apply_top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Mask (to -inf) every token outside each row's top-k, then its top-p nucleus, then below min_p × the top prob."""
    logits = _apply_top_k_top_p(logits, top_k, top_p)
    if bool((min_p > 0).any()):
        probs = torch.softmax(logits, dim=-1)
        threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    vocab = logits.shape[-1]
    use_top_k = bool(((top_k > 0) & (top_k < vocab)).any())
    use_top_p = bool((top_p < 1).any())
    if not (use_top_k or use_top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
    drop = ranks >= k
    if use_top_p:
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # Rounding can make the cumulative mass reach 1.0 early: rows without top-p keep their whole tail.
        drop |= (mass_before >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
    drop[:, 0] = False
    return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))


def with_logprobs(token_ids: torch.Tensor, raw_logprobs: torch.Tensor | None, num_logprobs: int) -> SamplerOutput:
    """The drawn tokens, with their raw logprobs and each row's top `num_logprobs` when asked (>= 0)."""
    ids = token_ids.tolist()
    if raw_logprobs is None:
        return SamplerOutput(ids, None, None, None)
    token_logprobs = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1).tolist()
    top_values, top_ids = raw_logprobs.topk(num_logprobs, dim=-1) if num_logprobs > 0 else (None, None)
    return SamplerOutput(
        ids,
        token_logprobs,
        top_ids.tolist() if top_ids is not None else [[] for _ in ids],
        top_values.tolist() if top_values is not None else [[] for _ in ids],
    )
