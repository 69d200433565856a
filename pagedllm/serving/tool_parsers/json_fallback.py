"""Tool calls written as bare JSON: one {"name", "arguments"} object or a list of them, the whole reply."""

from __future__ import annotations

import json

from pagedllm.serving.tool_parsers.base import ParsedOutput, call_from_json
from pagedllm.serving.tool_parsers.partial_call import (
    BracketScans,
    PartialCall,
    json_value_end,
    partial_call,
    skip_whitespace,
)


class JsonToolParser:
    def parse(self, text: str, tool_names: set[str]) -> ParsedOutput:
        stripped = text.strip()
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            return ParsedOutput(text or None)
        items = value if isinstance(value, list) else [value]
        calls = [call_from_json(item, tool_names) for item in items]
        if not calls or any(call is None for call in calls):
            return ParsedOutput(text or None)
        return ParsedOutput(None, [call for call in calls if call is not None])

    def may_start_call(self, text: str) -> int:
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped[:1] in ("{", "[", "") else len(text)

    def partial_calls(self, text: str, tool_names: set[str], scans: BracketScans | None = None) -> list[PartialCall]:
        position = skip_whitespace(text, 0)
        if text.startswith("[", position):
            position = skip_whitespace(text, position + 1)
        calls: list[PartialCall] = []
        while text.startswith("{", position):
            call = partial_call(text, position, tool_names, scans)
            if call is None:
                break
            calls.append(call)
            end = json_value_end(text, position, scans)
            if end is None:
                break
            position = skip_whitespace(text, end)
            if not text.startswith(",", position):
                break
            position = skip_whitespace(text, position + 1)
        return calls
