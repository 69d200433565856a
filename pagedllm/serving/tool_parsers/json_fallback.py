"""Tool calls written as bare JSON: one {"name", "arguments"} object or a list of them, the whole reply."""

from __future__ import annotations

import json

from pagedllm.serving.tool_parsers.base import ParsedOutput, call_from_json


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
