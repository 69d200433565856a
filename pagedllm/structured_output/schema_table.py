"""The schema table: JSON schemas covering what clients send (nested objects, bounded arrays, enums, anyOf, nullable
values, patterns, numeric bounds, optional properties, closed objects). The schema-table test samples them, `bench
structured` times their compiles. Strings and arrays are bounded so a sample always completes within the tests'
max_tokens."""

from __future__ import annotations

from typing import Any

NAME = {"type": "string", "maxLength": 12}
SCHEMAS: dict[str, dict[str, Any]] = {
    "flat object": {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "boolean field": {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    },
    "enum of strings": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
        "additionalProperties": False,
    },
    "const": {
        "type": "object",
        "properties": {"version": {"const": 2}, "kind": {"const": "point"}},
        "required": ["version", "kind"],
        "additionalProperties": False,
    },
    "integer bounds": {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 5}},
        "required": ["n"],
        "additionalProperties": False,
    },
    "exclusive bounds": {
        "type": "object",
        "properties": {"p": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}},
        "required": ["p"],
        "additionalProperties": False,
    },
    "string pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
        "required": ["code"],
        "additionalProperties": False,
    },
    "string length": {
        "type": "object",
        "properties": {"word": {"type": "string", "minLength": 3, "maxLength": 6}},
        "required": ["word"],
        "additionalProperties": False,
    },
    "date format": {
        "type": "object",
        "properties": {"day": {"type": "string", "format": "date"}},
        "required": ["day"],
        "additionalProperties": False,
    },
    "array min and max items": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
        "additionalProperties": False,
    },
    "array of integers": {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 99},
        "minItems": 2,
        "maxItems": 4,
    },
    "array of enums": {
        "type": "array",
        "items": {"enum": ["a", "b", "c"]},
        "minItems": 1,
        "maxItems": 3,
    },
    "nested object": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"name": NAME, "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}},
                "required": ["name", "email"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "deeply nested": {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {
                    "b": {
                        "type": "object",
                        "properties": {"c": {"type": "integer", "minimum": 0, "maximum": 9}},
                        "required": ["c"],
                        "additionalProperties": False,
                    }
                },
                "required": ["b"],
                "additionalProperties": False,
            }
        },
        "required": ["a"],
        "additionalProperties": False,
    },
    "array of objects": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999}, "label": NAME},
                    "required": ["id", "label"],
                    "additionalProperties": False,
                },
                "minItems": 1,
                "maxItems": 2,
            }
        },
        "required": ["items"],
        "additionalProperties": False,
    },
    "anyOf of types": {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, NAME]}},
        "required": ["value"],
        "additionalProperties": False,
    },
    "anyOf of objects": {
        "anyOf": [
            {
                "type": "object",
                "properties": {"cat": NAME},
                "required": ["cat"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"dog": NAME},
                "required": ["dog"],
                "additionalProperties": False,
            },
        ]
    },
    "nullable via type list": {
        "type": "object",
        "properties": {"nickname": {"type": ["string", "null"], "maxLength": 10}},
        "required": ["nickname"],
        "additionalProperties": False,
    },
    "nullable via anyOf": {
        "type": "object",
        "properties": {"score": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 10}, {"type": "null"}]}},
        "required": ["score"],
        "additionalProperties": False,
    },
    "optional properties": {
        "type": "object",
        "properties": {"title": NAME, "subtitle": NAME, "pages": {"type": "integer", "minimum": 1, "maximum": 999}},
        "required": ["title"],
        "additionalProperties": False,
    },
    "no required properties": {
        "type": "object",
        "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "boolean"}},
        "additionalProperties": False,
    },
    "definitions and refs": {
        "type": "object",
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["x"],
                "additionalProperties": False,
            }
        },
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
        "additionalProperties": False,
    },
    "pydantic-style model": {
        "title": "Person",
        "type": "object",
        "properties": {
            "name": {"title": "Name", "type": "string", "maxLength": 12},
            "hobbies": {"title": "Hobbies", "type": "array", "items": NAME, "maxItems": 2},
            "married": {"title": "Married", "type": "boolean"},
        },
        "required": ["name", "hobbies", "married"],
        "additionalProperties": False,
    },
    "top-level enum": {"enum": ["yes", "no", 1, None]},
    "top-level bounded string": {"type": "string", "pattern": "^[a-z]{2,5}$"},
    "negative integer bounds": {
        "type": "object",
        "properties": {"celsius": {"type": "integer", "minimum": -40, "maximum": -1}},
        "required": ["celsius"],
        "additionalProperties": False,
    },
    "allOf": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]},
            {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]},
        ],
        "properties": {"a": True, "b": True},
        "additionalProperties": False,
    },
}
