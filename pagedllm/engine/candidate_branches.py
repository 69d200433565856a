"""One-token branches of a sequence, scored side by side in one step (contrastive search's candidates).

Branch i computes the candidate at the sequence's next position p over the sequence's K/V. Its block table is the
sequence's up to p's block, then a scratch block of its own holding a copy of that block's earlier positions; its
K/V goes to that scratch block, so the branches never see each other. After the step, the chosen branch's scratch
block takes the place of the sequence's block of p (which holds no K/V past p's and is not yet in the prefix cache,
p being its first uncomputed position), and the other scratch blocks go back to the pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.request import Sequence


@dataclass
class CandidateBranch:
    """A branch's block tables (it satisfies HasBlocks): the sequence's, with p's block replaced by a scratch one."""

    block_ids: list[int]
    group_block_ids: list[list[int]]
    num_computed_tokens: int
    num_evicted_tokens: int = 0
    scratch_blocks: list[int] = field(default_factory=list)  # per KV-cache group


def num_scratch_blocks(block_manager: BlockManager, num_branches: int) -> int:
    """Blocks a sequence's branches hold during their step."""
    return num_branches * len(block_manager.sliding_windows)


def branch_out(
    block_manager: BlockManager, seq: Sequence, num_branches: int
) -> tuple[list[CandidateBranch], list[tuple[int, int]]]:
    """Branches at the sequence's next position (its slots already allocated), and the block copies that fill them."""
    position = seq.num_computed_tokens
    index = position // block_manager.block_size
    tables = block_manager.tables(seq)
    branches, copies = [], []
    for _ in range(num_branches):
        scratch = [block_manager.allocate_block() for _ in tables]
        branch_tables = [table[:index] + [block] for table, block in zip(tables, scratch)]
        branches.append(CandidateBranch(branch_tables[0], branch_tables[1:], position, 0, scratch))
        if position % block_manager.block_size:
            copies += [(table[index], block) for table, block in zip(tables, scratch)]
    return branches, copies


def keep_branch(block_manager: BlockManager, seq: Sequence, branch: CandidateBranch) -> None:
    """Make a branch's blocks the sequence's own at p's index; the blocks they replace go back to the pool."""
    index = seq.num_computed_tokens // block_manager.block_size
    for table, block in zip(block_manager.tables(seq), branch.scratch_blocks):
        block_manager.allocator.release(table[index])
        table[index] = block
    branch.scratch_blocks = []


def release_branches(block_manager: BlockManager, branches: list[CandidateBranch]) -> None:
    """Return the scratch blocks no branch kept."""
    for branch in branches:
        for block in branch.scratch_blocks:
            block_manager.allocator.release(block)
