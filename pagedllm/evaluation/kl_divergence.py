"""KL divergence and top-1 agreement of a setting's next-token distributions against the float32 dequantized
reference, as `llama-perplexity --kl-divergence` reports them.

The reference (`dtype=float32, quantization=none`, the KV cache in float32) scores the same windows of the same
tokens first; its top logprobs per position are stored on disk, keyed by the model file, the tokens and the
windows, so every later setting of the same model reuses them. The engine gives the top `num_logprobs` tokens of a
distribution (and the scored token), not the whole vocabulary, so each position's KL is that of the two
distributions coarse-grained to the tokens both lists hold plus one outcome for the rest of the mass: a lower
bound of the full KL, equal to it as the mass outside the lists goes to 0 (the `covered_mass` of the result).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import math
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pagedllm.benchmarks import results
from pagedllm.config import EngineConfig
from pagedllm.evaluation.perplexity import add_corpus_arguments, corpus_tokens, scored_prompt_logprobs
from pagedllm.flags import add_dataclass_arguments, dataclass_from_args
from pagedllm.llm import LLM
from pagedllm.model.registry import resolve_model_path
from pagedllm.model.tokenizer import Tokenizer, cache_dir
from pagedllm.sampling_params import MAX_LOGPROBS

logger = logging.getLogger(__name__)

DEFAULT_NUM_LOGPROBS = MAX_LOGPROBS
REFERENCE_SETTINGS = {"dtype": "float32", "quantization": "none", "kv_cache_dtype": "auto"}
# Mass left outside a top list is floored here so a distribution that puts all its mass on the list still gives
# a finite KL when the other does not.
MIN_REST_MASS = 1e-12

Distribution = dict[int, float]  # token id → logprob, for the tokens known


@dataclass(frozen=True)
class KLDivergenceResult:
    mean_kl_divergence: float
    median_kl_divergence: float
    p99_kl_divergence: float
    max_kl_divergence: float
    top1_agreement: float  # fraction of positions whose most likely token is the reference's
    covered_mass: float  # mean reference probability of the tokens both lists hold
    tokens_scored: int
    num_logprobs: int
    seconds: float


def kl_divergence(reference: Distribution, test: Distribution) -> float:
    """KL(reference ‖ test) over the tokens both hold, the rest of each one's mass as one more outcome."""
    shared = reference.keys() & test.keys()
    kl = math.fsum(math.exp(reference[t]) * (reference[t] - test[t]) for t in shared)
    reference_rest = 1.0 - math.fsum(math.exp(reference[t]) for t in shared)
    test_rest = max(1.0 - math.fsum(math.exp(test[t]) for t in shared), MIN_REST_MASS)
    if reference_rest > MIN_REST_MASS:
        kl += reference_rest * (math.log(reference_rest) - math.log(test_rest))
    return max(kl, 0.0)


def most_likely(distribution: Distribution) -> int:
    return max(distribution, key=distribution.__getitem__)


def compare(
    reference: list[Distribution], test: list[Distribution], num_logprobs: int, seconds: float
) -> KLDivergenceResult:
    """Per-position KL and top-1 agreement of two runs over the same positions, summarized."""
    if len(reference) != len(test) or not reference:
        raise ValueError(f"need the same positions in both runs, got {len(reference)} and {len(test)}")
    kls = sorted(kl_divergence(r, t) for r, t in zip(reference, test, strict=True))
    agree = sum(most_likely(r) == most_likely(t) for r, t in zip(reference, test, strict=True))
    covered = [math.fsum(math.exp(r[k]) for k in r.keys() & t.keys()) for r, t in zip(reference, test, strict=True)]
    return KLDivergenceResult(
        mean_kl_divergence=math.fsum(kls) / len(kls),
        median_kl_divergence=statistics.median(kls),
        p99_kl_divergence=kls[min(len(kls) - 1, math.ceil(0.99 * len(kls)) - 1)],
        max_kl_divergence=kls[-1],
        top1_agreement=agree / len(kls),
        covered_mass=math.fsum(covered) / len(covered),
        tokens_scored=len(kls),
        num_logprobs=num_logprobs,
        seconds=seconds,
    )


def reference_config(config: EngineConfig, model: str | None) -> EngineConfig:
    """The setting's engine with float32 dense weights and cache: the reference it is measured against."""
    return replace(config, model=model if model is not None else config.model, **REFERENCE_SETTINGS)


