"""The server through the official openai client: completions and chat, whole and streamed, and their options."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from pagedllm import LLM, SamplingParams

from .conftest import Server

PROMPT = "The capital of France is"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}]
MAX_TOKENS = 8


def test_models_lists_the_served_model(client: openai.OpenAI, model_name: str) -> None:
    models = client.models.list().data
    assert [model.id for model in models] == [model_name]
    assert models[0].owned_by == "pagedllm"


def test_completion_shape_and_usage(client: openai.OpenAI, model_name: str) -> None:
    completion = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert completion.id.startswith("cmpl-")
    assert completion.object == "text_completion"
    assert completion.model == model_name
    assert completion.system_fingerprint
    assert completion.created > 0
    (choice,) = completion.choices
    assert choice.text
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens == 5
    assert 0 < completion.usage.completion_tokens <= MAX_TOKENS
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_greedy_completion_equals_offline_generate(client: openai.OpenAI, model_name: str, llm: LLM) -> None:
    (offline,) = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12))
    completion = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=12, temperature=0)
    assert completion.choices[0].text == offline.outputs[0].text
    assert completion.choices[0].finish_reason == offline.outputs[0].finish_reason


def test_greedy_chat_equals_offline_chat(client: openai.OpenAI, model_name: str, llm: LLM) -> None:
    (offline,) = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=12))
    chat = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == offline.outputs[0].text
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(offline.prompt_token_ids)


def test_streamed_completion_equals_whole_one(client: openai.OpenAI, model_name: str) -> None:
    whole = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    chunks = list(
        client.completions.create(
            model=model_name,
            prompt=PROMPT,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert text == whole.choices[0].text
    assert [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert len({chunk.id for chunk in chunks}) == 1


def test_streamed_chat_with_usage(client: openai.OpenAI, model_name: str) -> None:
    whole = client.chat.completions.create(
        model=model_name, messages=CHAT, max_completion_tokens=MAX_TOKENS, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=model_name,
            messages=CHAT,
            max_completion_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].object == "chat.completion.chunk"
    text = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_without_include_usage_has_no_usage(client: openai.OpenAI, model_name: str) -> None:
    chunks = list(client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=3, stream=True))
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason is not None


def test_n_samples_per_prompt_and_several_prompts(client: openai.OpenAI, model_name: str, llm: LLM) -> None:
    prompts = [PROMPT, "Hello, my name is"]
    completion = client.completions.create(
        model=model_name, prompt=prompts, n=2, max_tokens=6, temperature=0.8, seed=7, extra_body={"ignore_eos": True}
    )
    assert sorted(choice.index for choice in completion.choices) == [0, 1, 2, 3]
    assert all(choice.text for choice in completion.choices)
    assert completion.usage.prompt_tokens == sum(len(llm.tokenizer.encode(p)) for p in prompts)
    assert completion.usage.completion_tokens == 4 * 6
    chat = client.chat.completions.create(model=model_name, messages=CHAT, n=2, max_tokens=6, temperature=0.8, seed=7)
    assert [choice.index for choice in chat.choices] == [0, 1]
    assert 2 <= chat.usage.completion_tokens <= 12


def test_streamed_n_samples_each_finish_once(client: openai.OpenAI, model_name: str) -> None:
    chunks = list(
        client.chat.completions.create(model=model_name, messages=CHAT, n=2, max_tokens=5, temperature=1.0, stream=True)
    )
    finishes = [choice.index for chunk in chunks for choice in chunk.choices if choice.finish_reason]
    assert sorted(finishes) == [0, 1]


def test_token_id_prompts(client: openai.OpenAI, model_name: str, llm: LLM) -> None:
    ids = llm.tokenizer.encode(PROMPT)
    by_ids = client.completions.create(model=model_name, prompt=ids, max_tokens=MAX_TOKENS, temperature=0)
    by_text = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    several = client.completions.create(model=model_name, prompt=[ids, ids[:3]], max_tokens=2, temperature=0)
    assert len(several.choices) == 2


def test_same_seed_same_text_and_other_seed_differs(client: openai.OpenAI, model_name: str) -> None:
    def sample(seed: int) -> str:
        completion = client.completions.create(
            model=model_name, prompt="Write a word:", max_tokens=12, temperature=1.2, seed=seed
        )
        return completion.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_stop_strings_cut_the_text(client: openai.OpenAI, model_name: str) -> None:
    free = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = free.strip().split()[1]
    stopped = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop"
    assert stop not in choice.text
    assert free.startswith(choice.text)


def test_completion_logprobs(client: openai.OpenAI, model_name: str) -> None:
    completion = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    choice = completion.choices[0]
    logprobs = choice.logprobs
    assert logprobs is not None
    assert "".join(logprobs.tokens) == choice.text
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == len(logprobs.top_logprobs) == 5
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(5)]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert logprob <= 0
        assert 3 <= len(top) <= 4
        assert top[token] == logprob
        assert max(top.values()) == logprob  # greedy draws the most likely token


def test_chat_logprobs(client: openai.OpenAI, model_name: str) -> None:
    chat = client.chat.completions.create(
        model=model_name, messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert "".join(entry.token for entry in content) == chat.choices[0].message.content
    for entry in content:
        assert bytes(entry.bytes).decode() == entry.token
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_streamed_chat_logprobs_match_whole(client: openai.OpenAI, model_name: str) -> None:
    kwargs = dict(model=model_name, messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=1)
    whole = client.chat.completions.create(**kwargs)
    streamed = [
        entry.token
        for chunk in client.chat.completions.create(**kwargs, stream=True)
        for choice in chunk.choices
        if choice.logprobs
        for entry in choice.logprobs.content
    ]
    assert streamed == [entry.token for entry in whole.choices[0].logprobs.content]


def test_ignore_eos_generates_max_tokens(client: openai.OpenAI, model_name: str) -> None:
    chat = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "Say ok."}],
        max_tokens=24,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert chat.usage.completion_tokens == 24
    assert chat.choices[0].finish_reason == "length"


def test_text_content_parts_and_user_field(client: openai.OpenAI, model_name: str) -> None:
    as_string = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=4, temperature=0)
    parts = [CHAT[0], {"role": "user", "content": [{"type": "text", "text": CHAT[1]["content"]}]}]
    as_parts = client.chat.completions.create(model=model_name, messages=parts, max_tokens=4, temperature=0, user="u-1")
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content


def test_chat_default_max_tokens_is_the_rest_of_the_context(server: Server, model_name: str) -> None:
    body = {"model": model_name, "messages": CHAT, "temperature": 0, "stop": [" ", "\n", ",", "."]}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=server.auth, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "stop"


def test_tokenize_and_detokenize(server: Server, llm: LLM) -> None:
    tokens = httpx.post(f"{server.base_url}/tokenize", json={"prompt": PROMPT}, headers=server.auth, timeout=10).json()
    assert tokens["tokens"] == llm.tokenizer.encode(PROMPT)
    assert tokens["count"] == len(tokens["tokens"])
    chat_tokens = httpx.post(
        f"{server.base_url}/tokenize", json={"messages": CHAT}, headers=server.auth, timeout=10
    ).json()
    assert chat_tokens["tokens"] == llm.tokenizer.encode_chat(CHAT)
    text = httpx.post(
        f"{server.base_url}/detokenize", json={"tokens": tokens["tokens"]}, headers=server.auth, timeout=10
    )
    assert text.json()["prompt"] == PROMPT


@pytest.mark.parametrize("path", ["/health", "/version"])
def test_open_endpoints(server: Server, path: str) -> None:
    response = httpx.get(f"{server.base_url}{path}", timeout=10)
    assert response.status_code == 200
    assert response.json()


def test_second_chat_turn_computes_only_the_new_turn(client: openai.OpenAI, model_name: str) -> None:
    messages = [
        {"role": "system", "content": "You are a terse assistant who answers with a single word. " * 8},
        {"role": "user", "content": "Name a planet."},
    ]
    first = client.chat.completions.create(model=model_name, messages=messages, max_tokens=8, temperature=0)
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And a star?"},
    ]
    second = client.chat.completions.create(model=model_name, messages=messages, max_tokens=8, temperature=0)
    block_size = 16
    new_turn_tokens = second.usage.prompt_tokens - first.usage.prompt_tokens
    computed = second.usage.prompt_tokens - second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens > 4 * block_size
    assert computed < new_turn_tokens + block_size
