"""The scaling model's invariants, its calibration from a results file, and `bench scaling` end to end."""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import pytest

from pagedllm.benchmarks import results, scaling
from pagedllm.benchmarks.parallel import model_shape_record
from pagedllm.benchmarks.parallel_report import parallel_table, scaling_plot_path
from pagedllm.benchmarks.report import PARALLEL_END, PARALLEL_START, write_report
from pagedllm.benchmarks.scaling_model import (
    LLAMA_8B,
    Calibration,
    LinearCost,
    ModelShape,
    Network,
    ScalingModel,
    bubble_fraction,
)

SMALL = ModelShape("small", 576, 30, 9, 3, 64, 1536, 49152, True)
NODES = (1, 2, 4, 8, 16, 32, 64)


def calibration(**changes) -> Calibration:
    base = Calibration(
        shape=SMALL,
        bits_per_weight=5.0,
        decode_step_s=0.01,
        prefill_s=0.2,
        prompt_len=512,
        serve_output_tokens_per_s=250.0,
        concurrency=16,
        intra_node_all_reduce=LinearCost(10e-6, 1e-10),
        activation_bytes=4,
        ranks_per_node=2,
    )
    return replace(base, **changes)


FREE_NETWORK = Network(bandwidth_bits_per_s=math.inf, latency_s=0.0)


def test_llama_8b_shape_holds_8b_weights():
    assert LLAMA_8B.stored_params() == pytest.approx(8.03e9, rel=0.005)


@pytest.fixture(scope="module")
def embedded_shape() -> dict:
    """The embedded model's shape as `bench parallel` records it (reading the GGUF's header takes seconds)."""
    return model_shape_record(None)


def test_embedded_model_shape_matches_its_size(embedded_shape: dict):
    shape = ModelShape("smollm2", **embedded_shape)
    assert shape.stored_params() == pytest.approx(134.5e6, rel=0.005)


def test_linear_fit_recovers_a_line():
    points = [(size, 5e-6 + size * 2e-10) for size in (2304, 4096, 8192, 16384, 32768)]
    fitted = LinearCost.fit(points)
    assert fitted.latency_s == pytest.approx(5e-6)
    assert fitted.seconds_per_byte == pytest.approx(2e-10)


def test_calibration_reproduces_the_measured_node():
    model = ScalingModel(calibration(ranks_per_node=1), Network())
    c = model.calibration
    for strategy in ("tensor", "pipeline", "data"):
        one = model.predict(SMALL, strategy, 1)
        assert one.decode_tokens_per_s == pytest.approx(1 / c.decode_step_s)
        assert one.prefill_s == pytest.approx(c.prefill_s)
        assert one.serve_output_tokens_per_s == pytest.approx(c.serve_output_tokens_per_s)


def test_data_parallel_throughput_is_linear_and_latency_unchanged():
    model = ScalingModel(calibration(), Network())
    one = model.data(LLAMA_8B, 1)
    for nodes in NODES:
        many = model.data(LLAMA_8B, nodes)
        assert many.serve_output_tokens_per_s == pytest.approx(nodes * one.serve_output_tokens_per_s)
        assert many.decode_tokens_per_s == one.decode_tokens_per_s
        assert many.prefill_s == one.prefill_s


def test_tensor_parallel_without_communication_cost_is_ideal():
    model = ScalingModel(calibration(intra_node_all_reduce=LinearCost(0.0, 0.0)), FREE_NETWORK)
    one = model.tensor(LLAMA_8B, 1)
    for nodes in (2, 4, 8, 16):
        many = model.tensor(LLAMA_8B, nodes)
        assert many.decode_tokens_per_s == pytest.approx(nodes * one.decode_tokens_per_s)
        assert many.prefill_s == pytest.approx(one.prefill_s / nodes)
        assert many.serve_output_tokens_per_s == pytest.approx(nodes * one.serve_output_tokens_per_s)
        assert many.weight_bytes_per_node == pytest.approx(one.weight_bytes_per_node / nodes)


