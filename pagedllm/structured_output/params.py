"""What a request constrains its output to: a JSON schema, any JSON object, a regex, a choice or a grammar."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pagedllm.errors import InvalidArgumentError

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of the fields is set; the names are vLLM's `structured_outputs` fields."""

    json: dict[str, Any] | str | None = None  # a JSON schema (an object, or its text)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # a Lark grammar (llguidance's dialect) or a GBNF one

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [kind for kind in KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise InvalidArgumentError(
                f"structured_outputs needs exactly one of {', '.join(KINDS)}; got {given or 'none'}",
                "structured_outputs",
            )
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise InvalidArgumentError("structured_outputs.choice must be a non-empty list of strings", "choice")
        for kind in ("regex", "grammar"):
            value = getattr(self, kind)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidArgumentError(f"structured_outputs.{kind} must be a non-empty string", kind)
        if self.json is not None and not isinstance(self.json, dict | str):
            raise InvalidArgumentError("structured_outputs.json must be a JSON schema object", "json")

    @property
    def kind(self) -> str:
        return next(kind for kind in KINDS if getattr(self, kind) not in (None, False))

    @property
    def key(self) -> str:
        """The identity of the grammar this compiles to (the compile cache's key)."""
        value = getattr(self, self.kind)
        if isinstance(value, dict | tuple):
            value = json.dumps(value, sort_keys=True, separators=(",", ":"))
        return f"{self.kind}:{value}"

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> StructuredOutputsParams:
        """From vLLM's `structured_outputs` request field; unknown keys are refused by name."""
        if not isinstance(fields, dict):
            raise InvalidArgumentError("structured_outputs must be an object", "structured_outputs")
        unknown = sorted(set(fields) - set(KINDS))
        if unknown:
            raise InvalidArgumentError(
                f"structured_outputs has unsupported fields {unknown}; supported: {', '.join(KINDS)}",
                "structured_outputs",
            )
        given = {name: value for name, value in fields.items() if value is not None}
        return cls(**given)
