"""`pagedllm bench report`: a results file → markdown tables (with ratios to each peer) and PNG plots."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagedllm.benchmarks.markdown import markdown_table
from pagedllm.benchmarks.parallel_report import parallel_sections, scaling_plot_path
from pagedllm.benchmarks.results import ResultsFile, Run, default_results_path, load_results
from pagedllm.benchmarks.sizes import sizes_memory_table, sizes_notes, sizes_speed_table
from pagedllm.benchmarks.throughput import DecodePoint, OfflineThroughput, PrefillPoint, RequestThroughput
from pagedllm.benchmarks.variants import BASELINE, variants_table
from pagedllm.model.registry import model_display_name

logger = logging.getLogger(__name__)

SUBJECT = "pagedllm"
README_START = "<!-- bench-results:start -->"
README_END = "<!-- bench-results:end -->"
PARALLEL_START = "<!-- parallel-results:start -->"
PARALLEL_END = "<!-- parallel-results:end -->"
SIZES_START = "<!-- sizes-results:start -->"
SIZES_END = "<!-- sizes-results:end -->"
PARALLEL_KINDS = ("allreduce", "parallel", "scaling")


@dataclass(frozen=True)
class ServePoint:
    """One serving run of one engine at one concurrency."""

    engine: str
    concurrency: int
    metrics: dict[str, Any]
    peak_rss_bytes: int | None
    memory_budget: dict[str, int] | None = None  # the server's own weight and KV-cache bytes

    def rss_beyond_budget_mib(self) -> str:
        """Peak RSS less the weights and the KV cache, the memory target's measure; '–' where unknown."""
        if self.peak_rss_bytes is None or not self.memory_budget:
            return "–"
        return f"{(self.peak_rss_bytes - sum(self.memory_budget.values())) / 2**20:.0f}"


def offline_from_run(run: Run) -> OfflineThroughput:
    return OfflineThroughput(
        prefill=[PrefillPoint(**point) for point in run.results["prefill"]],
        decode=[DecodePoint(**point) for point in run.results["decode"]],
    )


def latest_offline(document: ResultsFile) -> dict[str, OfflineThroughput]:
    """The last offline run of each engine, the subject first."""
    found: dict[str, OfflineThroughput] = {}
    for run in document.runs:
        if run.kind == "offline" and not run.settings.get("variant") and not run.settings.get("sizes_row"):
            found[run.engine] = offline_from_run(run)
    return dict(sorted(found.items(), key=lambda item: item[0] != SUBJECT))


def sharegpt_workload(settings: dict[str, Any], num_requests: int) -> str:
    """e.g. 'ShareGPT, 200 requests, output 64 tok' (the output cap only where one was set)."""
    cap = settings.get("sharegpt_output_len")
    return f"ShareGPT, {num_requests} requests" + (f", output {cap} tok" if cap else "")


def latest_sharegpt(document: ResultsFile) -> dict[str, dict[str, RequestThroughput]]:
    """By workload, the last offline ShareGPT run of each engine, the subject first."""
    found: dict[str, dict[str, RequestThroughput]] = defaultdict(dict)
    for run in document.runs:
        if run.kind == "offline" and "sharegpt" in run.results and not run.settings.get("variant"):
            throughput = RequestThroughput(**run.results["sharegpt"])
            found[sharegpt_workload(run.settings, throughput.num_requests)][run.engine] = throughput
    return {
        workload: dict(sorted(engines.items(), key=lambda item: item[0] != SUBJECT))
        for workload, engines in found.items()
    }


def workload_name(settings: dict[str, Any]) -> str:
    """What a serving run loaded the server with, e.g. 'sharegpt, 200 prompts, rate inf'."""
    dataset = settings["dataset"]
    if dataset == "random":
        dataset = f"random {settings['input_len']}→{settings['output_len']}"
    return f"{dataset}, {settings['num_prompts']} prompts, rate {settings['request_rate']}"


