"""The terminal chat client (`pagedllm chat --url`) against the real server: it streams the same reply."""

from __future__ import annotations

import openai
import pytest

from pagedllm.chat import RemoteChat
from pagedllm.errors import PagedLLMError
from pagedllm.sampling_params import SamplingParams

from .conftest import API_KEY, Server

MESSAGES = [{"role": "user", "content": "Name two fruits."}]


def test_remote_chat_streams_the_servers_reply(server: Server, client: openai.OpenAI, model_name: str) -> None:
    remote = RemoteChat(server.base_url, API_KEY)
    assert remote.model == model_name
    params = SamplingParams(temperature=0, max_tokens=10)
    deltas = list(remote.stream_reply(MESSAGES, params))
    whole = client.chat.completions.create(model=model_name, messages=MESSAGES, temperature=0, max_tokens=10)
    assert "".join(deltas) == whole.choices[0].message.content
    assert len([delta for delta in deltas if delta]) > 1


def test_remote_chat_reports_the_servers_error(server: Server) -> None:
    remote = RemoteChat(server.base_url, API_KEY)
    with pytest.raises(PagedLLMError, match="context"):
        list(remote.stream_reply(MESSAGES, SamplingParams(max_tokens=100_000)))
