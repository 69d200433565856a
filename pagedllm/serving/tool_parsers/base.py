"""What a tool parser returns, and the shape every parser has."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from pagedllm.serving.tool_parsers.partial_call import BracketScans, PartialCall


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object's text


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None  # text outside the calls, None when there is none
    calls: list[ParsedCall] = field(default_factory=list)


class ToolParser(Protocol):
    """Finds the tool calls a model family writes in its reply."""

    def parse(self, text: str, tool_names: set[str]) -> ParsedOutput: ...

    def may_start_call(self, text: str) -> int:
        """Where in `text` a call may begin (len(text) when nowhere): text before it can be streamed as content."""
        ...

    def partial_calls(self, text: str, tool_names: set[str], scans: BracketScans | None = None) -> list[PartialCall]:
        """The calls begun in `text`, in order, up to the first whose name and arguments cannot be read yet; a
        stream passes the same `scans` with each longer text so that no character is scanned twice."""
        ...


def call_from_json(value: Any, tool_names: set[str]) -> ParsedCall | None:
    """A {"name", "arguments"} object naming a known tool, as a call; None for anything else."""
    if not isinstance(value, dict) or value.get("name") not in tool_names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))
