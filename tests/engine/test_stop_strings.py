"""append_token: stop strings (with held-back text), stop token ids, EOS, min_tokens and length limits.

Sequences use the embedded model's real tokenizer and detokenizer. Token boundaries are controlled by encoding
each piece on its own. After every token the streamed text is text[:emitted_text_len]; a client only ever
sees those prefixes, so they must never contain a stop string and must only ever grow.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.engine.output import append_token, make_request_output
from pagedllm.engine.request import FinishReason, Request, Sequence
from pagedllm.model.registry import resolve_model_path
from pagedllm.model.tokenizer import IncrementalDetokenizer, Tokenizer
from pagedllm.sampling_params import SamplingParams

MAX_MODEL_LEN = 10_000


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_model_path(resolve_model_path(None))


def piece_ids(tok: Tokenizer, piece: str) -> list[int]:
    return tok.encode(piece, add_special_tokens=False)


def new_seq(tok: Tokenizer, params: SamplingParams, prompt: str = "Say something:") -> Sequence:
    ids = tok.encode(prompt)
    request = Request("r", prompt, ids, params)
    seq = Sequence(request, 0, None, IncrementalDetokenizer(tok, ids, params.skip_special_tokens))
    request.sequences.append(seq)
    return seq


def feed(tok: Tokenizer, seq: Sequence, tokens: list[int], max_model_len: int = MAX_MODEL_LEN) -> list[str]:
    """Append tokens until the sequence finishes; return the streamed text after each token."""
    streamed = []
    for token in tokens:
        append_token(seq, token, tok.eos_token_ids, max_model_len)
        streamed.append(seq.text[: seq.emitted_text_len])
        if seq.finish_reason is not None:
            break
    return streamed


def feed_pieces(tok: Tokenizer, seq: Sequence, pieces: list[str]) -> list[str]:
    return feed(tok, seq, [t for piece in pieces for t in piece_ids(tok, piece)])


def assert_stream_consistent(streamed: list[str], stops: list[str]) -> None:
    for before, after in zip(streamed, streamed[1:]):
        assert after.startswith(before), f"streamed text went back: {before!r} → {after!r}"
    for text in streamed:
        for stop in stops:
            assert stop not in text, f"{stop!r} was streamed in {text!r}"


def test_text_is_cut_before_the_stop_string(tok: Tokenizer) -> None:
    seq = new_seq(tok, SamplingParams(stop=["STOP"], max_tokens=50))
    streamed = feed_pieces(tok, seq, ["Hello", " world", " STOP", " after"])
    assert seq.finish_reason == FinishReason.STOP
    assert seq.stop_reason == "STOP"
    assert seq.text == "Hello world "
    assert streamed[-1] == "Hello world "
    assert len(seq.output_token_ids) == len(piece_ids(tok, "Hello")) + len(piece_ids(tok, " world")) + len(
        piece_ids(tok, " STOP")
    )
    assert_stream_consistent(streamed, ["STOP"])
    output = make_request_output(seq.request).outputs[0]
    assert output.text == "Hello world " and output.finish_reason == "stop" and output.stop_reason == "STOP"


def test_a_multi_token_stop_string_is_held_back_then_cut(tok: Tokenizer) -> None:
    seq = new_seq(tok, SamplingParams(stop=["lo wo"], max_tokens=50))
    tokens = piece_ids(tok, "Hel") + piece_ids(tok, "lo") + piece_ids(tok, " wo") + piece_ids(tok, "rld")
    assert len(tokens) == 6  # "Hel" "lo" " w" "o" "r" "ld"
    streamed = feed(tok, seq, tokens)
    # "Hel": "l" may start the stop; "Hello": "lo"; "Hello w": "lo w"; "Hello wo" completes it.
    assert streamed == ["He", "Hel", "Hel", "Hel"]
    assert seq.text == "Hel" and seq.finish_reason == FinishReason.STOP


def test_held_back_text_is_released_when_it_is_not_a_stop(tok: Tokenizer) -> None:
    seq = new_seq(tok, SamplingParams(stop=["abc"], max_tokens=50))
    streamed = feed_pieces(tok, seq, ["x", "a", "b", "d", "ab"])
    assert streamed == ["x", "x", "x", "xabd", "xabd"]
    assert seq.finish_reason is None
    assert seq.text == "xabdab"


def test_held_back_text_is_released_when_the_length_limit_ends_the_sequence(tok: Tokenizer) -> None:
    seq = new_seq(tok, SamplingParams(stop=["abc"], max_tokens=2))
    streamed = feed_pieces(tok, seq, ["x", "ab"])
    assert seq.finish_reason == FinishReason.LENGTH and seq.stop_reason is None
    assert streamed[-1] == "xab" == seq.text


def test_the_earliest_of_several_stops_wins(tok: Tokenizer) -> None:
    seq = new_seq(tok, SamplingParams(stop=["world", "lo"], max_tokens=50))
    feed_pieces(tok, seq, ["Hello world"])
    assert seq.text == "Hel" and seq.stop_reason == "lo"


def test_stop_token_ids_finish_with_the_id(tok: Tokenizer) -> None:
    stop_id = piece_ids(tok, "b")[0]
    seq = new_seq(tok, SamplingParams(stop_token_ids=[stop_id], max_tokens=50))
    tokens = piece_ids(tok, "a") + [stop_id] + piece_ids(tok, "c")
    feed(tok, seq, tokens)
    assert seq.finish_reason == FinishReason.STOP and seq.stop_reason == stop_id
    assert seq.output_token_ids == tokens[:2]


def test_eos_stops_unless_ignored(tok: Tokenizer) -> None:
    eos = next(iter(tok.eos_token_ids))
    tokens = piece_ids(tok, "Hi") + [eos] + piece_ids(tok, " there")
    seq = new_seq(tok, SamplingParams(max_tokens=50))
    streamed = feed(tok, seq, tokens)
    assert seq.finish_reason == FinishReason.STOP and seq.stop_reason is None
    assert seq.text == "Hi" and streamed[-1] == "Hi"  # the EOS token's own text is a special token: skipped

    seq = new_seq(tok, SamplingParams(max_tokens=len(tokens), ignore_eos=True))
    feed(tok, seq, tokens)
    assert seq.finish_reason == FinishReason.LENGTH
    assert seq.output_token_ids == tokens


def test_max_tokens_and_max_model_len_finish_with_length(tok: Tokenizer) -> None:
    tokens = piece_ids(tok, " one two three four five six")
    seq = new_seq(tok, SamplingParams(max_tokens=3))
    feed(tok, seq, tokens)
    assert seq.finish_reason == FinishReason.LENGTH and len(seq.output_token_ids) == 3

    seq = new_seq(tok, SamplingParams(max_tokens=50))
    feed(tok, seq, tokens, max_model_len=seq.prompt_len + 2)
    assert seq.finish_reason == FinishReason.LENGTH and len(seq.output_token_ids) == 2


def test_min_tokens_suppresses_eos_and_stop_token_ids(tok: Tokenizer) -> None:
    eos = next(iter(tok.eos_token_ids))
    stop_id = piece_ids(tok, "b")[0]
    a = piece_ids(tok, "a")[0]
    seq = new_seq(tok, SamplingParams(min_tokens=4, max_tokens=50, stop_token_ids=[stop_id]))
    feed(tok, seq, [a, eos, stop_id, a, eos, a])
    assert seq.finish_reason == FinishReason.STOP
    assert len(seq.output_token_ids) == 5  # the first EOS at or after the 4th token


def test_min_tokens_suppresses_a_stop_string(tok: Tokenizer) -> None:
    seq = new_seq(tok, SamplingParams(stop=["cd"], min_tokens=3, max_tokens=50))
    streamed = feed_pieces(tok, seq, ["cd", "x", "y", "cd", "z"])
    # "cd" in the first token is allowed (under min_tokens); the second one stops the sequence.
    assert seq.finish_reason == FinishReason.STOP
    assert seq.text == "cdxy"
    assert streamed[-1] == "cdxy"


def test_a_stop_string_suppressed_by_min_tokens_stays_suppressed(tok: Tokenizer) -> None:
    # Tokens "a", "a", "b" with stop "aa" and min_tokens=3: "aa" completes at token 2, under min_tokens, so it
    # must not stop the sequence later. What was streamed ("a" after token 2) must never be taken back.
    seq = new_seq(tok, SamplingParams(stop=["aa"], min_tokens=3, max_tokens=50))
    streamed = feed_pieces(tok, seq, ["a", "a", "b", "c"])
    assert_stream_consistent(streamed, [])
    assert seq.text.startswith(streamed[1])
    assert seq.finish_reason is None
    assert seq.text == "aabc"


# --- random streams ----------------------------------------------------------------------------------------------

PIECES = ["a", "b", "c", "ab", "ba", "abc", " ", "\n", "é", "你", "😀"]
STOP_ALPHABET = ["a", "b", "c", " ", "é", "你"]


def held_back_len(text: str, stops: list[str]) -> int:
    """Longest tail of text that is a proper prefix of some stop."""
    return max(
        (n for stop in stops for n in range(1, len(stop)) if len(text) >= n and text.endswith(stop[:n])), default=0
    )


@settings(max_examples=150, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(PIECES), max_size=14),
    stops=st.lists(
        st.lists(st.sampled_from(STOP_ALPHABET), min_size=1, max_size=4).map("".join), min_size=1, max_size=3
    ),
)
def test_random_streams_never_show_a_stop(tok: Tokenizer, pieces: list[str], stops: list[str]) -> None:
    seq = new_seq(tok, SamplingParams(stop=stops, max_tokens=100))
    tokens = [t for piece in pieces for t in piece_ids(tok, piece)]
    streamed = feed(tok, seq, tokens)
    assert_stream_consistent(streamed, stops)

    # Reference: decode the tokens one prefix at a time; the sequence must stop at the first token whose text
    # contains a stop, cut at the earliest occurrence.
    for count in range(1, len(tokens) + 1):
        text = tok.decode(tokens[:count])
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            at = min(hits)[0]
            assert seq.finish_reason == FinishReason.STOP
            assert len(seq.output_token_ids) == count
            assert seq.text == text[:at]
            assert seq.stop_reason in [s for s in stops if text.find(s) == at]
            assert streamed[-1] == text[:at]
            return
    assert seq.finish_reason is None
    full = tok.decode(tokens)
    assert seq.text == full
    assert seq.emitted_text_len == len(full) - held_back_len(full, stops)


@settings(max_examples=150, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(["a", "b", "ab", "ba", " "]), max_size=10),
    stops=st.lists(
        st.lists(st.sampled_from(["a", "b", " "]), min_size=1, max_size=3).map("".join), min_size=1, max_size=2
    ),
    min_tokens=st.integers(0, 6),
)
def test_random_streams_with_min_tokens_never_take_text_back(
    tok: Tokenizer, pieces: list[str], stops: list[str], min_tokens: int
) -> None:
    seq = new_seq(tok, SamplingParams(stop=stops, min_tokens=min_tokens, max_tokens=100))
    streamed = feed(tok, seq, [t for piece in pieces for t in piece_ids(tok, piece)])
    for before, after in zip(streamed, streamed[1:]):
        assert after.startswith(before), f"streamed text went back: {before!r} → {after!r}"
    if streamed:
        assert seq.text.startswith(streamed[-1])
