"""Every sample of every schema in the table validates: temperature 0.7, several seeds, one batch."""

from __future__ import annotations

import json

import jsonschema
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.structured_output.params import StructuredOutputsParams
from pagedllm.structured_output.schema_table import SCHEMAS

SEEDS = (0, 1, 2)
MAX_TOKENS = 64


def test_the_table_has_at_least_25_schemas() -> None:
    assert len(SCHEMAS) >= 25
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("seed", [SEEDS[0], *(pytest.param(seed, marks=pytest.mark.slow) for seed in SEEDS[1:])])
def test_every_sampled_output_validates(llm: LLM, seed: int) -> None:
    cases = [(name, seed) for name in SCHEMAS]
    prompts = [
        llm.tokenizer.encode_chat([{"role": "user", "content": f"Answer with JSON for: {name}."}]) for name, _ in cases
    ]
    params = [
        SamplingParams(
            max_tokens=MAX_TOKENS,
            temperature=0.7,
            seed=seed,
            structured_outputs=StructuredOutputsParams(json=SCHEMAS[name]),
        )
        for name, seed in cases
    ]
    outputs = llm.generate(prompts, params)
    failures = []
    for (name, seed), output in zip(cases, outputs):
        sample = output.outputs[0]
        try:
            jsonschema.validate(json.loads(sample.text), SCHEMAS[name])
            assert sample.finish_reason == "stop"
        except (ValueError, AssertionError, jsonschema.ValidationError) as error:
            failures.append(f"{name} seed {seed}: {sample.text!r} ({sample.finish_reason}): {error}")
    assert not failures, "\n".join(failures)
