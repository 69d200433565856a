"""speculative_config: one dataclass from a dict (Python), a JSON string (command line) or nothing."""

from __future__ import annotations

import argparse

import pytest

from pagedllm.config import EngineConfig
from pagedllm.errors import ConfigError
from pagedllm.flags import add_dataclass_arguments, dataclass_from_args
from pagedllm.spec_decode.config import SpeculativeConfig


def test_a_dict_and_a_json_string_give_the_same_config() -> None:
    from_dict = SpeculativeConfig.parse({"method": "suffix", "num_speculative_tokens": 8})
    from_json = SpeculativeConfig.parse('{"method": "suffix", "num_speculative_tokens": 8}')
    assert from_dict == from_json == SpeculativeConfig(method="suffix", num_speculative_tokens=8)


@pytest.mark.parametrize("empty", [None, "", "  ", {}])
def test_nothing_means_no_speculation(empty) -> None:
    assert SpeculativeConfig.parse(empty) is None
    assert EngineConfig(speculative_config=empty).speculative_config is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"method": "eagle"}', "method must be one of"),
        ({"num_speculative_tokens": 0}, "num_speculative_tokens must be in"),
        ({"num_speculative_tokens": "5"}, "num_speculative_tokens must be int"),
        ({"prompt_lookup_min": 4, "prompt_lookup_max": 2}, "prompt_lookup_max must be >= prompt_lookup_min"),
        ({"method": "draft_model"}, "model is required"),
        ({"speculative_tokens": 3}, "unknown speculative_config setting(s): speculative_tokens"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_invalid_settings_are_rejected_with_their_name(value, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SpeculativeConfig.parse(value)


def test_engine_config_and_its_flag_take_the_json() -> None:
    config = EngineConfig(speculative_config={"method": "ngram", "prompt_lookup_max": 3})
    assert config.speculative_config == SpeculativeConfig(prompt_lookup_max=3)
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, EngineConfig)
    args = parser.parse_args(["--speculative-config", '{"method": "suffix"}'])
    assert dataclass_from_args(EngineConfig, args).speculative_config == SpeculativeConfig(method="suffix")
    assert dataclass_from_args(EngineConfig, parser.parse_args([])).speculative_config is None


def test_a_draft_models_quantization_is_one_of_the_engines() -> None:
    spec = {"method": "draft_model", "model": "draft.gguf", "quantization": "int4"}
    assert EngineConfig(speculative_config=spec).speculative_config == SpeculativeConfig(**spec)
    with pytest.raises(ConfigError, match="speculative_config.quantization must be one of"):
        EngineConfig(speculative_config={**spec, "quantization": "int3"})


def test_a_bad_flag_value_is_one_line_from_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, EngineConfig)
    with pytest.raises(SystemExit):
        parser.parse_args(["--speculative-config", '{"method": "eagle"}'])
    assert "speculative_config.method must be one of" in capsys.readouterr().err
