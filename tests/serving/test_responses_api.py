"""/v1/responses through the openai SDK's `responses.create` (whole and streamed, text.format json_schema,
function tools) and openai-agents' default (Responses) model calling one tool."""

from __future__ import annotations

import json

import jsonschema
import openai

from pagedllm.serving.protocol import DeltaFunctionCall, DeltaToolCall
from pagedllm.serving.responses import ResponseEvents

from .conftest import API_KEY, Server

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}},
    "required": ["city", "country"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]},
}


def test_create_answers_with_text(client: openai.OpenAI, model_name: str) -> None:
    response = client.responses.create(model=model_name, input="Say hello.", max_output_tokens=8)
    assert response.object == "response" and response.output_text
    assert response.usage.output_tokens <= 8


def test_text_format_json_schema(client: openai.OpenAI, model_name: str) -> None:
    response = client.responses.create(
        model=model_name,
        input="Name a city and its country.",
        text={"format": {"type": "json_schema", "name": "place", "schema": SCHEMA, "strict": True}},
        max_output_tokens=60,
    )
    jsonschema.validate(json.loads(response.output_text), SCHEMA)


def test_function_tool_call(client: openai.OpenAI, model_name: str) -> None:
    response = client.responses.create(
        model=model_name,
        input="What is the weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        max_output_tokens=60,
    )
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])


def test_streamed_events_end_with_the_completed_response(client: openai.OpenAI, model_name: str) -> None:
    events = list(client.responses.create(model=model_name, input="Say hello.", max_output_tokens=8, stream=True))
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert len(deltas) > 1  # the text streams as it is generated
    assert "".join(deltas) == events[-1].response.output_text
    assert [event.sequence_number for event in events] == list(range(1, len(events) + 1))
    assert events[-1].response.id == events[0].response.id


def test_streamed_function_call_arguments_arrive_in_fragments(client: openai.OpenAI, model_name: str) -> None:
    events = list(
        client.responses.create(
            model=model_name,
            input="What is the weather in Paris?",
            tools=[WEATHER],
            tool_choice="required",
            parallel_tool_calls=False,
            max_output_tokens=60,
            stream=True,
        )
    )
    kinds = [event.type for event in events]
    added = kinds.index("response.output_item.added")
    assert events[added].item.type == "function_call" and events[added].item.name == "get_weather"
    fragments = [event.delta for event in events if event.type == "response.function_call_arguments.delta"]
    (done,) = [event for event in events if event.type == "response.function_call_arguments.done"]
    assert len(fragments) >= 3 and added < kinds.index("response.function_call_arguments.delta")
    (call,) = [item for item in events[-1].response.output if item.type == "function_call"]
    assert "".join(fragments) == done.arguments == call.arguments
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])


def test_openai_agents_default_model_calls_a_tool(server: Server, model_name: str) -> None:
    from agents import Agent, ModelSettings, OpenAIResponsesModel, RunConfig, Runner, function_tool

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
        model=OpenAIResponsesModel(model=model_name, openai_client=client),
        model_settings=ModelSettings(tool_choice="required", max_tokens=40, temperature=0),
    )
    result = Runner.run_sync(agent, "What is the weather in Paris?", run_config=RunConfig(tracing_disabled=True))
    assert len(calls) == 1
    assert isinstance(result.final_output, str)


def test_stream_items_open_and_close_in_order() -> None:
    events = ResponseEvents()
    first = DeltaToolCall(index=0, id="call_1", type="function", function=DeltaFunctionCall(name="f", arguments="{"))
    more = DeltaToolCall(index=0, function=DeltaFunctionCall(arguments="}"))
    lines = [*events.text("Hi"), *events.text("!"), *events.call(first), *events.call(more), *events.close()]
    kinds = [line.split("\n")[0].removeprefix("event: ") for line in lines]
    assert kinds == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    message, call = events.items
    assert message["content"][0]["text"] == "Hi!" and message["status"] == "completed"
    assert (call["call_id"], call["name"], call["arguments"], call["status"]) == ("call_1", "f", "{}", "completed")
    numbers = [json.loads(line.split("data: ", 1)[1])["sequence_number"] for line in lines]
    assert numbers == list(range(1, len(lines) + 1))
