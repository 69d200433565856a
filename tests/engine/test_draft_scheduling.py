"""Drafts in the scheduler and block manager: counted in the token budget, cut to fit it, dropped on preemption;
blocks that held only rejected drafts go back to the free list."""

from __future__ import annotations

from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.scheduler import Scheduler
from tests.engine.test_scheduler import make_request


def decoding(scheduler: Scheduler, prompt_len: int, request_no: int = 0):
    """A sequence whose prompt is computed and whose first output token waits for the next step."""
    _, seq = make_request(request_no, prompt_len, max_tokens=50)
    scheduler.add(seq)
    scheduler.complete(scheduler.schedule())
    seq.num_computed_tokens = prompt_len
    seq.output_token_ids.append(7)
    return seq


def test_drafts_count_in_the_budget_and_are_cut_to_fit() -> None:
    scheduler = Scheduler(BlockManager(32, 4), max_num_seqs=8, max_num_batched_tokens=64)
    seq = decoding(scheduler, prompt_len=6)
    seq.draft_token_ids = [1, 2, 3]
    out = scheduler.schedule()
    item = out.scheduled[0]
    assert (item.num_new_tokens, item.num_draft_tokens, item.completes) == (4, 3, True)
    assert len(seq.block_ids) == 3  # 6 computed + 4 new tokens in blocks of 4

    scheduler.complete(out)  # its batch is back (its tokens left uncomputed: the same step is scheduled again)
    scheduler.max_num_batched_tokens = 3
    seq.draft_token_ids = [1, 2, 3]
    item = scheduler.schedule().scheduled[0]
    assert (item.num_new_tokens, item.num_draft_tokens) == (3, 2)
    assert seq.draft_token_ids == [1, 2]


def test_preemption_drops_the_drafts() -> None:
    manager = BlockManager(4, 4)
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=64)
    old = decoding(scheduler, prompt_len=7, request_no=0)
    new = decoding(scheduler, prompt_len=7, request_no=1)
    new.draft_token_ids = [1, 2]
    old.draft_token_ids = [3, 4, 5]  # 8 computed + 4 new: a third block, taken from the newest sequence
    out = scheduler.schedule()
    assert out.preempted == [new] and new.draft_token_ids == []
    assert out.scheduled[0].num_draft_tokens == 3


def test_blocks_of_rejected_drafts_are_released() -> None:
    manager = BlockManager(8, 4)
    _, seq = make_request(0, 6, max_tokens=50)
    manager.allocate_slots(seq, 6)
    seq.num_computed_tokens = 6
    manager.allocate_slots(seq, 1 + 5)  # the last token and five drafts: positions 6..11, three blocks in all
    assert len(seq.block_ids) == 3 and manager.num_free_blocks == 5
    seq.num_computed_tokens = 6 + 1 + 1  # one draft accepted
    manager.free_rejected(seq)
    assert len(seq.block_ids) == 2 and manager.num_free_blocks == 6