def serve_points(document: ResultsFile) -> dict[str, list[ServePoint]]:
    """Serving runs by workload; the last run of each (engine, concurrency) wins; sorted by concurrency."""
    latest: dict[str, dict[tuple[str, int], ServePoint]] = defaultdict(dict)
    for run in document.runs:
        if run.kind != "serve":
            continue
        concurrency = run.settings["max_concurrency"] or run.settings["num_prompts"]
        point = ServePoint(
            run.engine,
            concurrency,
            run.results["metrics"],
            run.results.get("peak_rss_bytes"),
            run.results.get("memory_budget"),
        )
        latest[workload_name(run.settings)][(run.engine, concurrency)] = point
    return {
        workload: sorted(points.values(), key=lambda p: (p.concurrency, p.engine != SUBJECT, p.engine))
        for workload, points in latest.items()
    }


def ratio(subject: float | None, peer: float | None) -> str:
    if not subject or not peer:
        return "–"
    return f"{subject / peer:.2f}×"


def format_offline(engine: str, throughput: OfflineThroughput) -> str:
    """A short plain-text summary of one engine's offline numbers, for the terminal."""
    parts = [f"prefill {p.prompt_len}: {p.tokens_per_s:.1f} tok/s" for p in throughput.prefill]
    parts += [f"decode batch {d.batch_size}: {d.tokens_per_s:.1f} tok/s" for d in throughput.decode]
    return f"==== {engine} (offline) ====\n" + "\n".join(parts)


def format_request_throughput(engine: str, throughput: RequestThroughput) -> str:
    """One line for the terminal: a ShareGPT run's three throughputs."""
    return (
        f"==== {engine} (ShareGPT, {throughput.num_requests} requests in {throughput.seconds:.1f} s) ====\n"
        f"{throughput.requests_per_s:.2f} req/s, {throughput.output_tokens_per_s:.1f} output tok/s, "
        f"{throughput.total_tokens_per_s:.1f} total tok/s"
    )


def sharegpt_markdown(engines: dict[str, RequestThroughput]) -> str:
    """Rows: req/s, output tok/s, total tok/s; columns: each engine, then subject ÷ each peer."""
    ratio_peers = [engine for engine in engines if engine != SUBJECT] if SUBJECT in engines else []
    header = ["", *engines, *(f"{SUBJECT} ÷ {peer}" for peer in ratio_peers)]
    rows = []
    for name, attribute, digits in (
        ("req/s", "requests_per_s", 2),
        ("output tok/s", "output_tokens_per_s", 1),
        ("total tok/s", "total_tokens_per_s", 1),
    ):
        values = {engine: getattr(throughput, attribute) for engine, throughput in engines.items()}
        row = [name, *(f"{value:.{digits}f}" for value in values.values())]
        rows.append(row + [ratio(values[SUBJECT], values[peer]) for peer in ratio_peers])
    return markdown_table(header, rows)


def offline_markdown(engines: dict[str, OfflineThroughput]) -> str:
    """Rows: prefill lengths and decode batch sizes; columns: tok/s per engine, then subject ÷ each peer."""
    peers = [engine for engine in engines if engine != SUBJECT]
    # (0, prompt_len) rows are prefill, (1, batch_size) rows are decode: the sort order of the table.
    values: dict[tuple[int, int], dict[str, float]] = defaultdict(dict)
    for engine, throughput in engines.items():
        for p in throughput.prefill:
            values[(0, p.prompt_len)][engine] = p.tokens_per_s
        for d in throughput.decode:
            values[(1, d.batch_size)][engine] = d.tokens_per_s
    ratio_peers = peers if SUBJECT in engines else []
    header = ["tok/s", *engines, *(f"{SUBJECT} ÷ {peer}" for peer in ratio_peers)]
    rows = []
    for (kind, size), by_engine in sorted(values.items()):
        name = f"prefill {size} tok" if kind == 0 else f"decode batch {size}"
        row = [name, *(f"{by_engine[e]:.1f}" if e in by_engine else "–" for e in engines)]
        rows.append(row + [ratio(by_engine.get(SUBJECT), by_engine.get(peer)) for peer in ratio_peers])
    return markdown_table(header, rows)


