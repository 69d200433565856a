"""Contrastive search and DoLa through the server's extra fields: the offline engine's tokens, and 400s with an
OpenAI error body for the combinations that are refused."""

from __future__ import annotations

import httpx
import openai
import pytest

from pagedllm import LLM, SamplingParams
from tests.serving.conftest import Server

PROMPT = "The best way to learn a language is"
CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.mark.parametrize(
    "extra", [{"penalty_alpha": 0.6, "top_k": 4}, {"dola_layers": "high", "repetition_penalty": 1.2}]
)
def test_completions_give_the_offline_engines_tokens(
    client: openai.OpenAI, model_name: str, llm: LLM, extra: dict
) -> None:
    body = {**extra, "ignore_eos": True}
    response = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=8, temperature=0, extra_body=body)
    offline = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, **extra))
    assert response.choices[0].text == offline[0].outputs[0].text


def test_chat_takes_both_fields(client: openai.OpenAI, model_name: str) -> None:
    for extra in ({"penalty_alpha": 0.6, "top_k": 4}, {"dola_layers": [2, 4, 6]}):
        first, second = (
            client.chat.completions.create(
                model=model_name, messages=CHAT, max_tokens=6, temperature=0, extra_body=extra
            )
            for _ in range(2)
        )
        assert (
            first.choices[0].message.content and first.choices[0].message.content == second.choices[0].message.content
        )


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"penalty_alpha": 0.6}, "top_k"),
        ({"penalty_alpha": 0.6, "top_k": 4, "n": 2}, "n"),
        ({"penalty_alpha": 0.6, "top_k": 4, "use_beam_search": True}, "use_beam_search"),
        ({"penalty_alpha": 0.6, "top_k": 4, "dola_layers": "low"}, "dola_layers"),
        ({"penalty_alpha": 2.0, "top_k": 4}, "penalty_alpha"),
        ({"dola_layers": "middle"}, "dola_layers"),
        ({"dola_layers": [3, 30]}, "dola_layers"),  # the model has 30 layers
    ],
)
def test_bad_combinations_get_an_openai_error(server: Server, model_name: str, extra: dict, param: str) -> None:
    body = {"model": model_name, "prompt": PROMPT, "max_tokens": 4, **extra}
    response = httpx.post(f"{server.base_url}/v1/completions", json=body, headers=server.auth, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    # The engine keeps serving.
    ok = httpx.post(
        f"{server.base_url}/v1/completions",
        json={"model": model_name, "prompt": PROMPT, "max_tokens": 2},
        headers=server.auth,
        timeout=60,
    )
    assert ok.status_code == 200
