"""SamplingParams: every out-of-range value raises InvalidArgumentError naming the parameter; edges are accepted."""

from __future__ import annotations

import math

import pytest

from pagedllm.errors import InvalidArgumentError
from pagedllm.sampling_params import MAX_LOGPROBS, SamplingParams

NAN = math.nan

INVALID = [
    ("n", 0),
    ("n", -1),
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("min_tokens", -1),
    ("temperature", -0.1),
    ("temperature", NAN),
    ("top_k", -2),
    ("top_p", 0.0),
    ("top_p", -0.5),
    ("top_p", 1.01),
    ("top_p", NAN),
    ("min_p", -0.01),
    ("min_p", 1.5),
    ("min_p", NAN),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", NAN),
    ("presence_penalty", 2.01),
    ("presence_penalty", -2.01),
    ("presence_penalty", NAN),
    ("frequency_penalty", 2.5),
    ("frequency_penalty", -3.0),
    ("frequency_penalty", NAN),
    ("stop", [""]),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("stop", ["ok", 3]),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [5, -3]),
    ("logprobs", -1),
    ("logprobs", MAX_LOGPROBS + 1),
    ("prompt_logprobs", -1),
    ("prompt_logprobs", MAX_LOGPROBS + 1),
]


@pytest.mark.parametrize(("name", "value"), INVALID, ids=[f"{n}={v!r}" for n, v in INVALID])
def test_out_of_range_values_name_the_param(name: str, value: object) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        SamplingParams(**{name: value})
    assert info.value.param == name
    assert name in str(info.value)
    assert info.value.http_status == 400
    assert isinstance(info.value, ValueError)


def test_min_tokens_may_not_exceed_max_tokens() -> None:
    SamplingParams(max_tokens=4, min_tokens=4)
    with pytest.raises(InvalidArgumentError) as info:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert info.value.param == "min_tokens"


VALID_EDGES = [
    dict(n=1),
    dict(max_tokens=1),
    dict(temperature=0.0),
    dict(top_k=0),
    dict(top_k=1),
    dict(top_p=1.0),
    dict(top_p=1e-6),
    dict(min_p=0.0),
    dict(min_p=1.0),
    dict(repetition_penalty=1e-3),
    dict(presence_penalty=-2.0),
    dict(presence_penalty=2.0),
    dict(frequency_penalty=-2.0),
    dict(frequency_penalty=2.0),
    dict(stop_token_ids=[0]),
    dict(logprobs=0),
    dict(logprobs=MAX_LOGPROBS),
    dict(prompt_logprobs=0),
    dict(prompt_logprobs=MAX_LOGPROBS),
]


@pytest.mark.parametrize("kwargs", VALID_EDGES, ids=[",".join(f"{k}={v}" for k, v in e.items()) for e in VALID_EDGES])
def test_edge_values_are_accepted(kwargs: dict) -> None:
    params = SamplingParams(**kwargs)
    for key, value in kwargs.items():
        assert getattr(params, key) == value


def test_normalizations() -> None:
    assert SamplingParams(top_k=-1).top_k == 0  # -1 (vLLM's "disabled") becomes 0
    assert SamplingParams(stop="###").stop == ["###"]
    stops = ("a", "b")
    params = SamplingParams(stop=stops, stop_token_ids=(1, 2))
    assert params.stop == ["a", "b"] and params.stop_token_ids == [1, 2]
    own = ["x"]
    assert SamplingParams(stop=own).stop is not own  # a copy: later edits by the caller do not leak in


def test_defaults_are_valid_and_neutral() -> None:
    params = SamplingParams()
    assert (params.n, params.temperature, params.top_k, params.top_p, params.min_p) == (1, 1.0, 0, 1.0, 0.0)
    assert (params.repetition_penalty, params.presence_penalty, params.frequency_penalty) == (1.0, 0.0, 0.0)
    assert params.stop == [] and params.stop_token_ids == [] and params.seed is None


WRONG_KIND = [
    ("n", 2.5),
    ("max_tokens", 1.5),
    ("min_tokens", 0.5),
    ("top_k", 2.5),
    ("temperature", "1"),
    ("top_p", "0.9"),
    ("seed", "x"),
    ("stop_token_ids", ["7"]),
    ("logprobs", 1.5),
]


@pytest.mark.parametrize(("name", "value"), WRONG_KIND, ids=[f"{n}={v!r}" for n, v in WRONG_KIND])
def test_values_of_the_wrong_kind_name_the_param(name: str, value: object) -> None:
    # errors.InvalidArgumentError: "A parameter is out of range or of the wrong kind" -- validated where it enters,
    # not as a TypeError (or a silent truncation) somewhere in the engine later.
    with pytest.raises(InvalidArgumentError) as info:
        SamplingParams(**{name: value})
    assert info.value.param == name
