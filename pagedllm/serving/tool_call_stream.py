"""One chat choice streamed while tools are offered: the text before any call as content, then each call as OpenAI
streams it: a first delta with its index, id, type and name, then its arguments in fragments as they are written."""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.serving.protocol import ChatDelta, DeltaFunctionCall, DeltaToolCall
from pagedllm.serving.tool_parsers import ToolParser
from pagedllm.serving.tool_parsers.partial_call import BracketScans
from pagedllm.serving.tools import ToolSetup, call_id, parse_reply


@dataclass
class SentCall:
    id: str
    arguments: str  # the arguments text sent so far
    complete: bool  # all of them


class ToolCallStream:
    """Turns the cumulative text of one choice into deltas. A call is sent once its name is written; from then on
    the reply is committed to it (no later text turns it back into content)."""

    def __init__(self, setup: ToolSetup, parser: ToolParser) -> None:
        self.setup = setup
        self.parser = parser
        self.content_sent = 0  # characters of the text sent as content
        self.calls: list[SentCall] = []
        self.scans = BracketScans()  # the calls' brackets read so far: each step reads only the new text

    def delta(self, text: str) -> ChatDelta:
        """What the reply so far adds to what was sent."""
        content = self._content(text)
        return _chat_delta(content, self._call_deltas(text))

    def finish(self, text: str) -> ChatDelta:
        """The rest once the reply is whole: arguments not yet sent, calls that could not stream (written in
        another shape), and the content outside the calls."""
        content = self._content(text)
        calls = self._call_deltas(text)
        parsed = parse_reply(text, self.setup, self.parser)
        for index in range(len(self.calls), len(parsed.calls)):
            whole = parsed.calls[index]
            sent = SentCall(call_id(), whole.arguments, complete=True)
            self.calls.append(sent)
            calls.append(_first_delta(index, sent, whole.name))
        if not self.calls:
            content += text[self.content_sent :]
        elif parsed.calls and parsed.content:
            # The content is the text outside the calls, stripped; its start was streamed before the first call.
            before = text[: self.content_sent].strip()
            content += parsed.content[len(before) :] if parsed.content.startswith(before) else ""
        self.content_sent = len(text)
        return _chat_delta(content, calls)

    def finish_reason(self, reason: str) -> str:
        """tool_calls once a call was sent, but length when the reply was cut short inside one (its arguments
        are then not whole)."""
        if not self.calls or (reason == "length" and not self.calls[-1].complete):
            return reason
        return "tool_calls"

    def _content(self, text: str) -> str:
        """New content certainly not part of a call: none once a call is sent, and none under a constraint that
        makes the whole reply calls. Trailing whitespace waits, since the content is stripped before a call."""
        if self.calls or self.setup.constrained:
            return ""
        safe = len(text[: self.parser.may_start_call(text)].rstrip())
        new = text[self.content_sent : safe]
        self.content_sent = max(self.content_sent, safe)
        return new

    def _call_deltas(self, text: str) -> list[DeltaToolCall]:
        partial = self.parser.partial_calls(text, self.setup.names, self.scans)
        if not self.setup.parallel:
            partial = partial[:1]
        deltas = []
        for index, call in enumerate(partial):
            if index == len(self.calls):
                sent = SentCall(call_id(), call.arguments, call.complete)
                self.calls.append(sent)
                deltas.append(_first_delta(index, sent, call.name))
                continue
            sent = self.calls[index]
            sent.complete = call.complete
            # A stop string can cut the text back; what was sent stays sent.
            if len(call.arguments) > len(sent.arguments) and call.arguments.startswith(sent.arguments):
                fragment = call.arguments[len(sent.arguments) :]
                sent.arguments = call.arguments
                deltas.append(DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=fragment)))
        return deltas


def _first_delta(index: int, sent: SentCall, name: str) -> DeltaToolCall:
    function = DeltaFunctionCall(name=name, arguments=sent.arguments)
    return DeltaToolCall(index=index, id=sent.id, type="function", function=function)


def _chat_delta(content: str, calls: list[DeltaToolCall]) -> ChatDelta:
    """Content "" keeps a chunk that carries only logprobs well-formed; beside calls it is left out."""
    return ChatDelta(content=content or (None if calls else ""), tool_calls=calls or None)
