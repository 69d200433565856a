"""Beam search and best_of through the server's vLLM-style extra fields."""

from __future__ import annotations

import openai
import pytest

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name a color."}]


def test_beam_search_on_both_endpoints_is_deterministic_and_returns_n_beams(
    client: openai.OpenAI, model_name: str
) -> None:
    # temperature stays at its default of 1.0: only a beam search answers the same twice.
    beams = {"use_beam_search": True, "length_penalty": 0.8, "early_stopping": True}
    first, second = (
        client.completions.create(model=model_name, prompt=PROMPT, n=2, max_tokens=8, extra_body=beams)
        for _ in range(2)
    )
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.choices[0].text != first.choices[1].text
    wide_beams = {**beams, "best_of": 3}  # best_of is the beam width here
    chats = [
        client.chat.completions.create(model=model_name, messages=CHAT, n=2, max_tokens=8, extra_body=wide_beams)
        for _ in range(2)
    ]
    assert [[c.message.content for c in chat.choices] for chat in chats] == [
        [c.message.content for c in chats[0].choices]
    ] * 2
    assert len(chats[0].choices) == 2 and chats[0].choices[0].message.content != chats[0].choices[1].message.content


def test_best_of_returns_the_most_likely_of_the_seeded_samples(client: openai.OpenAI, model_name: str) -> None:
    options = dict(model=model_name, prompt=PROMPT, max_tokens=6, temperature=1.0, logprobs=0)
    extra = {"ignore_eos": True}
    best = client.completions.create(n=1, best_of=4, seed=5, extra_body=extra, **options).choices
    # Sample i of a request seeded s draws as a lone request seeded s + i.
    samples = [client.completions.create(seed=5 + i, extra_body=extra, **options).choices[0] for i in range(4)]
    totals = [sum(sample.logprobs.token_logprobs) for sample in samples]
    assert len(best) == 1
    assert best[0].text == samples[totals.index(max(totals))].text
    assert len({sample.text for sample in samples}) > 1


def test_beam_width_over_http_is_the_beam_width_as_in_python(client: openai.OpenAI, model_name: str) -> None:
    """`beam_width` names the width on both sides; over HTTP it equals `best_of` (vLLM's older name for it)."""
    options = dict(model=model_name, prompt=PROMPT, n=1, max_tokens=6)
    by_name = client.completions.create(**options, extra_body={"use_beam_search": True, "beam_width": 4})
    by_best_of = client.completions.create(**options, extra_body={"use_beam_search": True, "best_of": 4})
    narrow = {"use_beam_search": True, "beam_width": 1, "ignore_eos": True}
    assert by_name.choices[0].text == by_best_of.choices[0].text
    greedy = client.completions.create(**options, temperature=0.0, extra_body={"ignore_eos": True})
    # Without stop tokens a width of 1 keeps the single most likely token each step: greedy search.
    assert client.completions.create(**options, extra_body=narrow).choices[0].text == greedy.choices[0].text
    with pytest.raises(openai.BadRequestError, match="beam_width"):  # read, not ignored: it must be >= n
        client.completions.create(**{**options, "n": 2}, extra_body=narrow)
