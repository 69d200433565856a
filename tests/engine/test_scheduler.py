"""Scheduler + BlockManager driven by hand, the way the engine drives them, with no model.

Each step: schedule(); apply the block copies and "write" every scheduled token into a simulated KV cache at
the slots its block table gives; advance num_computed_tokens; append a fake token to every sequence whose item
completes (and to its forks); finish sequences that reach their target. After every step the simulated cache
must give each running sequence back exactly its own tokens, which catches bad sharing or copy-on-write.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from dataclasses import dataclass
from types import SimpleNamespace

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.request import Request, Sequence
from pagedllm.engine.scheduler import Scheduler, SchedulerOutput
from pagedllm.sampling_params import SamplingParams


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def stub_detokenizer() -> SimpleNamespace:
    # Only Sequence.spawn_sample reads these two attributes; it builds a real (lazy) detokenizer from them.
    return SimpleNamespace(tokenizer=None, skip_special_tokens=True)


def prompt_token(request_no: int, position: int) -> int:
    return 1_000_000 * (request_no + 1) + position


def output_token(seq: Sequence, position: int) -> int:
    # Distinct per sample, so samples that diverge after a fork hold distinguishable K/V.
    return 1_000_000 * (int(seq.request.request_id) + 1) + 10_000 * (seq.index + 1) + position


def make_request(request_no: int, prompt_len: int, max_tokens: int, n: int = 1) -> tuple[Request, Sequence]:
    params = SamplingParams(n=n, max_tokens=max_tokens)
    request = Request(str(request_no), None, [prompt_token(request_no, p) for p in range(prompt_len)], params)
    seq = Sequence(request, 0, None, stub_detokenizer(), pending_forks=n - 1)
    request.sequences.append(seq)
    return request, seq


@dataclass
class Harness:
    """Plays the engine's part: runs steps, simulates the cache, checks the scheduler's promises."""

    num_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_in_flight: int = 1  # batches in flight at once, as the engine's pipeline micro-batches

    def __post_init__(self) -> None:
        self.in_flight: deque[SchedulerOutput] = deque()
        self.bm = BlockManager(self.num_blocks, self.block_size)
        self.scheduler = Scheduler(self.bm, self.max_num_seqs, self.max_num_batched_tokens)
        self.cache: list[list[int | None]] = [[None] * self.block_size for _ in range(self.num_blocks)]
        self.requests: list[Request] = []
        self.finished: list[Sequence] = []

    def add(self, prompt_len: int, max_tokens: int, n: int = 1) -> Sequence:
        request, seq = make_request(len(self.requests), prompt_len, max_tokens, n)
        self.requests.append(request)
        self.scheduler.add(seq)
        return seq

    def step(self) -> SchedulerOutput:
        """One batch scheduled and its output applied."""
        out = self.schedule()
        self.apply(out)
        return out

    def step_in_flight(self) -> SchedulerOutput:
        """The engine's step with micro-batches: a batch of its share of the live sequences is scheduled while
        fewer than max_in_flight are in flight; the oldest is applied once they are that many, or nothing more
        could be scheduled. Returns the batch scheduled (empty when none was)."""
        out = SchedulerOutput()
        if len(self.in_flight) < self.max_in_flight:
            num_live = len(self.scheduler.running) + len(self.scheduler.waiting)
            out = self.schedule(ceil_div(num_live, self.max_in_flight))
            if out.scheduled:
                self.in_flight.append(out)
                if len(self.in_flight) < self.max_in_flight:
                    return out
        if self.in_flight:
            self.apply(self.in_flight.popleft())
        return out

    def schedule(self, max_batch_seqs: int | None = None) -> SchedulerOutput:
        """Schedule a batch, check the scheduler's promises, and write its tokens into the simulated cache (the
        ranks run batches in the order scheduled)."""
        sched = self.scheduler
        running_before = list(sched.running)
        busy = {id(item.sequence) for batch in self.in_flight for item in batch.scheduled}
        busy |= {id(child) for batch in self.in_flight for child in batch.forked}
        assert busy == {id(seq) for seq in sched.in_flight}
        idle_before = [seq for seq in running_before if id(seq) not in busy]
        out = sched.schedule(max_batch_seqs)

        # Budgets.
        assert out.num_tokens <= self.max_num_batched_tokens
        assert len(out.scheduled) <= self.max_num_seqs
        assert len(sched.running) <= self.max_num_seqs
        assert all(item.num_new_tokens >= 1 for item in out.scheduled)
        scheduled_seqs = [item.sequence for item in out.scheduled]
        assert len(set(map(id, scheduled_seqs))) == len(scheduled_seqs)
        for item in out.scheduled:
            assert item.num_new_tokens <= item.sequence.num_uncomputed_tokens

        # A sequence is in at most one batch in flight.
        assert not busy & {id(seq) for seq in scheduled_seqs}
        if max_batch_seqs is not None:
            assert len(out.scheduled) <= max_batch_seqs

        # Preemption takes the newest running sequences not in flight, newest first, and queues them at the front.
        k = len(out.preempted)
        assert out.preempted == idle_before[::-1][:k]
        assert list(sched.waiting)[:k] == out.preempted[::-1]
        for victim in out.preempted:
            assert victim.block_ids == [] and victim.num_computed_tokens == 0
            assert all(victim is not s for s in scheduled_seqs)

        # Queues are disjoint; waiting sequences hold nothing.
        assert not {id(s) for s in sched.running} & {id(s) for s in sched.waiting}
        for seq in sched.waiting:
            assert seq.block_ids == [] and seq.num_computed_tokens == 0
        assert all(any(s is r for r in sched.running) for s in scheduled_seqs)

        # Forks share the parent's blocks and are running.
        for item in out.scheduled:
            for child in item.forks:
                assert child.block_ids == item.sequence.block_ids
                assert child.num_computed_tokens == item.sequence.num_computed_tokens + item.num_new_tokens
                assert child.request is item.sequence.request
                assert any(child is r for r in sched.running)
        assert [c for item in out.scheduled for c in item.forks] == out.forked

        # The model runner: copies first, then every new token's K/V at its slot.
        for src, dst in out.block_copies:
            self.cache[dst] = list(self.cache[src])
        for item in out.scheduled:
            seq = item.sequence
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + item.num_new_tokens
            assert len(seq.block_ids) >= ceil_div(end, self.block_size)
            for position, token in zip(range(start, end), seq.token_ids(start, end)):
                slot = self.bm.slot(seq, position)
                self.cache[slot // self.block_size][slot % self.block_size] = token
        return out

    def apply(self, out: SchedulerOutput) -> None:
        """The output processor: the batch's tokens have K/V, completing sequences get their next token."""
        sched = self.scheduler
        sched.complete(out)
        completes = [item.completes for item in out.scheduled]
        for item in out.scheduled:
            item.sequence.num_computed_tokens += item.num_new_tokens
        for item, done in zip(out.scheduled, completes):
            if not done:
                continue
            for seq in (item.sequence, *item.forks):
                seq.output_token_ids.append(output_token(seq, seq.num_tokens))
                if len(seq.output_token_ids) >= seq.request.params.max_tokens:
                    self.finished.append(seq)
                    seq.finish_reason = "done"  # any non-None value marks it finished
                    sched.finish(seq)

        self.check_cache()

    def check_cache(self) -> None:
        refs = Counter(b for seq in self.scheduler.running for b in seq.block_ids)
        assert all(self.bm.allocator.ref_counts[b] == refs[b] for b in range(self.num_blocks))
        assert self.bm.num_free_blocks + len(refs) == self.num_blocks
        for seq in self.scheduler.running:
            # A sequence in flight holds the blocks of its batch's tokens too.
            if seq in self.scheduler.in_flight:
                assert len(seq.block_ids) >= ceil_div(seq.num_computed_tokens, self.block_size)
            else:
                assert len(seq.block_ids) == ceil_div(seq.num_computed_tokens, self.block_size)
            read = [
                self.cache[self.bm.slot(seq, p) // self.block_size][p % self.block_size]
                for p in range(seq.num_computed_tokens)
            ]
            assert read == seq.token_ids(0, seq.num_computed_tokens)

    def run_to_completion(self, max_steps: int) -> list[SchedulerOutput]:
        outs = []
        for _ in range(max_steps):
            if not self.scheduler.has_work():
                return outs
            out = self.step()
            assert out.scheduled, "work is queued but nothing was scheduled (deadlock)"
            outs.append(out)
        raise AssertionError(f"not done after {max_steps} steps")


# --- targeted cases ----------------------------------------------------------------------------------------


def test_chunked_prefill_splits_a_long_prompt_across_steps() -> None:
    h = Harness(num_blocks=16, block_size=4, max_num_seqs=4, max_num_batched_tokens=8)
    seq = h.add(prompt_len=25, max_tokens=3)
    sizes, completes = [], []
    for _ in range(4):
        out = h.step()
        assert len(out.scheduled) == 1
        sizes.append(out.scheduled[0].num_new_tokens)
        completes.append(len(seq.output_token_ids))
    assert sizes == [8, 8, 8, 1]
    assert completes == [0, 0, 0, 1]  # the first token is drawn only when the whole prompt is in the cache
    h.run_to_completion(10)
    assert len(seq.output_token_ids) == 3


def test_decodes_and_a_prefill_chunk_share_a_step() -> None:
    h = Harness(num_blocks=16, block_size=4, max_num_seqs=4, max_num_batched_tokens=8)
    a = h.add(prompt_len=3, max_tokens=5)
    b = h.add(prompt_len=20, max_tokens=2)
    out = h.step()
    assert [(i.sequence, i.num_new_tokens) for i in out.scheduled] == [(a, 3), (b, 5)]
    out = h.step()
    assert [(i.sequence, i.num_new_tokens) for i in out.scheduled] == [(a, 1), (b, 7)]
    out = h.step()
    assert [(i.sequence, i.num_new_tokens) for i in out.scheduled] == [(a, 1), (b, 7)]
    assert len(a.output_token_ids) == 3 and len(b.output_token_ids) == 0
    out = h.step()
    assert [(i.sequence, i.num_new_tokens) for i in out.scheduled] == [(a, 1), (b, 1)]
    assert len(b.output_token_ids) == 1


def test_max_num_seqs_limits_admission() -> None:
    h = Harness(num_blocks=64, block_size=4, max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [h.add(prompt_len=2, max_tokens=3) for _ in range(3)]
    out = h.step()
    assert [i.sequence for i in out.scheduled] == seqs[:2]
    assert list(h.scheduler.waiting) == [seqs[2]]
    h.run_to_completion(20)
    assert all(len(s.output_token_ids) == 3 for s in seqs)


def test_the_newest_running_sequence_is_preempted_and_recomputed() -> None:
    # 4 blocks of 2 tokens. Two 3-token prompts take 2 blocks each; at position 4 the older one needs a
    # third block, so the newer one is preempted.
    h = Harness(num_blocks=4, block_size=2, max_num_seqs=4, max_num_batched_tokens=16)
    a = h.add(prompt_len=3, max_tokens=4)
    b = h.add(prompt_len=3, max_tokens=4)
    out = h.step()
    assert [i.num_new_tokens for i in out.scheduled] == [3, 3] and h.bm.num_free_blocks == 0
    out = h.step()  # both decode position 3 in their second block
    assert out.preempted == []
    out = h.step()  # a decodes position 4: needs a new block
    assert out.preempted == [b]
    assert [i.sequence for i in out.scheduled] == [a]
    assert list(h.scheduler.waiting) == [b]
    assert b.num_computed_tokens == 0 and b.block_ids == []
    assert b.output_token_ids and len(b.output_token_ids) == 2  # its tokens are kept, only K/V is dropped
    h.run_to_completion(30)
    assert len(a.output_token_ids) == 4 and len(b.output_token_ids) == 4
    assert h.scheduler.num_preemptions >= 1
    assert h.bm.num_free_blocks == 4


def test_n_samples_fork_off_the_prompt_and_share_its_blocks() -> None:
    h = Harness(num_blocks=16, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    parent = h.add(prompt_len=5, max_tokens=3, n=3)
    other = h.add(prompt_len=2, max_tokens=2)
    out = h.step()
    # 3 slots are taken by the request's samples; the other request still fits (4 in all).
    assert [i.sequence for i in out.scheduled] == [parent, other]
    children = out.scheduled[0].forks
    assert [c.index for c in children] == [1, 2]
    assert parent.request.sequences == [parent, *children]
    assert parent.pending_forks == 0
    for block in parent.block_ids:
        assert h.bm.allocator.ref_counts[block] == 3
    assert all(len(c.output_token_ids) == 1 for c in (parent, *children))
    assert len(h.scheduler.running) == 4

    shared_partial = parent.block_ids[1]  # positions 4..7; position 5 is the next write
    out = h.step()
    assert {i.sequence for i in out.scheduled} == {parent, *children, other}
    # Two of the three samples copy the shared partial block; the last writer has it to itself.
    assert len(out.block_copies) == 2
    assert all(src == shared_partial for src, _ in out.block_copies)
    assert len({dst for _, dst in out.block_copies}) == 2
    h.run_to_completion(20)
    assert all(len(s.output_token_ids) == 3 for s in parent.request.sequences)
    assert h.bm.num_free_blocks == 16


def test_pending_forks_count_against_max_num_seqs() -> None:
    h = Harness(num_blocks=16, block_size=4, max_num_seqs=3, max_num_batched_tokens=64)
    parent = h.add(prompt_len=4, max_tokens=2, n=3)
    other = h.add(prompt_len=2, max_tokens=1)
    out = h.step()
    assert [i.sequence for i in out.scheduled] == [parent]
    assert list(h.scheduler.waiting) == [other]
    h.run_to_completion(20)
    assert len(other.output_token_ids) == 1


def test_a_batch_is_scheduled_from_the_sequences_not_in_flight() -> None:
    h = Harness(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_in_flight=2)
    seqs = [h.add(prompt_len=3, max_tokens=4) for _ in range(4)]
    first = h.step_in_flight()  # half of the live sequences, left in flight
    assert [i.sequence for i in first.scheduled] == seqs[:2] and list(h.in_flight) == [first]
    assert h.scheduler.in_flight == set(seqs[:2])
    second = h.step_in_flight()  # the other half; the queue is full, so the first batch comes back
    assert [i.sequence for i in second.scheduled] == seqs[2:] and list(h.in_flight) == [second]
    assert [len(s.output_token_ids) for s in seqs] == [1, 1, 0, 0]
    third = h.step_in_flight()  # the first half again, scheduled while the second was in flight
    assert [i.sequence for i in third.scheduled] == seqs[:2]
    assert [len(s.output_token_ids) for s in seqs] == [1, 1, 1, 1]
    assert list(h.in_flight) == [third] and h.scheduler.in_flight == set(seqs[:2])


def test_a_sequence_in_flight_is_never_preempted() -> None:
    # 4 blocks of 2 tokens: two 3-token prompts take 2 blocks each, each in a batch of its own.
    h = Harness(num_blocks=4, block_size=2, max_num_seqs=4, max_num_batched_tokens=16, max_in_flight=2)
    a = h.add(prompt_len=3, max_tokens=4)
    b = h.add(prompt_len=3, max_tokens=4)
    for expected in ([a], [b], [a], [b]):  # prompts, then both decode position 3 in their second block
        assert [i.sequence for i in h.step_in_flight().scheduled] == expected
    # a decodes position 4 and needs a block; b, the newest, is in flight: a waits for b's batch rather than
    # preempt b or itself, and b's batch comes back.
    out = h.step_in_flight()
    assert out.scheduled == [] and out.preempted == [] and not h.in_flight
    out = h.step_in_flight()  # nothing in flight now: b is preempted as without micro-batches
    assert out.preempted == [b] and [i.sequence for i in out.scheduled] == [a]
    while h.scheduler.has_work():
        h.step_in_flight()
    assert len(a.output_token_ids) == 4 and len(b.output_token_ids) == 4
    assert h.bm.num_free_blocks == 4


# --- random workloads ----------------------------------------------------------------------------------------


@st.composite
def workloads(draw: st.DrawFn) -> tuple[dict, list[tuple[int, int, int, int]]]:
    block_size = draw(st.sampled_from([1, 2, 3, 4]))
    num_blocks = draw(st.integers(2, 10))
    capacity = num_blocks * block_size
    max_num_seqs = draw(st.integers(1, 5))
    config = dict(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=draw(st.integers(1, 16)),
    )
    requests = []
    for _ in range(draw(st.integers(1, 6))):
        # As the engine guarantees: prompt + max_tokens fits the cache, and n fits max_num_seqs.
        prompt_len = draw(st.integers(1, capacity - 1))
        max_tokens = draw(st.integers(1, min(8, capacity - prompt_len)))
        n = draw(st.integers(1, min(3, max_num_seqs)))
        arrival = draw(st.integers(0, 6))
        requests.append((prompt_len, max_tokens, n, arrival))
    return config, requests


def run_workload(workload: tuple[dict, list[tuple[int, int, int, int]]], max_in_flight: int) -> None:
    """Play the requests, each arriving at its step, until every sequence has finished; with max_in_flight > 1
    as the engine's micro-batches."""
    config, requests = workload
    h = Harness(**config, max_in_flight=max_in_flight)
    pending = sorted(requests, key=lambda r: r[3])
    for step in itertools.count():
        while pending and pending[0][3] <= step:
            prompt_len, max_tokens, n, _ = pending.pop(0)
            h.add(prompt_len, max_tokens, n)
        if not pending and not h.scheduler.has_work():
            break
        assert step < 5000, "no progress"
        if h.scheduler.has_work():
            num_in_flight = len(h.in_flight)
            out = h.step() if max_in_flight == 1 else h.step_in_flight()
            assert out.scheduled or num_in_flight, "work is queued but nothing was scheduled (deadlock)"
            if out.preempted:
                event("preempted")
            if out.block_copies:
                event("copy-on-write")
            if out.forked:
                event("forked")
            if any(i.num_new_tokens > 1 for i in out.scheduled) and any(i.num_new_tokens == 1 for i in out.scheduled):
                event("mixed step")
            if out.scheduled and num_in_flight:
                event("scheduled beside a batch in flight")

    assert not h.in_flight
    for request, (prompt_len, max_tokens, n, _) in zip(h.requests, sorted(requests, key=lambda r: r[3])):
        assert len(request.prompt_token_ids) == prompt_len
        assert sorted(s.index for s in request.sequences) == list(range(n))
        for seq in request.sequences:
            assert len(seq.output_token_ids) == max_tokens
            assert seq.output_token_ids == [output_token(seq, prompt_len + i) for i in range(max_tokens)]
    assert len(h.finished) == sum(r[2] for r in requests)
    assert h.bm.num_free_blocks == config["num_blocks"]
    assert not h.scheduler.running and not h.scheduler.waiting and not h.scheduler.in_flight


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_finish_every_sequence(workload: tuple[dict, list[tuple[int, int, int, int]]]) -> None:
    run_workload(workload, max_in_flight=1)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.integers(2, 4))
def test_random_workloads_with_batches_in_flight_finish_every_sequence(
    workload: tuple[dict, list[tuple[int, int, int, int]]], max_in_flight: int
) -> None:
    """As pipeline micro-batches run them: a sequence is never in two batches in flight, one in flight is never
    preempted, and every sequence's cache holds its own tokens."""
    run_workload(workload, max_in_flight)
