"""The parallelism results as tables: tensor, data and pipeline parallelism measured on one machine
(`bench parallel`) and the scaling model's predictions across nodes (`bench scaling`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pagedllm.benchmarks.markdown import markdown_table
from pagedllm.benchmarks.results import ResultsFile, Run
from pagedllm.benchmarks.scaling_model import STRATEGIES


def _latest_part(document: ResultsFile, part: str) -> Run | None:
    runs = [run for run in document.runs if run.kind == "parallel" and part in run.results]
    return runs[-1] if runs else None


def parallel_table(document: ResultsFile) -> tuple[list[str], list[list[str]]] | None:
    """Header and rows from the latest `bench parallel` run of each part (tensor, data, pipeline); None when there
    is none."""
    tensor_run, data_run = _latest_part(document, "tensor"), _latest_part(document, "data")
    pipeline_run = _latest_part(document, "pipeline")
    first = tensor_run or data_run or pipeline_run
    if first is None:
        return None
    settings = first.settings
    size, threads = settings["world_size"], settings["threads_per_rank"]
    header = [
        "measure",
        f"1 process, {size * threads} threads",
        f"{size} ranks of {threads} thread{'s' if threads > 1 else ''}",
        "parallel ÷ 1 process",
    ]
    rows = []
    if tensor_run is not None:
        tensor, prompt_len = tensor_run.results["tensor"], tensor_run.settings["prompt_len"]
        single, parallel = tensor["single"], tensor["tensor_parallel"]
        rows += [
            [
                f"TP={size}: decode batch 1 (tok/s)",
                f"{single['decode_tokens_per_s']:.1f}",
                f"{parallel['decode_tokens_per_s']:.1f}",
                f"{tensor['decode_ratio']:.2f}×",
            ],
            [
                f"TP={size}: prefill {prompt_len} tokens (tok/s)",
                f"{prompt_len / single['prefill_seconds']:.0f}",
                f"{prompt_len / parallel['prefill_seconds']:.0f}",
                f"{tensor['prefill_ratio']:.2f}×",
            ],
        ]
    if data_run is not None:
        data = data_run.results["data"]
        rows.append(
            [
                f"DP={size}: serving, concurrency {data_run.settings['concurrency']} (output tok/s)",
                f"{data['single']['output_tokens_per_s']:.1f}",
                f"{data['data_parallel']['output_tokens_per_s']:.1f}",
                f"{data['throughput_ratio']:.2f}×",
            ]
        )
    if pipeline_run is not None:
        pipeline, concurrency = pipeline_run.results["pipeline"], pipeline_run.settings["concurrency"]
        for key, ratio, how in (
            ("micro_batches", "throughput_ratio", "micro-batches"),
            ("one_at_a_time", "one_at_a_time_ratio", "one step at a time"),
        ):
            rows.append(
                [
                    f"PP={size}, {how}: serving, concurrency {concurrency} (output tok/s)",
                    f"{pipeline['single']['output_tokens_per_s']:.1f}",
                    f"{pipeline[key]['output_tokens_per_s']:.1f}",
                    f"{pipeline[ratio]:.2f}×",
                ]
            )
    return header, rows


def _value(value: float | None) -> str:
    """Three significant figures, or '–' where the split is not possible."""
    if value is None:
        return "–"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def scaling_tables(record: dict[str, Any]) -> list[tuple[str, tuple[list[str], list[list[str]]]]]:
    """One (model name, table) per model: a row per node count, per strategy decode tok/s, prefill s, serving tok/s."""
    by_model: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
    for prediction in record["predictions"]:
        by_model.setdefault(prediction["model"], {})[(prediction["strategy"], prediction["nodes"])] = prediction
    header = ["nodes"]
    for strategy in STRATEGIES:
        short = {"tensor": "TP", "pipeline": "PP", "data": "DP"}[strategy]
        header += [f"{short} decode b1 tok/s", f"{short} prefill {record['prompt_len']} s", f"{short} serve tok/s"]
    tables = []
    for name, points in by_model.items():
        rows = []
        for nodes in sorted({n for _, n in points}):
            row = [str(nodes)]
            for strategy in STRATEGIES:
                point = points[(strategy, nodes)]
                row += [_value(point[key]) for key in ("decode_tokens_per_s", "prefill_s", "serve_output_tokens_per_s")]
            rows.append(row)
        tables.append((name, (header, rows)))
    return tables


def assumptions(record: dict[str, Any]) -> str:
    """The model's inputs and rules, in words, for the README under its tables."""
    c, network = record["calibration"], record["network"]
    shm = c["intra_node_all_reduce"]
    check = record["tensor_check"]
    return (
        f"A node is the machine measured, one process with all its cores: batch-1 decode "
        f"{1 / c['decode_step_s']:.1f} tok/s, prefill of {c['prompt_len']} tokens {c['prefill_s'] * 1e3:.0f} ms, "
        f"serving {c['serve_output_tokens_per_s']:.1f} output tok/s at concurrency {c['concurrency']} "
        f"(`bench parallel`'s one-process points); {c['bits_per_weight']:.2f} bits per stored weight (the measured "
        f"model's weight bytes). Other shapes scale decode by weight bytes read per token and prefill and serving by "
        f"FLOPs per token. TP: {c['ranks_per_node']} ranks per node, 2 all-reduces per layer of hidden × tokens "
        f"{c['activation_bytes']}-byte values, over shared memory in a node ({shm['latency_s'] * 1e6:.1f} µs + "
        f"{shm['seconds_per_byte'] * 1e9:.3f} ns/byte, fitted to `bench allreduce`) and a ring across nodes; "
        f"TP needs a head per rank and PP a layer per stage (else –). Network between nodes "
        f"{network['bandwidth_bits_per_s'] / 1e9:g} Gb/s, {network['latency_s'] * 1e6:g} µs per message. PP: one "
        f"send of the hidden states per stage boundary; serving runs {record['micro_batches_per_stage']} "
        f"micro-batches of {c['concurrency']} requests per stage (bubble (p − 1)/(m + p − 1)). DP: independent "
        f"replicas. Not modelled: fixed per-step costs, the logits gather, overlap of communication and compute, "
        f"memory limits, and ranks' uneven shares of the heads. Check on "
        f"one node: TP={c['ranks_per_node']} ÷ one process measured "
        f"{check['decode_ratio_measured']:.2f}× (decode) and {check['prefill_ratio_measured']:.2f}× (prefill), "
        f"predicted {check['decode_ratio_predicted']:.2f}× and {check['prefill_ratio_predicted']:.2f}×."
    )


def scaling_plot_path(results_path: Path) -> Path:
    """Where `bench scaling` draws its plot: beside the results file."""
    return results_path.with_name(f"{results_path.stem}-scaling.png")


def parallel_sections(document: ResultsFile, level: int, plot: str | None) -> list[str]:
    """Headings (at markdown `level`) and tables of the measured TP and DP, then the latest scaling predictions
    with their assumptions and `plot` (a link to the PNG) where given."""
    heading = "#" * level
    sections = []
    table = parallel_table(document)
    if table:
        sections += [f"{heading} Tensor, data and pipeline parallelism on one machine", markdown_table(*table)]
    scaling = [run for run in document.runs if run.kind == "scaling"]
    if scaling:
        record = scaling[-1].results
        sections += [f"{heading} Scaling model: predictions for 1 to 64 nodes", assumptions(record)]
        sections += [f"{name}:\n\n{markdown_table(*table)}" for name, table in scaling_tables(record)]
        if plot:
            sections.append(f"![scaling]({plot})")
    return sections
