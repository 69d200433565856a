"""`pagedllm bench scaling`: tensor, pipeline and data parallelism on 1 to 64 nodes, predicted by a model calibrated
by this machine's `bench parallel` and `bench allreduce` runs."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pagedllm.benchmarks import results
from pagedllm.benchmarks.markdown import markdown_table
from pagedllm.benchmarks.parallel_report import assumptions, scaling_plot_path, scaling_tables
from pagedllm.benchmarks.results import ResultsFile, Run, load_results
from pagedllm.benchmarks.scaling_model import (
    LLAMA_8B,
    STRATEGIES,
    Calibration,
    LinearCost,
    ModelShape,
    Network,
    Prediction,
    ScalingModel,
)
from pagedllm.benchmarks.throughput import int_tuple
from pagedllm.model.registry import model_display_name

NODES = (1, 2, 4, 8, 16, 32, 64)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
STYLES = {"tensor": "o-", "pipeline": "s--", "data": "^:"}  # PP and DP share their batch-1 lines


class CalibrationError(ValueError):
    """The results file lacks a measurement the model is calibrated by."""


def _latest(document: ResultsFile, kind: str, part: str | None = None) -> Run:
    runs = [run for run in document.runs if run.kind == kind and (part is None or part in run.results)]
    if not runs:
        what = f"`bench {kind}`" + (f" (its {part} part)" if part else "")
        raise CalibrationError(f"the results file has no {what} run to calibrate from")
    return runs[-1]


def calibration_from(document: ResultsFile) -> Calibration:
    """The latest TP and DP measurements' one-process points and the latest shared-memory all-reduce latencies."""
    tensor_run, data_run = _latest(document, "parallel", "tensor"), _latest(document, "parallel", "data")
    allreduce_run = _latest(document, "allreduce")
    tensor, data = tensor_run.results["tensor"], data_run.results["data"]
    shape = ModelShape(model_display_name(tensor_run.settings["model"]), **tensor["model_shape"])
    activation_bytes = DTYPE_BYTES[allreduce_run.settings["dtype"]]
    latencies = [
        (row["num_elements"] * activation_bytes, row["shared_memory_median_us"] * 1e-6)
        for row in allreduce_run.results["latencies"]
    ]
    return Calibration(
        shape=shape,
        bits_per_weight=tensor["weight_bytes"] * 8 / shape.stored_params(),
        decode_step_s=1 / tensor["single"]["decode_tokens_per_s"],
        prefill_s=tensor["single"]["prefill_seconds"],
        prompt_len=tensor_run.settings["prompt_len"],
        serve_output_tokens_per_s=data["single"]["output_tokens_per_s"],
        concurrency=data_run.settings["concurrency"],
        intra_node_all_reduce=LinearCost.fit(latencies),
        activation_bytes=activation_bytes,
        ranks_per_node=tensor_run.settings["world_size"],
    )


def predictions(model: ScalingModel, nodes: tuple[int, ...]) -> list[Prediction]:
    shapes = (model.calibration.shape, LLAMA_8B)
    return [model.predict(shape, strategy, n) for shape in shapes for strategy in STRATEGIES for n in nodes]


def measured_tensor_check(model: ScalingModel, document: ResultsFile) -> dict[str, float]:
    """The model's TP on one node (its ranks sharing it) beside the measured TP ratios."""
    tensor = _latest(document, "parallel", "tensor").results["tensor"]
    shape = model.calibration.shape
    one_node, single = model.tensor(shape, 1), model.data(shape, 1)
    if one_node.decode_tokens_per_s is None or one_node.prefill_s is None:
        raise CalibrationError(f"{shape.name} has fewer heads than the measured TP ranks")
    assert single.decode_tokens_per_s is not None and single.prefill_s is not None  # DP always applies
    return {
        "decode_ratio_measured": tensor["decode_ratio"],
        "decode_ratio_predicted": one_node.decode_tokens_per_s / single.decode_tokens_per_s,
        "prefill_ratio_measured": tensor["prefill_ratio"],
        "prefill_ratio_predicted": single.prefill_s / one_node.prefill_s,
    }


def plot_scaling(record: dict[str, Any], path: Path) -> None:
    """Decode tok/s, prefill seconds and serving tok/s against nodes: a row per model, a line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    models = list(dict.fromkeys(p["model"] for p in record["predictions"]))
    nodes = sorted({p["nodes"] for p in record["predictions"]})
    figure, axes = plt.subplots(len(models), 3, figsize=(15, 4.2 * len(models)), squeeze=False)
    metrics = (
        ("decode_tokens_per_s", "batch-1 decode (tok/s)"),
        ("prefill_s", f"prefill {record['prompt_len']} tokens (s)"),
        ("serve_output_tokens_per_s", f"serving, concurrency {record['calibration']['concurrency']} (tok/s)"),
    )
    for row, model in enumerate(models):
        for column, (key, title) in enumerate(metrics):
            axis = axes[row][column]
            for strategy in STRATEGIES:
                points = [
                    p
                    for p in record["predictions"]
                    if p["model"] == model and p["strategy"] == strategy and p[key] is not None
                ]
                axis.plot([p["nodes"] for p in points], [p[key] for p in points], STYLES[strategy], label=strategy)
            axis.set_title(f"{model}: {title}", fontsize=10)
            axis.set_xscale("log", base=2)
            axis.set_xticks(nodes)
            axis.xaxis.set_major_formatter(ScalarFormatter())
            axis.set_yscale("log")
            axis.set_xlabel("nodes")
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "results", type=Path, nargs="?", default=None, help="results file (default: today's for this machine)"
    )
    parser.add_argument("--network-gbit-s", type=float, default=25.0, help="bandwidth between nodes, Gb/s")
    parser.add_argument("--network-latency-us", type=float, default=20.0, help="latency of one message between nodes")
    parser.add_argument(
        "--micro-batches-per-stage", type=int, default=4, help="PP serving: micro-batches in flight per stage"
    )
    parser.add_argument("--nodes", type=int_tuple, default=NODES, help="node counts, comma-separated")


def run(args: argparse.Namespace) -> int:
    path = args.results or results.default_results_path()
    document = load_results(path)
    try:
        calibration = calibration_from(document)
        network = Network(args.network_gbit_s * 1e9, args.network_latency_us * 1e-6)
        model = ScalingModel(calibration, network, args.micro_batches_per_stage)
        tensor_check = measured_tensor_check(model, document)
    except CalibrationError as error:
        print(f"{path}: {error}")
        return 2
    record = {
        "calibration": asdict(calibration),
        "network": asdict(network),
        "micro_batches_per_stage": args.micro_batches_per_stage,
        "prompt_len": calibration.prompt_len,
        "tensor_check": tensor_check,
        "predictions": [asdict(p) for p in predictions(model, args.nodes)],
    }
    settings = {
        "network_gbit_s": args.network_gbit_s,
        "network_latency_us": args.network_latency_us,
        "micro_batches_per_stage": args.micro_batches_per_stage,
        "nodes": list(args.nodes),
    }
    results.append_run(path, results.new_run("scaling", "pagedllm", settings, record))
    for name, table in scaling_tables(record):
        print(f"==== {name} ====\n{markdown_table(*table)}")
    print(assumptions(record))
    plot_scaling(record, scaling_plot_path(path))
    print(f"results appended to {path}; plot {scaling_plot_path(path)}")
    return 0
