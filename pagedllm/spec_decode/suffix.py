"""Suffix decoding: drafts from how the sequence's latest tokens continued before, in its own text or in recent
outputs, following the most frequent continuation for as long as it stays likely.

Each text is indexed by a suffix trie cut at `max_depth`: a node is a substring of at most `max_depth` tokens and
counts its occurrences, so memory is bounded by `max_depth` nodes per token, and appending a token touches one node
per depth. The shared trie holds the outputs of the last `max_cached_requests` finished sequences; the oldest
output leaves it (its counts are subtracted) when a new one would exceed that.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


class _Node:
    __slots__ = ("count", "children")

    def __init__(self) -> None:
        self.count = 0
        self.children: dict[int, _Node] = {}


@dataclass
class Draft:
    """Proposed tokens and their score: the sum of each prefix's estimated probability (expected accepted length)."""

    token_ids: list[int] = field(default_factory=list)
    score: float = 0.0


class SuffixTrie:
    """Occurrence counts of every substring (of at most `max_depth` tokens) of the texts added to it."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.root = _Node()
        self.num_nodes = 1

    def add(self, tokens: Iterable[int]) -> None:
        """Count every substring of `tokens` (a whole text)."""
        cursor = self.cursor()
        for token in tokens:
            cursor.append(token)

    def remove(self, tokens: Sequence[int]) -> None:
        """Undo `add(tokens)`: subtract its counts, dropping substrings that no longer occur."""
        for start in range(len(tokens)):
            node = self.root
            for token in tokens[start : start + self.max_depth]:
                child = node.children[token]
                child.count -= 1
                if child.count == 0:
                    self.num_nodes -= _size(child)
                    del node.children[token]
                    break
                node = child

    def cursor(self) -> TrieCursor:
        """A writer that appends one text token by token."""
        return TrieCursor(self)

    def match(self, context: Sequence[int], max_len: int) -> list[_Node]:
        """Nodes of the context's suffixes found in the trie, shortest first (index i: the last i + 1 tokens)."""
        nodes: list[_Node] = []
        for length in range(1, min(max_len, len(context)) + 1):
            node: _Node | None = self.root
            for token in context[len(context) - length :]:
                node = node.children.get(token)
                if node is None:
                    break
            if node is None:
                break  # a substring's suffixes are substrings: no longer suffix can occur either
            nodes.append(node)
        return nodes


class TrieCursor:
    """Appends tokens to one text of a trie: keeps the nodes of the text's suffixes shorter than `max_depth`."""

    def __init__(self, trie: SuffixTrie) -> None:
        self.trie = trie
        self.suffix_nodes: list[_Node] = []  # index i: the node of the last i + 1 tokens

    def append(self, token: int) -> None:
        trie = self.trie
        extended: list[_Node] = []
        for node in [trie.root, *self.suffix_nodes]:
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _Node()
                trie.num_nodes += 1
            child.count += 1
            if len(extended) + 1 < trie.max_depth:
                extended.append(child)
        self.suffix_nodes = extended


def _size(node: _Node) -> int:
    return 1 + sum(_size(child) for child in node.children.values())


def best_draft(nodes: list[_Node], max_depth: int, num_tokens: int, max_spec_factor: float, min_prob: float) -> Draft:
    """The best path below any matched node (index i: a match of i + 1 tokens), by score."""
    best = Draft()
    for index, node in enumerate(nodes):
        match_len = index + 1
        budget = min(num_tokens, int(max_spec_factor * match_len), max_depth - match_len)
        draft = _follow(node, budget, min_prob)
        if draft.score > best.score:
            best = draft
    return best


def _follow(node: _Node, budget: int, min_prob: float) -> Draft:
    """Follow the most frequent continuation while the path's estimated probability stays >= min_prob."""
    draft = Draft()
    prob = 1.0
    while len(draft.token_ids) < budget and node.children:
        total = sum(child.count for child in node.children.values())
        token, child = max(node.children.items(), key=lambda item: item[1].count)
        prob *= child.count / total
        if prob < min_prob:
            break
        draft.token_ids.append(token)
        draft.score += prob
        node = child
    return draft


@dataclass
class _SequenceIndex:
    trie: SuffixTrie
    cursor: TrieCursor
    num_indexed: int = 0


class SuffixProposer:
    """Per-sequence tries over prompt + output, and one shared trie over recent finished outputs."""

    def __init__(self, max_depth: int, max_cached_requests: int, max_spec_factor: float, min_token_prob: float) -> None:
        self.max_depth = max_depth
        self.max_cached_requests = max_cached_requests
        self.max_spec_factor = max_spec_factor
        self.min_token_prob = min_token_prob
        self.shared = SuffixTrie(max_depth)
        self.cached_outputs: deque[list[int]] = deque()
        self.sequences: dict[object, _SequenceIndex] = {}

    def propose(self, key: object, token_ids: Sequence[int], num_tokens: int) -> list[int]:
        """Up to `num_tokens` drafts after `token_ids` (a sequence's verified prompt + output, which only grows)."""
        index = self.sequences.get(key)
        if index is None:
            trie = SuffixTrie(self.max_depth)
            index = self.sequences[key] = _SequenceIndex(trie, trie.cursor())
        for token in token_ids[index.num_indexed :]:
            index.cursor.append(token)
        index.num_indexed = len(token_ids)
        args = (self.max_depth, num_tokens, self.max_spec_factor, self.min_token_prob)
        own = best_draft(index.cursor.suffix_nodes, *args)
        shared = best_draft(self.shared.match(token_ids, self.max_depth - 1), *args)
        return (shared if shared.score > own.score else own).token_ids

    def finish(self, key: object, output_token_ids: Sequence[int]) -> None:
        """Forget a sequence's own trie; its output joins the shared trie, evicting the oldest beyond the limit."""
        self.sequences.pop(key, None)
        if self.max_cached_requests == 0 or not output_token_ids:
            return
        self.shared.add(output_token_ids)
        self.cached_outputs.append(list(output_token_ids))
        while len(self.cached_outputs) > self.max_cached_requests:
            self.shared.remove(self.cached_outputs.popleft())
