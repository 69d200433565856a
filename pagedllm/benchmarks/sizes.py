"""The model sizes tables: pagedllm beside llama.cpp on the same files (prefill, decode, resident memory).

`bench sizes` measures each file in rounds, the two engines one after the other in each round, because the host's
speed can drift by 2x within minutes: each engine's figure is its median over the rounds, and the ratio the median
of the rounds' own ratios (each measured minutes apart at most), with their range.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from pagedllm.benchmarks.results import ResultsFile

SUBJECT, PEER = "pagedllm", "llama.cpp"
MODEL_FILE_KIND = "model-file"  # a run that records a sizes row's file: its tensor bytes


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass
class SizeRow:
    """Each engine's rounds on one model file since the file was last recorded, or why an engine has none."""

    name: str
    tensor_bytes: int | None = None
    engines: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # engine → its runs' results, in order
    errors: dict[str, str] = field(default_factory=dict)  # engine → its one-line error

    def speeds(self, engine: str, kind: str, size: int) -> list[float | None]:
        """The engine's tok/s at one point in each of its rounds (None where a round lacks the point)."""
        key, size_key = ("prefill", "prompt_len") if kind == "prefill" else ("decode", "batch_size")
        return [
            next((p["tokens_per_s"] for p in results.get(key, []) if p[size_key] == size), None)
            for results in self.engines.get(engine, [])
        ]

    def speed(self, engine: str, kind: str, size: int) -> float | None:
        """The median over the rounds."""
        return _median([value for value in self.speeds(engine, kind, size) if value is not None])

    def round_ratios(self, kind: str, size: int) -> list[float]:
        """pagedllm ÷ llama.cpp within each round (the i-th run of one engine against the i-th of the other)."""
        pairs = zip(self.speeds(SUBJECT, kind, size), self.speeds(PEER, kind, size))
        return [ours / theirs for ours, theirs in pairs if ours and theirs]

    def memory(self, engine: str, name: str) -> int | None:
        """The median over the rounds."""
        values = [results.get("memory", {}).get(name) for results in self.engines.get(engine, [])]
        median = _median([value for value in values if value is not None])
        return None if median is None else round(median)

    def cell(self, engine: str, value: float | None, digits: int = 1) -> str:
        """A number, or 'unsupported'/'failed' where the engine could not run the file, or '–' if not measured."""
        if engine in self.errors:
            return "unsupported" if "unsupported" in self.errors[engine].lower() else "failed"
        return "–" if value is None else f"{value:,.{digits}f}"


def collect_size_rows(document: ResultsFile) -> dict[str, SizeRow]:
    """Rows in the order first seen. A row's model-file record starts a new `bench sizes` run of it, whose rounds
    replace the earlier ones; an engine's error replaces its numbers, and numbers after an error replace it."""
    rows: dict[str, SizeRow] = {}
    for run in document.runs:
        name = run.settings.get("sizes_row")
        if not name:
            continue
        if run.kind == MODEL_FILE_KIND:
            rows[name] = SizeRow(name, run.results["tensor_bytes"])
            continue
        row = rows.setdefault(name, SizeRow(name))
        if run.kind == "offline" and "error" in run.results:
            row.errors[run.engine] = run.results["error"]
            row.engines.pop(run.engine, None)
        elif run.kind == "offline":
            if row.errors.pop(run.engine, None) is not None:
                row.engines.pop(run.engine, None)
            row.engines.setdefault(run.engine, []).append(run.results)
    return rows


def _ratio(subject: float | None, peer: float | None) -> str:
    return "–" if not subject or not peer else f"{subject / peer:.2f}×"


def _round_ratio(ratios: list[float]) -> str:
    """The median of the rounds' ratios, with their range where there were several."""
    if not ratios:
        return "–"
    median = f"{statistics.median(ratios):.2f}×"
    return median if len(ratios) == 1 else f"{median} ({min(ratios):.2f}–{max(ratios):.2f})"


def _points(rows: dict[str, SizeRow]) -> list[tuple[str, int]]:
    """Every (kind, size) some engine measured, prefill first."""
    found = set()
    for row in rows.values():
        for runs in row.engines.values():
            for results in runs:
                found.update(("prefill", p["prompt_len"]) for p in results.get("prefill", []))
                found.update(("decode", d["batch_size"]) for d in results.get("decode", []))
    return sorted(found, key=lambda point: (point[0] != "prefill", point[1]))


def sizes_speed_table(document: ResultsFile) -> tuple[list[str], list[list[str]]] | None:
    """One row per (model, point): each engine's median tok/s over the rounds and the median of the rounds' ratios
    (with their range); None when no sizes run was recorded."""
    rows = collect_size_rows(document)
    if not rows:
        return None
    header = ["model", "tok/s", SUBJECT, PEER, f"{SUBJECT} ÷ {PEER}", "rounds"]
    table = []
    for row in rows.values():
        for kind, size in _points(rows):
            ours, theirs = row.speed(SUBJECT, kind, size), row.speed(PEER, kind, size)
            ratios = row.round_ratios(kind, size)
            name = f"prefill {size} tok" if kind == "prefill" else f"decode batch {size}"
            table.append([
                row.name, name, row.cell(SUBJECT, ours), row.cell(PEER, theirs), _round_ratio(ratios),
                str(len(ratios)) if ratios else "–",
            ])  # fmt: skip
    return header, table


def _mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def sizes_memory_table(document: ResultsFile) -> tuple[list[str], list[list[str]]] | None:
    """One row per model: the file's tensors, pagedllm's weights and KV cache (from the engine), each engine's
    peak RSS (pagedllm's process; llama-bench's process for llama.cpp), and pagedllm's peak over the file's tensors
    plus its KV cache (the measure the 1.1x memory bar is stated in)."""
    rows = collect_size_rows(document)
    if not rows:
        return None
    header = [
        "model", "file tensors MiB", f"{SUBJECT} weights MiB", "weights ÷ file", f"{SUBJECT} KV cache MiB",
        f"{SUBJECT} peak RSS MiB", f"{SUBJECT} peak ÷ (file + KV)", f"{PEER} peak RSS MiB",
        f"peak RSS: {SUBJECT} ÷ {PEER}",
    ]  # fmt: skip
    table = []
    for row in rows.values():
        weights = row.memory(SUBJECT, "weight_bytes")
        ours, theirs = row.memory(SUBJECT, "peak_rss_bytes"), row.memory(PEER, "peak_rss_bytes")
        kv_cache = row.memory(SUBJECT, "kv_cache_bytes")
        held = None if row.tensor_bytes is None or kv_cache is None else row.tensor_bytes + kv_cache
        table.append([
            row.name, "–" if row.tensor_bytes is None else f"{_mib(row.tensor_bytes):,.0f}",
            row.cell(SUBJECT, _mib(weights), 0), _ratio(weights, row.tensor_bytes),
            row.cell(SUBJECT, _mib(kv_cache), 0), row.cell(SUBJECT, _mib(ours), 0), _ratio(ours, held),
            row.cell(PEER, _mib(theirs), 0), _ratio(ours, theirs),
        ])  # fmt: skip
    return header, table


def sizes_notes(document: ResultsFile) -> list[str]:
    """Why an engine has no numbers for a model, one line each."""
    return [
        f"{engine} on {row.name}: {error}"
        for row in collect_size_rows(document).values()
        for engine, error in row.errors.items()
    ]
