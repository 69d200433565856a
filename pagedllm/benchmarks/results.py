"""The results file: one JSON per date and machine, holding every run with its command and environment."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pagedllm.cpu import core_design

RESULTS_DIR = Path("benchmarks/results")
VERSIONED_PACKAGES = ("pagedllm", "torch", "transformers", "gguf", "numpy", "httpx")


@dataclass(frozen=True)
class Machine:
    """What the numbers were measured on."""

    name: str
    cpu_model: str
    cpu_count: int
    platform: str
    python: str
    core_design: str = ""  # cpu.core_design(); files written before it was recorded lack it

    @property
    def description(self) -> str:
        """'AMD EPYC (Zen 4, 2 CPUs)'"""
        return f"{self.cpu_model} ({', '.join(filter(None, (self.core_design, f'{self.cpu_count} CPUs')))})"


@dataclass
class Run:
    """One benchmark run: its kind ('serve', 'offline'), the engine measured and its numbers."""

    kind: str
    engine: str
    command: str
    started_at: str
    versions: dict[str, str]
    settings: dict[str, Any]
    results: dict[str, Any]


@dataclass
class ResultsFile:
    machine: Machine
    runs: list[Run] = field(default_factory=list)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_name(model: str, design: str, count: int) -> str:
    """'amd-epyc-zen-4-2cpu': one model name covers machines of different speed (AMD EPYC is Zen 2 to Zen 5), so
    the core design is part of the name unless the model name already says it."""
    model = re.sub(r"\(.*?\)", "", model)
    words = model if design.lower() in model.lower() else f"{model} {design}"
    return f"{re.sub(r'[^a-z0-9]+', '-', words.lower()).strip('-')}-{count}cpu"


def this_machine() -> Machine:
    model = cpu_model()
    count = usable_cpu_count()
    design = core_design()
    return Machine(
        name=machine_name(model, design, count),
        cpu_model=model,
        cpu_count=count,
        platform=platform.platform(),
        python=platform.python_version(),
        core_design=design,
    )


def package_versions(extra: dict[str, str] | None = None) -> dict[str, str]:
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    versions.update(extra or {})
    return versions


def command_line() -> str:
    """The command that is running, as a person would retype it."""
    program = Path(sys.argv[0]).name
    return shlex.join([program, *sys.argv[1:]])


def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def default_results_path(machine: Machine | None = None) -> Path:
    """benchmarks/results/<date>-<machine>.json"""
    machine = machine or this_machine()
    return RESULTS_DIR / f"{datetime.date.today().isoformat()}-{machine.name}.json"


def add_output_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output-json",
        type=Path,
        default=None,
        help="results file to append to (default: benchmarks/results/<date>-<machine>.json)",
    )


def add_sizes_row_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes-row",
        default=None,
        help="file these numbers under a row of the model sizes table (as `bench sizes` does), "
        "not as the main offline rows",
    )


def new_run(
    kind: str, engine: str, settings: dict[str, Any], results: dict[str, Any], versions: dict[str, str] | None = None
) -> Run:
    return Run(kind, engine, command_line(), now_iso(), package_versions(versions), settings, results)


def append_run(path: Path, run: Run) -> None:
    """Add a run to the results file, creating it (and its folder) on first use."""
    if path.exists():
        document = json.loads(path.read_text())
        document.setdefault("runs", []).append(asdict(run))
    else:
        document = asdict(ResultsFile(this_machine(), [run]))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n")
    temporary.replace(path)


def load_results(path: Path) -> ResultsFile:
    document = json.loads(path.read_text())
    return ResultsFile(Machine(**document["machine"]), [Run(**run) for run in document.get("runs", [])])
