"""What evaluation harnesses ask of /v1/completions beyond sampling: echo with prompt logprobs, max_tokens 0,
vLLM's prompt_logprobs, logit_bias; and GET /tokenizer_info and /v1/models/{id}."""

from __future__ import annotations

import httpx
import openai

from .conftest import Server

PROMPT = "The capital of France is Paris"


def test_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI, model_name: str) -> None:
    completion = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    choice = completion.choices[0]
    assert choice.text == PROMPT
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == PROMPT
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(value <= 0 for value in logprobs.token_logprobs[1:])
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)


def test_echo_with_generation_continues_the_prompt_logprobs(client: openai.OpenAI, model_name: str) -> None:
    plain = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=3, logprobs=0, temperature=0)
    echoed = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=3, echo=True, logprobs=0, temperature=0
    )
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    tail = echoed.choices[0].logprobs
    assert tail.tokens[-3:] == plain.choices[0].logprobs.tokens
    assert tail.text_offset[-3] == len(PROMPT)


def test_prompt_logprobs_extra_field(client: openai.OpenAI, model_name: str) -> None:
    completion = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=1, extra_body={"prompt_logprobs": 2}
    )
    entries = completion.model_extra["choices"][0]["prompt_logprobs"] if completion.model_extra else None
    entries = entries or completion.choices[0].model_extra["prompt_logprobs"]
    assert entries[0] is None and len(entries) == completion.usage.prompt_tokens
    assert all(2 <= len(entry) <= 3 for entry in entries[1:])


def test_logit_bias_forces_a_token(client: openai.OpenAI, model_name: str, server: Server) -> None:
    token = httpx.post(f"{server.base_url}/tokenize", json={"prompt": " banana"}, headers=server.auth).json()
    (banana,) = token["tokens"]
    completion = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=2, temperature=0, logit_bias={str(banana): 100}
    )
    assert completion.choices[0].text == " banana banana"


def test_tokenizer_info_and_model_card(server: Server, model_name: str) -> None:
    info = httpx.get(f"{server.base_url}/tokenizer_info", headers=server.auth).json()
    assert info["eos_token"] == "<|im_end|>" and info["vocab_size"] == 49152 and "im_start" in info["chat_template"]
    card = httpx.get(f"{server.base_url}/v1/models/{model_name}", headers=server.auth)
    assert card.status_code == 200 and card.json()["id"] == model_name
    missing = httpx.get(f"{server.base_url}/v1/models/nope", headers=server.auth)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