def serve_markdown(points: list[ServePoint]) -> str:
    """One row per (concurrency, engine); a peer's row ends with subject ÷ peer (latency ratios < 1 favour us)."""
    subject_at = {p.concurrency: p for p in points if p.engine == SUBJECT}
    header = [
        "concurrency", "engine", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms",
        "ITL p50 ms", "E2E p50 ms", "peak RSS MiB", "RSS − weights − KV MiB",
    ]  # fmt: skip
    if subject_at:
        header += [f"out tok/s: {SUBJECT} ÷ it", f"TTFT p50: {SUBJECT} ÷ it", f"TPOT p50: {SUBJECT} ÷ it"]
    rows = []
    for p in points:
        m = p.metrics
        row = [
            str(p.concurrency), p.engine, f"{m['request_throughput']:.2f}", f"{m['output_throughput']:.1f}",
            f"{m['ttft_ms']['median']:.0f}", f"{m['ttft_ms']['p99']:.0f}",
            f"{m['tpot_ms']['median']:.1f}", f"{m['tpot_ms']['p99']:.1f}",
            f"{m['itl_ms']['median']:.1f}", f"{m['e2e_latency_ms']['median']:.0f}",
            "–" if p.peak_rss_bytes is None else f"{p.peak_rss_bytes / 2**20:.0f}", p.rss_beyond_budget_mib(),
        ]  # fmt: skip
        if subject_at:
            subject = subject_at.get(p.concurrency)
            if subject is None or p.engine == SUBJECT:
                row += ["", "", ""]
            else:
                row += [
                    ratio(subject.metrics["output_throughput"], m["output_throughput"]),
                    ratio(subject.metrics["ttft_ms"]["median"], m["ttft_ms"]["median"]),
                    ratio(subject.metrics["tpot_ms"]["median"], m["tpot_ms"]["median"]),
                ]
        rows.append(row)
    return markdown_table(header, rows)


def prefix_markdown(record: dict[str, Any]) -> str:
    """Prefix caching on and off: prefill tokens computed and TTFT of the first and the later chats."""
    header = ["prefix caching", "prefill tokens computed", "TTFT first ms", "TTFT p50 of the rest ms"]
    rows = [
        [
            "on" if mode == "cached" else "off",
            str(record[f"{mode}_summary"]["computed_prefill_tokens"]),
            f"{record[f'{mode}_summary']['first_ttft_s'] * 1e3:.0f}",
            f"{record[f'{mode}_summary']['median_later_ttft_s'] * 1e3:.0f}",
        ]
        for mode in ("cached", "uncached")
    ]
    figures = (
        f"Prefill tokens computed drop by {record['prefill_tokens_drop']:.1%} with caching on; "
        f"the later chats' median TTFT is {record['ttft_first_over_median_later']:.1f}× lower than the first's."
    )
    return markdown_table(header, rows) + "\n\n" + figures


def structured_markdown(record: dict[str, Any]) -> str:
    """Rows: each kind of request at each concurrency, its TPOT against free generation's; then compile times."""
    header = ["concurrency", "request", "TPOT p50 ms", "TPOT p99 ms", "out tok/s", "TPOT p50 ÷ free", "failed"]
    free = {p["concurrency"]: p["metrics"] for p in record["points"] if p["kind"] == "free"}
    rows = []
    for point in record["points"]:
        m = point["metrics"]
        rows.append(
            [
                str(point["concurrency"]), point["kind"], f"{m['tpot_ms']['median']:.1f}", f"{m['tpot_ms']['p99']:.1f}",
                f"{m['output_throughput']:.1f}",
                ratio(m["tpot_ms"]["median"], free[point["concurrency"]]["tpot_ms"]["median"]),
                str(m["failed"]),
            ]
        )  # fmt: skip
    compiles = record["compile"]
    figures = (
        f"Schema compile time over the {compiles['num_schemas']} schemas of the test table, each compiled "
        f"{compiles['rounds']} times: p50 {compiles['p50_ms']:.2f} ms, p99 {compiles['p99_ms']:.2f} ms."
    )
    return markdown_table(header, rows) + "\n\n" + figures


