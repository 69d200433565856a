"""The Hermes format (Qwen2.5, Hermes, SmolLM3 and the prompt pagedllm writes for templates without tools): each
call a JSON object between <tool_call> and </tool_call>; a reply that is bare JSON is read as the JSON format."""

from __future__ import annotations

import json
import re

from pagedllm.serving.tool_parsers.base import ParsedCall, ParsedOutput, call_from_json
from pagedllm.serving.tool_parsers.json_fallback import JsonToolParser
from pagedllm.serving.tool_parsers.partial_call import BracketScans, PartialCall, partial_call, skip_whitespace

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# A call's body runs to its closing tag, or to the end of the reply when generation stopped before the tag.
CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


class HermesToolParser:
    def __init__(self) -> None:
        self.fallback = JsonToolParser()

    def parse(self, text: str, tool_names: set[str]) -> ParsedOutput:
        """Every call, or none when one is malformed; a last call cut short (max_tokens) after whole ones is dropped."""
        if OPEN not in text:
            return self.fallback.parse(text, tool_names)
        calls: list[ParsedCall] = []
        matches = list(CALL.finditer(text))
        for number, match in enumerate(matches):
            try:
                call = call_from_json(json.loads(match.group(1)), tool_names)
            except json.JSONDecodeError:
                call = None
            cut_short = number == len(matches) - 1 and not match.group(0).endswith(CLOSE)
            if call is None and not (cut_short and calls):
                return ParsedOutput(text or None)
            if call is not None:
                calls.append(call)
        content = CALL.sub("", text).strip()
        return ParsedOutput(content or None, calls)

    def may_start_call(self, text: str) -> int:
        at = text.find(OPEN)
        if at >= 0:
            return at
        for length in range(min(len(OPEN) - 1, len(text)), 0, -1):
            if text.endswith(OPEN[:length]):
                return len(text) - length
        return min(len(text), self.fallback.may_start_call(text))

    def partial_calls(self, text: str, tool_names: set[str], scans: BracketScans | None = None) -> list[PartialCall]:
        if OPEN not in text:
            return self.fallback.partial_calls(text, tool_names, scans)
        calls: list[PartialCall] = []
        at = text.find(OPEN)
        while at >= 0:
            body = skip_whitespace(text, at + len(OPEN))
            call = partial_call(text, body, tool_names, scans)
            if call is None:
                break
            calls.append(call)
            if not call.complete:
                break
            at = text.find(OPEN, body + len(call.arguments))
        return calls