def reference_cache_path(
    config: EngineConfig, token_ids: list[int], window: int, stride: int, num_logprobs: int
) -> Path:
    """Where the reference logprobs of these tokens and windows under this model are stored."""
    model = resolve_model_path(config.model).resolve()
    stat = model.stat() if model.is_file() else (model / "config.json").stat()
    key = json.dumps([str(model), stat.st_size, stat.st_mtime_ns, token_ids, window, stride, num_logprobs])
    return cache_dir() / "kl-reference" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def save_distributions(path: Path, distributions: list[Distribution]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps([[list(d), list(d.values())] for d in distributions]))
    temporary.replace(path)


def load_distributions(path: Path) -> list[Distribution]:
    return [dict(zip(ids, values, strict=True)) for ids, values in json.loads(path.read_text())]


def scored_distributions(
    config: EngineConfig, token_ids: list[int], window: int, stride: int, num_logprobs: int
) -> tuple[list[Distribution], float]:
    """Each scored position's top logprobs under an engine of `config`, and the seconds it took; the engine is
    released before returning, so two settings of a large model are never loaded at once."""
    llm = LLM(**asdict(config))
    distributions, _, seconds = scored_prompt_logprobs(llm, token_ids, window, stride, num_logprobs)
    del llm
    gc.collect()
    return distributions, seconds


def reference_distributions(
    config: EngineConfig, token_ids: list[int], window: int, stride: int, num_logprobs: int
) -> list[Distribution]:
    """The reference's top logprobs, from the cache or computed once and stored."""
    path = reference_cache_path(config, token_ids, window, stride, num_logprobs)
    if path.is_file():
        logger.info("Reference logprobs from %s", path)
        return load_distributions(path)
    distributions, _ = scored_distributions(config, token_ids, window, stride, num_logprobs)
    save_distributions(path, distributions)
    return distributions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_corpus_arguments(parser)
    parser.add_argument(
        "--num-logprobs",
        type=int,
        default=DEFAULT_NUM_LOGPROBS,
        help=f"top tokens compared per position (1 to {MAX_LOGPROBS})",
    )
    parser.add_argument(
        "--reference-model",
        default=None,
        help="model whose float32 dequantized weights are the reference (default: --model)",
    )
    parser.add_argument(
        "--output-json", type=Path, default=None, help="results file to append this run to (e.g. the benchmarks' one)"
    )
    parser.add_argument("--variant", default=None, help="name of these engine settings in the results (e.g. int8)")
    # A prefix-cache hit would skip the prompt logprobs of the tokens it serves.
    add_dataclass_arguments(parser.add_argument_group("engine"), EngineConfig, exclude=("enable_prefix_caching",))


def run(args: argparse.Namespace) -> int:
    config = dataclass_from_args(EngineConfig, args, enable_prefix_caching=False)
    reference = reference_config(config, args.reference_model)
    # The tokenizer is the reference's, so the tokens are the same whatever the setting.
    token_ids, corpus = corpus_tokens(Tokenizer.from_model_path(resolve_model_path(reference.model)), args)
    window_args = (token_ids, args.window, args.stride, args.num_logprobs)
    reference_logprobs = reference_distributions(reference, *window_args)
    test_logprobs, seconds = scored_distributions(config, *window_args)
    result = compare(reference_logprobs, test_logprobs, args.num_logprobs, seconds)
    settings = {
        "model": config.model, "reference_model": reference.model, "corpus": corpus, "window": args.window,
        "stride": args.stride, "variant": args.variant, **asdict(config),
    }  # fmt: skip
    if args.output_json is not None:
        results.append_run(args.output_json, results.new_run("kl-divergence", "pagedllm", settings, asdict(result)))
    print(
        f"mean KL divergence {result.mean_kl_divergence:.6f} (median {result.median_kl_divergence:.6f}, "
        f"p99 {result.p99_kl_divergence:.6f}, max {result.max_kl_divergence:.6f}), top-1 agreement "
        f"{result.top1_agreement:.2%} over {result.tokens_scored} tokens against float32 dequantized weights "
        f"(top {args.num_logprobs} logprobs, covering {result.covered_mass:.2%} of the reference's mass)"
    )
    return 0
