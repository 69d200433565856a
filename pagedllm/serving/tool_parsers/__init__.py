"""Tool-call parsers, one per model family's format, chosen by name or from the chat template."""

from __future__ import annotations

from pagedllm.serving.tool_parsers.base import ParsedCall, ParsedOutput, ToolParser
from pagedllm.serving.tool_parsers.hermes import HermesToolParser
from pagedllm.serving.tool_parsers.json_fallback import JsonToolParser
from pagedllm.serving.tool_parsers.partial_call import PartialCall

TOOL_PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesToolParser, "json": JsonToolParser}


def parser_for_template(chat_template: str | None) -> ToolParser:
    """Hermes for templates that write <tool_call> tags and for those without tools (pagedllm's prompt asks for the
    tags); bare JSON for templates with tools but another format."""
    if chat_template is not None and "tools" in chat_template and "<tool_call>" not in chat_template:
        return JsonToolParser()
    return HermesToolParser()


__all__ = [
    "TOOL_PARSERS",
    "HermesToolParser",
    "JsonToolParser",
    "ParsedCall",
    "ParsedOutput",
    "PartialCall",
    "ToolParser",
    "parser_for_template",
]