def test_tensor_parallel_pays_two_all_reduces_per_layer():
    model = ScalingModel(calibration(intra_node_all_reduce=LinearCost(0.0, 0.0)), Network(25e9, 20e-6))
    nodes = 4
    ideal_s = model.decode_step_s(LLAMA_8B) / nodes
    # A ring of 4 nodes: 6 messages of a quarter of the hidden vector each.
    message_s = 20e-6 + 8 * (4096 * 4 / nodes) / 25e9
    expected_s = ideal_s + 2 * LLAMA_8B.num_layers * 6 * message_s
    assert 1 / model.tensor(LLAMA_8B, nodes).decode_tokens_per_s == pytest.approx(expected_s)
    # Crossing nodes costs more than sharing one: the shared-memory step is there either way.
    shared = ScalingModel(calibration(), Network(25e9, 20e-6))
    assert shared.all_reduce_s(LLAMA_8B, 1, 2) > shared.all_reduce_s(LLAMA_8B, 1, 1) > 0


def test_bubble_fraction():
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction(1, 5) == 0.0
    assert bubble_fraction(8, 1) == pytest.approx(7 / 8)


def test_pipeline_throughput_follows_the_bubble_and_latency_does_not_improve():
    model = ScalingModel(calibration(), FREE_NETWORK, micro_batches_per_stage=2)
    one = model.pipeline(LLAMA_8B, 1)
    for stages in (2, 4, 8):
        many = model.pipeline(LLAMA_8B, stages)
        busy = 1 - (stages - 1) / (2 * stages + stages - 1)
        assert many.serve_output_tokens_per_s == pytest.approx(stages * one.serve_output_tokens_per_s * busy)
        assert many.decode_tokens_per_s == pytest.approx(one.decode_tokens_per_s)
        assert many.prefill_s == pytest.approx(one.prefill_s)
    slow = ScalingModel(calibration(), Network(1e9, 1e-3))
    assert slow.pipeline(LLAMA_8B, 8).decode_tokens_per_s < slow.pipeline(LLAMA_8B, 1).decode_tokens_per_s


def test_splits_the_model_cannot_take_are_none():
    model = ScalingModel(calibration(), Network())
    assert model.tensor(SMALL, 8).decode_tokens_per_s is None  # 16 ranks, 9 heads
    assert model.tensor(SMALL, 4).decode_tokens_per_s is not None
    assert model.pipeline(SMALL, 32).serve_output_tokens_per_s is None  # 32 stages, 30 layers


def test_other_shapes_scale_by_weight_bytes_and_flops():
    model = ScalingModel(calibration(), Network())
    assert model.decode_step_s(LLAMA_8B) / model.decode_step_s(SMALL) == pytest.approx(
        LLAMA_8B.matmul_params() / SMALL.matmul_params()
    )
    flops = LLAMA_8B.flops_per_token(256) / SMALL.flops_per_token(256)
    assert model.prefill_s(LLAMA_8B) / model.prefill_s(SMALL) == pytest.approx(flops)


def measured_document(path: Path, shape: dict) -> None:
    """A results file with what `bench parallel` and `bench allreduce` record."""
    tensor = {
        "single": {"decode_tokens_per_s": 100.0, "prefill_seconds": 0.25},
        "tensor_parallel": {"decode_tokens_per_s": 90.0, "prefill_seconds": 0.3},
        "decode_ratio": 0.9,
        "prefill_ratio": 0.25 / 0.3,
        "weight_bytes": 90_000_000,
        "model_shape": shape,
    }
    data = {
        "single": {"output_tokens_per_s": 200.0, "requests_per_s": 3.0, "failed": 0},
        "data_parallel": {"output_tokens_per_s": 190.0, "requests_per_s": 2.9, "failed": 0},
        "throughput_ratio": 0.95,
    }
    settings = {"model": None, "world_size": 2, "threads_per_rank": 1, "prompt_len": 512, "concurrency": 16}
    results.append_run(path, results.new_run("parallel", "pagedllm", settings, {"tensor": tensor, "data": data}))
    latencies = [
        {
            "num_elements": n,
            "shared_memory_median_us": 8 + n / 1000,
            "shared_memory_p90_us": 9 + n / 1000,
            "gloo_median_us": 300.0,
            "gloo_p90_us": 400.0,
        }
        for n in (576, 1024, 4096)
    ]
    results.append_run(
        path, results.new_run("allreduce", "pagedllm", {"dtype": "float32", "world_size": 2}, {"latencies": latencies})
    )


