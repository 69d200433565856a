"""Structured outputs and tool calls through the live server, with the openai SDK and the frameworks users run
on top of it (langchain-openai, instructor, openai-agents)."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from .conftest import API_KEY, Server

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class City(BaseModel):
    name: str = Field(max_length=20)
    population: int = Field(ge=0, le=50_000_000)


def assert_valid_call(call, tools: list[dict]) -> None:
    (tool,) = [t for t in tools if t["function"]["name"] == call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    assert call.id.startswith("call_") and call.type == "function"


def test_parse_with_a_pydantic_model(client: openai.OpenAI, model_name: str) -> None:
    completion = client.chat.completions.parse(
        model=model_name,
        messages=[{"role": "user", "content": "Name a big city."}],
        response_format=City,
        max_tokens=60,
        temperature=0.7,
        seed=3,
    )
    choice = completion.choices[0]
    assert isinstance(choice.message.parsed, City), choice.message.content
    assert choice.finish_reason == "stop"


def test_json_object_response_format(client: openai.OpenAI, model_name: str) -> None:
    completion = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "Describe a cat in JSON."}],
        response_format={"type": "json_object"},
        max_tokens=80,
        extra_body={"structured_outputs": None},
    )
    text = completion.choices[0].message.content
    if completion.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")


@pytest.mark.parametrize(
    ("constraint", "check"),
    [
        ({"choice": ["alpha", "beta", "gamma"]}, lambda text: text in ("alpha", "beta", "gamma")),
        ({"regex": "[0-9]{3}-[a-z]{2}"}, lambda text: len(text) == 6 and text[3] == "-" and text[:3].isdigit()),
        ({"grammar": 'start: "(" NUMBER ")"\nNUMBER: /[1-9][0-9]?/'}, lambda text: text.startswith("(")),
        ({"grammar": 'root ::= "yes" | "no"'}, lambda text: text in ("yes", "no")),
        ({"json": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}}, lambda text: json.loads(text)),
    ],
    ids=["choice", "regex", "lark", "gbnf", "json"],
)
def test_structured_outputs_on_completions(
    client: openai.OpenAI, model_name: str, constraint: dict, check: Callable[[str], object]
) -> None:
    completion = client.completions.create(
        model=model_name, prompt="Answer:", max_tokens=24, extra_body={"structured_outputs": constraint}
    )
    text = completion.choices[0].text
    assert completion.choices[0].finish_reason == "stop", text
    assert check(text), text


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_choice_gives_valid_calls(client: openai.OpenAI, model_name: str, parallel: bool) -> None:
    tools = [WEATHER_TOOL, TIME_TOOL]
    completion = client.chat.completions.create(
        model=model_name,
        messages=ASK,
        tools=tools,
        tool_choice="required",
        parallel_tool_calls=parallel,
        max_tokens=120,
        temperature=0.7,
        seed=1,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and (parallel or len(choice.message.tool_calls) == 1)
    for call in choice.message.tool_calls:
        assert_valid_call(call, tools)


def test_named_tool_choice_calls_that_function(client: openai.OpenAI, model_name: str) -> None:
    completion = client.chat.completions.create(
        model=model_name,
        messages=ASK,
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=60,
    )
    (call,) = completion.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    assert_valid_call(call, [TIME_TOOL])


def test_tool_choice_none_answers_in_text(client: openai.OpenAI, model_name: str) -> None:
    completion = client.chat.completions.create(
        model=model_name, messages=ASK, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=8
    )
    assert completion.choices[0].message.content and not completion.choices[0].message.tool_calls


def sse_chunks(server: Server, body: dict) -> list[dict]:
    """The chunks of a streamed chat completion as the server sent them."""
    with httpx.stream(
        "POST",
        f"{server.base_url}/v1/chat/completions",
        json={**body, "stream": True},
        headers=server.auth,
        timeout=120,
    ) as response:
        assert response.status_code == 200, response.read()
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_streamed_call_arguments_arrive_in_fragments(server: Server, client: openai.OpenAI, model_name: str) -> None:
    body = {
        "model": model_name,
        "messages": ASK,
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
        "parallel_tool_calls": False,  # one call, then the grammar ends the reply
        "max_tokens": 60,
        "temperature": 0,  # the streamed and the whole call are the same draw
    }
    chunks = sse_chunks(server, body)
    deltas = [choice["delta"] for chunk in chunks for choice in chunk["choices"]]
    pieces = [call for delta in deltas for call in delta.get("tool_calls") or []]
    first, *rest = pieces
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"]["name"] == "get_weather"
    # Later pieces carry only more arguments: nothing a client would merge over the first piece's fields.
    assert len(rest) >= 3 and all(piece.keys() == {"index", "function"} for piece in rest)
    assert all(piece["function"].keys() == {"arguments"} for piece in rest)
    arguments = "".join(piece["function"]["arguments"] for piece in pieces)
    whole = client.chat.completions.create(**body).choices[0].message.tool_calls[0]
    assert json.loads(arguments) == json.loads(whole.function.arguments)
    jsonschema.validate(json.loads(arguments), WEATHER_TOOL["function"]["parameters"])
    assert all(delta.get("content") in (None, "") for delta in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_openai_stream_accumulates_the_call(client: openai.OpenAI, model_name: str) -> None:
    tools = [WEATHER_TOOL, TIME_TOOL]
    with client.chat.completions.stream(
        model=model_name,
        messages=ASK,
        tools=tools,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=120,
        temperature=0.7,
        seed=1,
    ) as stream:
        events = list(stream)
        completion = stream.get_final_completion()
    fragments = [event for event in events if event.type == "tool_calls.function.arguments.delta"]
    assert len(fragments) >= 3
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    for call in choice.message.tool_calls:
        assert_valid_call(call, tools)


def test_a_reply_without_calls_has_null_tool_calls(server: Server, model_name: str) -> None:
    body = {"model": model_name, "messages": ASK, "tools": [WEATHER_TOOL], "tool_choice": "none", "max_tokens": 4}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=server.auth, timeout=120)
    assert response.json()["choices"][0]["message"]["tool_calls"] is None


def test_tool_results_in_the_history_are_accepted(client: openai.OpenAI, model_name: str) -> None:
    arguments = json.dumps({"city": "Paris", "unit": "celsius"})
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    completion = client.chat.completions.create(
        model=model_name, messages=messages, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=8
    )
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens > 60  # the tools, the call and its result are in the prompt


def test_langchain_structured_output_and_bind_tools(server: Server, model_name: str) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model=model_name, base_url=f"{server.base_url}/v1", api_key=API_KEY, max_tokens=60, max_retries=0)
    city = chat.with_structured_output(City, method="json_schema").invoke("Name a big city.")
    assert isinstance(city, City)

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return f"sunny in {city}"

    message = chat.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)


# Mode.JSON (json_object plus the schema in the prompt) leaves following the schema to the model, which a 135M model
# does not; JSON_SCHEMA sends the schema as response_format, which the grammar enforces.
@pytest.mark.parametrize("mode", ["JSON_SCHEMA", "TOOLS"])
def test_instructor_modes(server: Server, model_name: str, mode: str) -> None:
    import instructor

    client = instructor.from_openai(
        openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0),
        mode=getattr(instructor.Mode, mode),
    )
    city = client.chat.completions.create(
        model=model_name,
        response_model=City,
        messages=[{"role": "user", "content": "Name a big city."}],
        max_tokens=60,
        max_retries=0,
    )
    assert isinstance(city, City)


def test_openai_agents_agent_calls_a_tool(server: Server, model_name: str) -> None:
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, RunConfig, Runner, function_tool

    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return "sunny, 21 degrees"

    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)
    agent = Agent(
        name="weather",
        instructions="Answer weather questions with the get_weather tool.",
        tools=[get_weather],
        model=OpenAIChatCompletionsModel(model=model_name, openai_client=client),
        # The first turn must call the tool; the agent resets the choice to auto after it, so the second answers.
        model_settings=ModelSettings(tool_choice="required", max_tokens=40, temperature=0),
    )
    result = Runner.run_sync(agent, "What is the weather in Paris?", run_config=RunConfig(tracing_disabled=True))
    assert len(calls) == 1
    assert isinstance(result.final_output, str) and result.final_output
