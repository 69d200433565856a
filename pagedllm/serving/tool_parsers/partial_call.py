"""Reading a tool call while the model is still writing it: its name once it is whole, and as much of its
arguments object as has been written, so a stream can send the arguments as they come."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PartialCall:
    """A call as far as the model has written it: the arguments object's text so far, as written."""

    name: str
    arguments: str
    complete: bool  # `arguments` is the whole object


# The shape constrained decoding writes and models follow: the name first, then the arguments. A call written in
# another order streams whole once it is finished.
CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"([^"\\]+)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
OPENERS, CLOSERS = "{[", "}]"
WHITESPACE = re.compile(r"\s*")


def skip_whitespace(text: str, position: int) -> int:
    match = WHITESPACE.match(text, position)
    assert match is not None  # \s* matches everywhere
    return match.end()


@dataclass
class BracketScan:
    """Looking for where the object or array opening at `start` ends; brackets are only counted outside strings,
    so the text need not be valid JSON yet. Resumable: each call reads only what was appended since the last."""

    start: int
    position: int = field(init=False)  # the next character to read
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    end: int | None = None  # one past the closing bracket, once read

    def __post_init__(self) -> None:
        self.position = self.start

    def advance(self, text: str) -> int | None:
        """The end in `text`, which extends every text this scan read before; None while the value is open."""
        if self.end is not None:
            return self.end
        depth, in_string, escaped = self.depth, self.in_string, self.escaped
        for position in range(self.position, len(text)):
            char = text[position]
            if in_string:
                if escaped:
                    escaped = False
                elif char == "\\":
                    escaped = True
                elif char == '"':
                    in_string = False
            elif char == '"':
                in_string = True
            elif char in OPENERS:
                depth += 1
            elif char in CLOSERS:
                depth -= 1
                if depth == 0:
                    self.end = position + 1
                    return self.end
        self.position, self.depth, self.in_string, self.escaped = len(text), depth, in_string, escaped
        return None


class BracketScans:
    """The scans of one growing text (a streamed reply), by where their values open: however often the text is
    parsed again, each character is read once. A text that does not extend the last one starts them afresh."""

    def __init__(self) -> None:
        self._text = ""
        self._scans: dict[int, BracketScan] = {}

    def value_end(self, text: str, start: int) -> int | None:
        if not text.startswith(self._text):
            self._scans.clear()
        self._text = text
        scan = self._scans.get(start)
        if scan is None:
            scan = self._scans[start] = BracketScan(start)
        return scan.advance(text)


def json_value_end(text: str, start: int, scans: BracketScans | None = None) -> int | None:
    """Where the object or array opening at text[start] ends (one past its closing bracket); None while open."""
    if scans is None:
        return BracketScan(start).advance(text)
    return scans.value_end(text, start)


def partial_call(text: str, start: int, tool_names: set[str], scans: BracketScans | None = None) -> PartialCall | None:
    """The call whose object opens at text[start], once its known tool name is written and its arguments object
    has begun; None before that, and for calls of another shape."""
    head = CALL_HEAD.match(text, start)
    if head is None or head.group(1) not in tool_names:
        return None
    arguments_start = head.end()
    if text[arguments_start : arguments_start + 1] != "{":
        return None
    arguments_end = json_value_end(text, arguments_start, scans)
    if arguments_end is None:
        return PartialCall(head.group(1), text[arguments_start:], complete=False)
    return PartialCall(head.group(1), text[arguments_start:arguments_end], complete=True)
