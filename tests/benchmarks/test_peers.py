"""llama.cpp peer: command lines and llama-bench's JSON output."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

from pagedllm.benchmarks import peers
from pagedllm.benchmarks.datasets import BenchmarkRequest
from pagedllm.benchmarks.throughput import DecodePoint, PrefillPoint

LLAMA_BENCH_OUTPUT = [
    {
        "build_commit": "0c1e570",
        "build_number": 1,
        "model_type": "llama ?B Q4_1",
        "n_threads": 2,
        "n_prompt": 128,
        "n_gen": 0,
        "avg_ts": 1500.5,
        "stddev_ts": 10.0,
    },
    {
        "build_commit": "0c1e570",
        "build_number": 1,
        "model_type": "llama ?B Q4_1",
        "n_threads": 2,
        "n_prompt": 512,
        "n_gen": 0,
        "avg_ts": 1400.0,
        "stddev_ts": 9.0,
    },
    {
        "build_commit": "0c1e570",
        "build_number": 1,
        "model_type": "llama ?B Q4_1",
        "n_threads": 2,
        "n_prompt": 0,
        "n_gen": 128,
        "avg_ts": 120.25,
        "stddev_ts": 1.0,
    },
]


def test_parse_llama_bench_json() -> None:
    result = peers.parse_llama_bench_json(json.dumps(LLAMA_BENCH_OUTPUT))
    assert result.prefill == [PrefillPoint(128, 1500.5), PrefillPoint(512, 1400.0)]
    assert result.decode == [DecodePoint(1, 120.25)]


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path))
    bin_dir = tmp_path / "llama.cpp" / peers.LLAMA_CPP_PYTHON_VERSION / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("llama-server", "llama-bench", "llama-batched-bench"):
        (bin_dir / name).write_text("")
    return bin_dir


def test_server_command_sizes_the_context_for_every_slot(fake_bin: Path) -> None:
    command = peers.llama_server_command(Path("/m/model.gguf"), port=8123, parallel=4, context_per_slot=2048, threads=2)
    assert command[0] == str(fake_bin / "llama-server")
    flags = dict(zip(command[1:-1:2], command[2:-1:2], strict=True))
    assert "--cont-batching" in command
    assert (flags["--model"], flags["--parallel"], flags["--ctx-size"], flags["--threads"], flags["--port"]) == (
        "/m/model.gguf",
        "4",
        "8192",
        "2",
        "8123",
    )


def test_bench_command(fake_bin: Path) -> None:
    command = peers.llama_bench_command(
        Path("m.gguf"), threads=2, prompt_lens=(512, 2048), gen_tokens=128, repetitions=3
    )
    assert command == [
        str(fake_bin / "llama-bench"),
        "-m",
        "m.gguf",
        "-t",
        "2",
        "-p",
        "512,2048",
        "-n",
        "128",
        "-r",
        "3",
        "-o",
        "json",
    ]


def test_missing_binaries_name_the_build_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"build_llama_cpp\.sh"):
        peers.llama_cpp_binary("llama-server")


def test_server_refuses_non_gguf(fake_bin: Path) -> None:
    with pytest.raises(ValueError):
        peers.llama_server(Path("/m/hf-folder"), 1, 1, 2048, 2)


def test_left_padding_ends_every_prompt_at_the_same_column() -> None:
    input_ids, attention_mask = peers.left_padded([[5, 6, 7], [8]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


class FakeHFModel:
    """Appends `max_new_tokens` tokens to every row; remembers each call's arguments."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def generate(self, input_ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
        self.calls.append({"input_ids": input_ids.tolist(), **kwargs})
        new = torch.zeros(input_ids.shape[0], int(kwargs["max_new_tokens"]), dtype=torch.long)
        return torch.cat([input_ids, new], dim=1)


def test_sharegpt_static_batches_count_only_each_requests_own_output() -> None:
    model = FakeHFModel()
    requests = [
        BenchmarkRequest([1, 2], 2, 10),
        BenchmarkRequest([3], 1, 4),
        BenchmarkRequest([4, 5, 6], 3, 6),
    ]
    result = peers.transformers_run_requests(model, requests, batch_size=2, pad_id=0)
    # Batches in the order sampled: each generates its longest output, min_new_tokens equal, greedy.
    assert [call["input_ids"] for call in model.calls] == [[[1, 2], [0, 3]], [[4, 5, 6]]]
    assert [(c["max_new_tokens"], c["min_new_tokens"], c["do_sample"]) for c in model.calls] == [
        (10, 10, False),
        (6, 6, False),
    ]
    assert model.calls[0]["attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert (result.num_requests, result.prompt_tokens, result.output_tokens) == (3, 6, 20)


BATCHED_BENCH_OUTPUT = """main: n_kv_max = 5120, n_batch = 2048
{"n_kv_max": 5120, "pp": 32, "tg": 128, "pl": 8, "n_kv": 1280, "t_tg": 4.0, "speed_tg": 256.5, "speed": 300.0}
{"n_kv_max": 5120, "pp": 32, "tg": 128, "pl": 32, "n_kv": 5120, "t_tg": 8.0, "speed_tg": 512.0, "speed": 600.0}
"""


def test_batched_bench_command_sizes_the_context_and_parses_jsonl(fake_bin: Path) -> None:
    command = peers.llama_batched_bench_command(Path("m.gguf"), 2, (8, 32), prompt_len=32, gen_tokens=128)
    assert command[0] == str(fake_bin / "llama-batched-bench")
    flags = dict(zip(command[1::2], command[2::2], strict=True))
    assert (flags["-c"], flags["-npp"], flags["-ntg"], flags["-npl"]) == ("5120", "32", "128", "8,32")
    assert flags["--output-format"] == "jsonl"
    assert peers.parse_llama_batched_bench_jsonl(BATCHED_BENCH_OUTPUT) == [
        DecodePoint(8, 256.5),
        DecodePoint(32, 512.0),
    ]


def fake_tool(path: Path, stdout: str, allocate_mib: int = 0) -> None:
    """An executable that holds `allocate_mib` MiB, prints `stdout` and exits 0."""
    path.write_text(
        f"#!{sys.executable}\nimport sys\nheld = bytearray({allocate_mib} * 2**20)\nsys.stdout.write({stdout!r})\n"
    )
    path.chmod(0o755)


def test_llama_cpp_run_adds_batched_decode_and_peak_rss(fake_bin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_tool(fake_bin / "llama-bench", json.dumps(LLAMA_BENCH_OUTPUT), allocate_mib=200)
    fake_tool(fake_bin / "llama-batched-bench", BATCHED_BENCH_OUTPUT)
    args = argparse.Namespace(num_threads=2, prompt_lens=(512,), decode_tokens=128, repeats=1, batch_sizes=(1, 8, 32))
    run = peers.llama_cpp_run(args, Path("m.gguf"), {"sizes_row": "row"})
    assert run.versions["llama.cpp"] == "build 1 (commit 0c1e570)"
    assert [d["batch_size"] for d in run.results["decode"]] == [1, 8, 32]
    assert run.results["memory"]["peak_rss_bytes"] >= 200 * 2**20
    assert run.settings["batched_tool_command"][0] == str(fake_bin / "llama-batched-bench")
    (fake_bin / "llama-batched-bench").unlink()  # an older build: decode above batch 1 is left unmeasured
    assert [d["batch_size"] for d in peers.llama_cpp_run(args, Path("m.gguf"), {}).results["decode"]] == [1]