def speculative_markdown(record: dict[str, Any]) -> str:
    """Rows: each prompt set and concurrency, speculation off beside on (batch-1 decode tok/s, or output tok/s with
    the requests at once), acceptance; then llama.cpp's batch-1 decode on the same file."""
    header = ["set", "requests at once", "off tok/s", "on tok/s", "on ÷ off", "accepted", "tokens per verification"]
    header.append("identical to off")
    points = record["points"]
    offs = {(p["prompt_set"], p.get("concurrency", 1)): p for p in points if p["speculation"] == "off"}

    def speed(point: dict[str, Any]) -> float:
        key = "decode_tokens_per_second" if point.get("concurrency", 1) == 1 else "output_tokens_per_second"
        return point[key]

    rows = []
    for on in (p for p in points if p["speculation"] != "off"):
        off = offs[(on["prompt_set"], on.get("concurrency", 1))]
        rows.append(
            [
                on["prompt_set"], str(on.get("concurrency", 1)), f"{speed(off):.1f}", f"{speed(on):.1f}",
                ratio(speed(on), speed(off)), f"{on['acceptance_rate']:.0%}", f"{on['mean_accepted_length']:.2f}",
                f"{on['identical_outputs']}/{on['num_requests']}",
            ]
        )  # fmt: skip
    table = markdown_table(header, rows)
    llama_cpp = record.get("llama_cpp")
    grounded = [p for p in points if p["speculation"] != "off" and p["prompt_set"] == "grounded"]
    grounded = [p for p in grounded if p.get("concurrency", 1) == 1]
    if not llama_cpp or not grounded:
        return table
    peer = llama_cpp["decode_tokens_per_second"]
    return table + (
        f"\n\nllama.cpp's batch-1 decode on the same file (llama-bench tg): {peer:.1f} tok/s; pagedllm with "
        f"speculation on the grounded set: {ratio(speed(grounded[0]), peer)} that."
    )


def spec_model_name(settings: dict[str, Any]) -> str:
    """The model a speculative run measured (for runs that did not record its name: the engine's model setting)."""
    return settings.get("model_name") or model_display_name(settings.get("engine", {}).get("model"))


def latest_speculative(document: ResultsFile) -> dict[str, Run]:
    """The last speculative run of each model, the models in the order of their first runs."""
    latest: dict[str, Run] = {}
    for run in document.runs:
        if run.kind == "speculative":
            latest[spec_model_name(run.settings)] = run
    return latest


def speculative_section(run: Run) -> tuple[str, str]:
    """A speculative run's title and its table, with a note on prompts given as plain completion text."""
    settings = run.settings
    title = (
        f"Speculative decoding on {spec_model_name(settings)} ({json.dumps(settings['speculative_config'])}): "
        "batch-1 decode, and output throughput with requests at once, off and on"
    )
    table = speculative_markdown(run.results)
    if settings.get("prompt_format") == "completion":
        table += (
            "\n\nA base model without a chat template: each prompt is plain completion text, the question (chat) or "
            "the instruction and the text to hand back (grounded), then a cue to answer."
        )
    return title, table


def table_sections(document: ResultsFile, level: int) -> list[str]:
    """Headings (at markdown `level`) and tables: offline points, offline ShareGPT, then each serving workload."""
    heading = "#" * level
    sections = []
    offline = latest_offline(document)
    if offline:
        sections += [f"{heading} Offline throughput (tok/s, higher is better)", offline_markdown(offline)]
    for workload, engines in latest_sharegpt(document).items():
        sections += [
            f"{heading} Offline throughput ({workload}, all at once; higher is better)",
            sharegpt_markdown(engines),
        ]
    for workload, points in serve_points(document).items():
        sections += [f"{heading} Serving: {workload}", serve_markdown(points)]
    prefix = [run for run in document.runs if run.kind == "prefix"]
    if prefix:
        run = prefix[-1]
        settings = run.settings
        title = (
            f"Shared system prompt (~{settings['system_prompt_tokens']} tokens, "
            f"{settings['num_requests']} chats one after another)"
        )
        sections += [f"{heading} {title}", prefix_markdown(run.results)]
    structured = [run for run in document.runs if run.kind == "structured"]
    if structured:
        settings = structured[-1].settings
        title = (
            f"Structured outputs: time per output token against free generation ({settings['num_prompts']} "
            f"chat requests of {settings['output_len']} tokens per row)"
        )
        sections += [f"{heading} {title}", structured_markdown(structured[-1].results)]
    for run in latest_speculative(document).values():
        title, table = speculative_section(run)
        sections += [f"{heading} {title}", table]
    variants = variants_table(document)
    if variants:
        sections += [
            f"{heading} Quantization: perplexity, memory and speed against {BASELINE}",
            markdown_table(*variants),
        ]
    return sections