def scaling_args(path: Path) -> argparse.Namespace:
    return argparse.Namespace(
        results=path, network_gbit_s=25.0, network_latency_us=20.0, micro_batches_per_stage=4, nodes=NODES
    )


def test_calibration_from_a_results_file(tmp_path: Path, embedded_shape: dict):
    path = tmp_path / "run.json"
    measured_document(path, embedded_shape)
    c = scaling.calibration_from(results.load_results(path))
    assert c.decode_step_s == pytest.approx(0.01)
    assert c.prefill_s == 0.25 and c.prompt_len == 512
    assert c.serve_output_tokens_per_s == 200.0 and c.concurrency == 16
    assert c.bits_per_weight == pytest.approx(90_000_000 * 8 / c.shape.stored_params())
    assert c.intra_node_all_reduce.latency_s == pytest.approx(8e-6)
    assert c.intra_node_all_reduce.seconds_per_byte == pytest.approx(1e-9 / 4)
    assert c.activation_bytes == 4 and c.ranks_per_node == 2


def test_bench_scaling_appends_predictions_plots_and_reports(tmp_path: Path, embedded_shape: dict):
    path = tmp_path / "run.json"
    measured_document(path, embedded_shape)
    assert scaling.run(scaling_args(path)) == 0
    run = results.load_results(path).runs[-1]
    assert run.kind == "scaling"
    predictions = run.results["predictions"]
    assert {p["model"] for p in predictions} == {"smollm2-135m-instruct", LLAMA_8B.name}
    assert len(predictions) == 2 * 3 * len(NODES)
    data_one = next(p for p in predictions if p["strategy"] == "data" and p["nodes"] == 1 and p["model"] != "8B")
    assert data_one["serve_output_tokens_per_s"] == pytest.approx(200.0)
    assert scaling_plot_path(path).stat().st_size > 0
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{PARALLEL_START}\n{PARALLEL_END}\n")
    write_report(path, readme=readme)
    text = readme.read_text()
    assert "| TP=2: decode batch 1 (tok/s) | 100.0 | 90.0 | 0.90× |" in text
    assert "| DP=2: serving, concurrency 16 (output tok/s) | 200.0 | 190.0 | 0.95× |" in text
    assert "25 Gb/s, 20 µs per message" in text
    assert f"{LLAMA_8B.name}:" in text and f"]({scaling_plot_path(path).name})" in text


def test_bench_scaling_names_the_missing_measurement(tmp_path: Path, capsys):
    path = tmp_path / "run.json"
    results.append_run(path, results.new_run("offline", "pagedllm", {}, {"prefill": [], "decode": []}))
    assert scaling.run(scaling_args(path)) == 2
    assert "no `bench parallel` (its tensor part) run" in capsys.readouterr().out


def test_parallel_table_takes_each_part_from_its_latest_run(tmp_path: Path, embedded_shape: dict):
    path = tmp_path / "run.json"
    measured_document(path, embedded_shape)
    newer = {"single": {"output_tokens_per_s": 100.0}, "data_parallel": {"output_tokens_per_s": 180.0}}
    newer["throughput_ratio"] = 1.8
    settings = {"world_size": 2, "threads_per_rank": 1, "concurrency": 16}
    results.append_run(path, results.new_run("parallel", "pagedllm", settings, {"data": newer}))
    header, rows = parallel_table(results.load_results(path))
    assert header[1:3] == ["1 process, 2 threads", "2 ranks of 1 thread"]
    assert rows[0][:2] == ["TP=2: decode batch 1 (tok/s)", "100.0"]
    assert rows[2][1:] == ["100.0", "180.0", "1.80×"]
