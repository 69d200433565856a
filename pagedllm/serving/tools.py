"""Tool calling on /v1/chat/completions: checking `tools` and `tool_choice`, rendering the tools into the prompt,
the grammar that makes `required` and named choices always produce valid calls, and reading calls back."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from pagedllm.errors import InvalidArgumentError
from pagedllm.serving.tool_parsers import ParsedOutput, ToolParser
from pagedllm.structured_output.backend import JSON_OPTIONS, GrammarBackend
from pagedllm.structured_output.params import StructuredOutputsParams

MAX_TOOLS = 128  # OpenAI's limit
EMPTY_PARAMETERS = {"type": "object", "properties": {}}
FALLBACK_TOOLS_PROMPT = (
    "You can call functions. Their signatures, as JSON schemas:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, answer with one line per call:\n"
    '<tool_call>\n{{"name": <function name>, "arguments": <arguments object>}}\n</tool_call>'
)


@dataclass(frozen=True)
class ToolSetup:
    """A request's tools (OpenAI function definitions) and how it lets the model use them."""

    tools: list[dict[str, Any]]
    choice: str  # "auto", "none", "required", or the one function's name
    parallel: bool

    @property
    def names(self) -> set[str]:
        return {tool["function"]["name"] for tool in self.tools}

    @property
    def constrained(self) -> bool:
        """The reply must be calls: `required` or a named function."""
        return self.choice not in ("auto", "none")


def tool_setup(tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool) -> ToolSetup | None:
    """The checked tools and choice; None when the request offers no tools; InvalidArgumentError for bad ones."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise InvalidArgumentError("tool_choice needs tools", "tool_choice")
        return None
    if len(tools) > MAX_TOOLS:
        raise InvalidArgumentError(f"at most {MAX_TOOLS} tools are allowed, got {len(tools)}", "tools")
    checked = [_checked_tool(index, tool) for index, tool in enumerate(tools)]
    names = [tool["function"]["name"] for tool in checked]
    if len(set(names)) != len(names):
        raise InvalidArgumentError("tool names must be unique", "tools")
    return ToolSetup(checked, _choice(tool_choice, set(names)), parallel)


def _checked_tool(index: int, tool: Any) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
        raise InvalidArgumentError(f"tools[{index}] must be {{'type': 'function', 'function': {{...}}}}", "tools")
    name = function.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise InvalidArgumentError(f"tools[{index}].function.name must be a string of 1 to 64 characters", "tools")
    parameters = function.get("parameters", EMPTY_PARAMETERS)
    if not isinstance(parameters, dict):
        raise InvalidArgumentError(f"tools[{index}].function.parameters must be a JSON schema object", "tools")
    return {"type": "function", "function": {**function, "parameters": parameters}}


def _choice(tool_choice: Any, names: set[str]) -> str:
    if tool_choice is None:
        return "auto"
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "required"):
            raise InvalidArgumentError("tool_choice must be auto, none, required or a named function", "tool_choice")
        return tool_choice
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise InvalidArgumentError("tool_choice must be {'type': 'function', 'function': {'name': ...}}", "tool_choice")
    if name not in names:
        raise InvalidArgumentError(
            f"tool_choice names the function {name!r}, which is not among the tools", "tool_choice"
        )
    return name


def check_parameter_schemas(setup: ToolSetup, grammars: GrammarBackend) -> None:
    """Compile every tool's parameters schema; a bad one is refused by the tool's name."""
    for tool in setup.tools:
        function = tool["function"]
        try:
            grammars.compile(StructuredOutputsParams(json=function["parameters"]))
        except InvalidArgumentError as error:
            raise InvalidArgumentError(
                f"tool {function['name']!r} has invalid parameters: {error.message}", "tools"
            ) from error


def tool_call_constraint(setup: ToolSetup) -> StructuredOutputsParams:
    """A grammar of Hermes calls to the allowed functions with arguments matching their schemas: one call, or
    several when parallel calls are allowed and the choice is `required`."""
    allowed = [t for t in setup.tools if setup.choice in ("required", t["function"]["name"])]
    variants = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": closed_objects(t["function"]["parameters"]),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in allowed
    ]
    schema = {"anyOf": variants, "x-guidance": JSON_OPTIONS}
    repeat = ' ("\\n" call)*' if setup.parallel and setup.choice == "required" else ""
    lark = f'start: call{repeat}\ncall: "<tool_call>\\n" body "\\n</tool_call>"\nbody: %json {json.dumps(schema)}\n'
    return StructuredOutputsParams(grammar=lark)


def closed_objects(schema: Any) -> Any:
    """The schema with `additionalProperties: false` wherever an object leaves it open: a call then holds only the
    declared arguments instead of whatever keys a model invents until it runs out of tokens."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {
        key: closed_objects(value) if key not in ("const", "enum", "default") else value
        for key, value in schema.items()
    }
    if "properties" in closed:
        closed["properties"] = {name: closed_objects(value) for name, value in schema["properties"].items()}
    if "properties" in schema and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


def template_messages(
    messages: list[dict[str, Any]], setup: ToolSetup | None, template_takes_tools: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and `tools` variable for the chat template. A template without tools gets them as a system
    prompt, earlier calls as <tool_call> lines and tool results as <tool_response> user turns."""
    offered = setup.tools if setup is not None and setup.choice != "none" else None
    if template_takes_tools:
        return [_arguments_as_objects(m) for m in messages], offered
    rendered = [_plain_message(m) for m in messages]
    if offered:
        listing = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in offered)
        prompt = FALLBACK_TOOLS_PROMPT.format(tools=listing)
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": rendered[0]["content"] + "\n\n" + prompt}
        else:
            rendered.insert(0, {"role": "system", "content": prompt})
    return rendered, None


def _arguments_as_objects(message: dict[str, Any]) -> dict[str, Any]:
    """Templates write `arguments | tojson`: give them objects, not the API's JSON strings."""
    if "tool_calls" not in message:
        return message
    calls = []
    for call in message["tool_calls"]:
        function = dict(call["function"])
        try:
            function["arguments"] = json.loads(function["arguments"])
        except json.JSONDecodeError:
            pass
        calls.append({**call, "function": function})
    return {**message, "tool_calls": calls}


def _plain_message(message: dict[str, Any]) -> dict[str, Any]:
    if message["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
    lines = [message["content"]] if message["content"] else []
    for call in message.get("tool_calls", []):
        body = {"name": call["function"]["name"], "arguments": _loads_or_text(call["function"]["arguments"])}
        lines.append(f"<tool_call>\n{json.dumps(body, ensure_ascii=False)}\n</tool_call>")
    return {"role": message["role"], "content": "\n".join(lines)}


def _loads_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def parse_reply(text: str, setup: ToolSetup | None, parser: ToolParser) -> ParsedOutput:
    """The reply's content and calls; a request without usable tools gets its text back as content."""
    if setup is None or setup.choice == "none":
        return ParsedOutput(text)
    parsed = parser.parse(text, setup.names)
    if not setup.parallel and len(parsed.calls) > 1:
        return ParsedOutput(parsed.content, parsed.calls[:1])
    return parsed


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