def sizes_sections(document: ResultsFile, level: int) -> list[str]:
    """`bench sizes`' two tables, speed and resident memory, with why an engine has no numbers for a model."""
    speeds, memory = sizes_speed_table(document), sizes_memory_table(document)
    if not speeds or not memory:
        return []
    heading = "#" * level
    notes = "".join(f"\n- {note}" for note in sizes_notes(document))
    return [
        f"{heading} Model sizes: pagedllm and llama.cpp on the same files (tok/s, higher is better)",
        markdown_table(*speeds),
        f"{heading} Model sizes: resident memory",
        markdown_table(*memory) + ("\n" + notes if notes else ""),
    ]


def is_main_run(run: Run) -> bool:
    """A run of the README's main results section: neither `bench sizes`' nor the parallelism benchmarks'."""
    return not run.settings.get("sizes_row") and run.kind not in PARALLEL_KINDS


def markdown_report(document: ResultsFile, plot: Path | None = None) -> str:
    machine = document.machine
    sections = [
        f"# Benchmarks on {machine.description}",
        f"{machine.platform}, Python {machine.python}",
    ]
    sections += table_sections(document, level=2)
    sections += sizes_sections(document, level=2)
    sections += parallel_sections(document, level=2, plot=plot.name if plot else None)
    commands = sorted({run.command for run in document.runs})
    versions = {f"{key} {value}" for run in document.runs for key, value in run.versions.items()}
    sections += [
        "## Commands",
        "\n".join(f"- `{command}`" for command in commands),
        "## Versions",
        ", ".join(sorted(versions)),
    ]
    return "\n\n".join(sections) + "\n"


def plot_serving(points: list[ServePoint], workload: str, path: Path) -> None:
    """Throughput, TTFT and TPOT (p50 solid, p99 dashed) against concurrency, one line per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    by_engine: dict[str, list[ServePoint]] = defaultdict(list)
    for point in points:
        by_engine[point.engine].append(point)
    for index, (engine, engine_points) in enumerate(by_engine.items()):
        color = f"C{index}"
        x = [p.concurrency for p in engine_points]
        axes[0].plot(x, [p.metrics["output_throughput"] for p in engine_points], "o-", color=color, label=engine)
        for axis, metric in ((axes[1], "ttft_ms"), (axes[2], "tpot_ms")):
            axis.plot(x, [p.metrics[metric]["median"] for p in engine_points], "o-", color=color, label=f"{engine} p50")
            axis.plot(x, [p.metrics[metric]["p99"] for p in engine_points], "s--", color=color, label=f"{engine} p99")
    titles = ("output throughput (tok/s)", "TTFT (ms)", "TPOT (ms)")
    for axis, title in zip(axes, titles, strict=True):
        axis.set_title(title)
        axis.set_xlabel("max concurrency")
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted({p.concurrency for p in points}))
        axis.xaxis.set_major_formatter(ScalarFormatter())
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(workload)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def readme_markdown(
    document: ResultsFile, results_path: Path, markdown_path: Path, pngs: list[Path], readme: Path
) -> str:
    """The README's results section: where and when, the tables, and the plots (links relative to the README)."""

    def link(path: Path) -> str:
        return _relative_link(path, readme)

    machine = document.machine
    measured_on = max((run.started_at for run in document.runs if is_main_run(run)), default="")[:10]
    sections = [
        f"Measured on {machine.description} on {measured_on}; "
        f"results file [`{results_path.name}`]({link(results_path)}), commands and versions in "
        f"[`{markdown_path.name}`]({link(markdown_path)}). Generated by `pagedllm bench report`.",
        *table_sections(document, level=3),
        *(f"![{png.stem}]({link(png)})" for png in pngs),
    ]
    return "\n\n".join(sections) + "\n"


def sizes_readme_markdown(document: ResultsFile, results_path: Path, readme: Path) -> str:
    """The README's model sizes results: where, when and how, and the two tables."""
    sized = [run for run in document.runs if run.settings.get("sizes_row")]
    intro = (
        f"Measured on {document.machine.description} on {max(run.started_at for run in sized)[:10]} by "
        "`pagedllm bench sizes` (each engine's median over rounds in which the two take turns; the ratio is the "
        "median of the rounds' own ratios, their range in brackets); results file "
        f"[`{results_path.name}`]({_relative_link(results_path, readme)}). Generated by `pagedllm bench report`."
    )
    return "\n\n".join([intro, *sizes_sections(document, level=3)]) + "\n"


