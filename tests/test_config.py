"""Engine settings: enumerated ones are typed choices that the CLI lists and the config checks, in one place."""

from __future__ import annotations

import argparse
import typing

import pytest

from pagedllm.config import QUANT_GROUP_SIZES, EngineConfig
from pagedllm.errors import ConfigError
from pagedllm.flags import add_dataclass_arguments
from pagedllm.serving.api_server import add_arguments

ENUMERATED = {
    "dtype": ("auto", "float32", "bfloat16"),
    "attention_impl": ("fast", "reference"),
    "quantization": ("auto", "none", "int8", "int4"),
    "quant_group_size": (32, 64, 128, 256),
    "kv_cache_dtype": ("auto", "int8", "int4"),
    "kv_cache_policy": ("full", "streaming", "h2o"),
}


def test_serve_help_lists_the_choices_of_every_enumerated_setting() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    for name, choices in ENUMERATED.items():
        listed = "{" + ",".join(str(choice) for choice in choices) + "}"
        assert f"--{name.replace('_', '-')} {listed}" in help_text


def test_every_literal_setting_is_enumerated_here_and_group_sizes_are_one_constant() -> None:
    hints = typing.get_type_hints(EngineConfig)
    literal = {name for name, hint in hints.items() if typing.get_origin(hint) is typing.Literal}
    assert literal == set(ENUMERATED)
    assert QUANT_GROUP_SIZES == ENUMERATED["quant_group_size"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("dtype", "float16"),
        ("quant_group_size", 48),
        ("kv_cache_dtype", "fp8"),
        ("device", "gpu0"),
        ("kv_cache_policy", "snapkv"),
        ("kv_window", 0),
        ("kv_budget", 0),
        ("attention_sinks", -1),
        ("prefix_affinity_min_tokens", -1),
        ("prefix_affinity_max_load_gap", -1),
    ],
)
def test_a_value_outside_the_choices_names_its_setting(name: str, value: object) -> None:
    with pytest.raises(ConfigError, match=name) as raised:
        EngineConfig(**{name: value})
    assert raised.value.param == name


def test_flags_refuse_a_value_outside_the_choices_before_the_engine_starts(capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, EngineConfig)
    assert parser.parse_args(["--quant-group-size", "64"]).quant_group_size == 64
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err


@pytest.mark.parametrize("policy", ["streaming", "h2o"])
def test_evicting_policies_refuse_speculation_and_take_the_prefix_cache(policy: str) -> None:
    speculative = {"method": "ngram", "num_speculative_tokens": 3}
    with pytest.raises(ConfigError, match=f"{policy} does not take speculative") as raised:
        EngineConfig(kv_cache_policy=policy, speculative_config=speculative)
    assert raised.value.param == "speculative_config"
    config = EngineConfig(kv_cache_policy=policy)
    assert config.enable_prefix_caching and (config.kv_window, config.kv_budget) == (1024, 1024)


def test_worker_processes_refuse_the_draft_model_and_the_streaming_policy() -> None:
    draft = {"method": "draft_model", "model": "smollm2-135m-instruct", "num_speculative_tokens": 3}
    with pytest.raises(ConfigError, match="draft_model") as raised:
        EngineConfig(tensor_parallel_size=2, speculative_config=draft)
    assert raised.value.param == "speculative_config"
    for policy in ("streaming", "h2o"):
        with pytest.raises(ConfigError, match=policy) as raised:
            EngineConfig(tensor_parallel_size=2, kv_cache_policy=policy, enable_prefix_caching=False)
        assert raised.value.param == "kv_cache_policy"
    assert EngineConfig(tensor_parallel_size=2, speculative_config={"method": "ngram"}).executor_backend == "mp"


def test_ray_takes_tensor_parallelism_and_replicas_and_refuses_what_its_ranks_cannot_run_by_name() -> None:
    assert EngineConfig(tensor_parallel_size=2, distributed_executor_backend="ray").executor_backend == "ray"
    replicas = EngineConfig(data_parallel_size=2, distributed_executor_backend="ray", kv_cache_policy="streaming")
    assert replicas.executor_backend == "ray"  # each replica runs its engine in one process: any policy
    with pytest.raises(ConfigError, match=r"distributed_executor_backend ray\)") as raised:
        EngineConfig(
            tensor_parallel_size=2,
            distributed_executor_backend="ray",
            kv_cache_policy="streaming",
            enable_prefix_caching=False,
        )
    assert raised.value.param == "kv_cache_policy"
