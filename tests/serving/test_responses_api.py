"""/v1/responses through the openai SDK's `responses.create` (whole and streamed, text.format json_schema,
function tools) and openai-agents' default (Responses) model calling one tool."""

from __future__ import annotations

import json

import jsonschema
import openai

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
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text


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