def parallel_readme_markdown(document: ResultsFile, results_path: Path, plot: Path | None, readme: Path) -> str:
    """The README's parallelism results: where, when and by which commands, the tables and the scaling plot."""
    machine = document.machine
    measured_on = max((run.started_at for run in document.runs if run.kind in PARALLEL_KINDS), default="")[:10]
    intro = (
        f"Measured on {machine.description} on {measured_on} by `make bench` "
        f"(`pagedllm bench allreduce`, `pagedllm bench parallel`, then `pagedllm bench scaling` on their results); "
        f"results file [`{results_path.name}`]({_relative_link(results_path, readme)}). Generated by "
        "`pagedllm bench report`."
    )
    link = _relative_link(plot, readme) if plot else None
    return "\n\n".join([intro, *parallel_sections(document, level=4, plot=link)]) + "\n"


def _relative_link(path: Path, readme: Path) -> str:
    return Path(os.path.relpath(path.resolve(), readme.parent.resolve())).as_posix()


def replace_between_markers(text: str, generated: str, start: str = README_START, end: str = README_END) -> str:
    """`text` with what lies between the `start` and `end` lines replaced by `generated`."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == start]
    ends = [i for i, line in enumerate(lines) if line.strip() == end]
    if len(starts) != 1 or len(ends) != 1 or starts[0] > ends[0]:
        raise ValueError(f"expected one {start!r} line followed by one {end!r} line")
    return "".join([*lines[: starts[0] + 1], "\n", generated, "\n", *lines[ends[0] :]])


def update_readme(readme: Path, generated: str, start: str = README_START, end: str = README_END) -> bool:
    """Rewrite the README's section between `start` and `end`; False (with a warning) where the file or its
    markers are missing."""
    if not readme.is_file():
        logger.warning("%s not found: its results section is not updated", readme)
        return False
    text = readme.read_text()
    if start not in text and end not in text:
        logger.warning("%s has no %s / %s lines: its results section is not updated", readme, start, end)
        return False
    readme.write_text(replace_between_markers(text, generated, start, end))
    return True


def write_report(results_path: Path, markdown_path: Path | None = None, readme: Path | None = None) -> list[Path]:
    """Write <results>.md, one <results>-serve-<n>.png per serving workload and, given `readme`, its sections
    (main results, model sizes, parallelism) that the file has runs for; return the paths written."""
    document = load_results(results_path)
    markdown_path = markdown_path or results_path.with_suffix(".md")
    plot = scaling_plot_path(results_path)
    plot = plot if plot.is_file() else None
    markdown_path.write_text(markdown_report(document, plot))
    pngs = []
    for index, (workload, points) in enumerate(serve_points(document).items()):
        png = results_path.with_name(f"{results_path.stem}-serve-{index}.png")
        plot_serving(points, workload, png)
        pngs.append(png)
    written = [markdown_path, *pngs]
    if readme is None:
        return written
    # Each README section is rewritten only from a file that holds its runs, so that a file of one benchmark
    # (e.g. `bench sizes` alone, on another machine) leaves the others' sections as they were.
    sections = []
    if any(is_main_run(run) for run in document.runs):
        sections.append(
            (readme_markdown(document, results_path, markdown_path, pngs, readme), README_START, README_END)
        )
    if sizes_speed_table(document):
        sections.append((sizes_readme_markdown(document, results_path, readme), SIZES_START, SIZES_END))
    if any(run.kind in ("parallel", "scaling") for run in document.runs):
        sections.append((parallel_readme_markdown(document, results_path, plot, readme), PARALLEL_START, PARALLEL_END))
    if any([update_readme(readme, text, start, end) for text, start, end in sections]):
        written.append(readme)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "results", type=Path, nargs="?", default=None, help="results file (default: today's for this machine)"
    )
    parser.add_argument(
        "--output-md", type=Path, default=None, help="markdown file (default: next to the results, .md)"
    )
    parser.add_argument(
        "--readme",
        type=Path,
        default=Path("README.md"),
        help=f"README whose section between {README_START} and {README_END} is rewritten (default: README.md)",
    )


def run(args: argparse.Namespace) -> int:
    for path in write_report(args.results or default_results_path(), args.output_md, args.readme):
        print(f"wrote {path}")
    return 0
