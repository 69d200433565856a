"""Suffix decoding: trie counts, adding and removing texts, matching, and the proposer's choices."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.spec_decode.suffix import SuffixProposer, SuffixTrie


def substring_counts(texts: list[list[int]], max_depth: int) -> Counter[tuple[int, ...]]:
    """Occurrences of every substring of at most max_depth tokens, by brute force."""
    counts: Counter[tuple[int, ...]] = Counter()
    for text in texts:
        for start in range(len(text)):
            for end in range(start + 1, min(len(text), start + max_depth) + 1):
                counts[tuple(text[start:end])] += 1
    return counts


def trie_counts(trie: SuffixTrie) -> Counter[tuple[int, ...]]:
    counts: Counter[tuple[int, ...]] = Counter()
    stack = [((), trie.root)]
    while stack:
        path, node = stack.pop()
        for token, child in node.children.items():
            counts[(*path, token)] = child.count
            stack.append(((*path, token), child))
    return counts


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), max_size=25), min_size=1, max_size=4), st.integers(2, 6), st.data())
def test_trie_counts_every_substring_and_removal_undoes_adding(texts, max_depth, data) -> None:
    trie = SuffixTrie(max_depth)
    for text in texts:
        trie.add(text)
    assert trie_counts(trie) == substring_counts(texts, max_depth)
    assert trie.num_nodes == 1 + len(substring_counts(texts, max_depth))
    removed = data.draw(st.sampled_from(range(len(texts))))
    trie.remove(texts[removed])
    rest = texts[:removed] + texts[removed + 1 :]
    assert trie_counts(trie) == substring_counts(rest, max_depth)
    assert trie.num_nodes == 1 + len(substring_counts(rest, max_depth))


def test_match_returns_the_context_suffixes_found_shortest_first() -> None:
    trie = SuffixTrie(8)
    trie.add([1, 2, 3, 4])
    nodes = trie.match([9, 2, 3], 8)
    assert [node.count for node in nodes] == [1, 1]  # "3" and "2 3" occur; "9 2 3" does not
    assert list(nodes[1].children) == [4]
    assert trie.match([5], 8) == []


def make_proposer(**overrides) -> SuffixProposer:
    settings = dict(max_depth=16, max_cached_requests=2, max_spec_factor=4.0, min_token_prob=0.1)
    return SuffixProposer(**{**settings, **overrides})


def test_proposes_the_continuation_of_the_sequences_own_text() -> None:
    proposer = make_proposer()
    # "10 11" was followed by "12 13 14 15" earlier in the prompt.
    assert proposer.propose("a", [10, 11, 12, 13, 14, 15, 7, 10, 11], 4) == [12, 13, 14, 15]


def test_speculation_length_grows_with_the_match_length() -> None:
    proposer = make_proposer(max_spec_factor=1.0)
    assert proposer.propose("a", [10, 11, 12, 13, 14, 15, 7, 10, 11], 8) == [12, 13]


def test_most_frequent_continuation_wins_and_unlikely_paths_stop() -> None:
    proposer = make_proposer(min_token_prob=0.5)
    # After "5": 6 twice and 8 once; after "5 6": 7 once then 9 once: the 1/2 branch keeps the path at 2/3 * 1/2.
    tokens = [5, 6, 7, 5, 6, 9, 5, 8, 5]
    assert proposer.propose("a", tokens, 4) == [6]


def test_finished_outputs_feed_other_sequences_and_the_oldest_is_evicted() -> None:
    proposer = make_proposer()
    proposer.propose("a", [1, 2], 4)
    proposer.finish("a", [20, 21, 22, 23, 24])
    assert "a" not in proposer.sequences
    assert proposer.propose("b", [3, 20, 21], 3) == [22, 23, 24]
    proposer.finish("b", [30, 31])
    proposer.finish("c", [40, 41])  # a third output: the first leaves the shared trie
    assert proposer.propose("d", [3, 20, 21], 3) == []
    assert proposer.propose("e", [40], 3) == [41]


def test_proposals_follow_tokens_appended_between_calls() -> None:
    proposer = make_proposer()
    tokens = [1, 2, 3, 4]
    assert proposer.propose("a", tokens, 3) == []
    tokens += [1, 2]
    assert proposer.propose("a", tokens, 3) == [3, 4, 1]
