"""pagedllm under other engine settings (weight and KV-cache quantization): quality, memory and speed beside a
baseline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagedllm.benchmarks.results import ResultsFile

BASELINE = "unquantized"  # the variant of the model dtype with no quantization
SPEED_POINTS = (("prefill", 512), ("decode", 1), ("decode", 32))


@dataclass
class Variant:
    """The latest offline and perplexity figures recorded under one variant name."""

    name: str
    speeds: dict[tuple[str, int], float] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    perplexity: float | None = None
    kl_divergence: float | None = None  # mean, against the float32 dequantized reference
    top1_agreement: float | None = None


def collect_variants(document: ResultsFile) -> dict[str, Variant]:
    """Variants in the order first seen, each with its latest numbers."""
    variants: dict[str, Variant] = {}
    for run in document.runs:
        name = run.settings.get("variant")
        if not name or run.kind not in ("offline", "perplexity", "kl-divergence"):
            continue
        variant = variants.setdefault(name, Variant(name))
        if run.kind == "perplexity":
            variant.perplexity = run.results["perplexity"]
            continue
        if run.kind == "kl-divergence":
            variant.kl_divergence = run.results["mean_kl_divergence"]
            variant.top1_agreement = run.results["top1_agreement"]
            continue
        variant.speeds = _speeds(run.results)
        variant.memory = run.results.get("memory", {})
    return variants


def _speeds(results: dict[str, Any]) -> dict[tuple[str, int], float]:
    speeds = {("prefill", p["prompt_len"]): p["tokens_per_s"] for p in results.get("prefill", [])}
    speeds.update({("decode", d["batch_size"]): d["tokens_per_s"] for d in results.get("decode", [])})
    return speeds


def _relative(value: float | None, base: float | None, as_percent: bool = False) -> str:
    if value is None or not base:
        return "–"
    if as_percent:
        return f"{(value / base - 1) * 100:+.1f}%"
    return f"{value / base:.2f}×"


def variants_table(document: ResultsFile) -> tuple[list[str], list[list[str]]] | None:
    """Header and rows, one per variant: perplexity (and its change from the baseline), KL divergence and top-1
    agreement against the float32 reference, weight and KV-cache memory, speeds and their ratio to the baseline;
    None when no variant was measured."""
    variants = collect_variants(document)
    if not variants:
        return None
    base = variants.get(BASELINE, Variant(BASELINE))
    header = [
        "setting", "perplexity", f"vs {BASELINE}", "KL vs float32", "top-1 agreement", "weights MiB",
        "KV tokens per GiB",
    ]  # fmt: skip
    for kind, size in SPEED_POINTS:
        header += [f"{kind} {size} tok/s", f"÷ {BASELINE}"]
    rows = []
    for variant in variants.values():
        memory = variant.memory
        kv_per_gib = memory["kv_cache_tokens"] * 2**30 / memory["kv_cache_bytes"] if memory else None
        row = [
            variant.name,
            "–" if variant.perplexity is None else f"{variant.perplexity:.3f}",
            _relative(variant.perplexity, base.perplexity, as_percent=True),
            "–" if variant.kl_divergence is None else f"{variant.kl_divergence:.5f}",
            "–" if variant.top1_agreement is None else f"{variant.top1_agreement:.1%}",
            f"{memory['weight_bytes'] / 2**20:.0f}" if memory else "–",
            "–" if kv_per_gib is None else f"{kv_per_gib:,.0f}",
        ]
        for point in SPEED_POINTS:
            value = variant.speeds.get(point)
            row += ["–" if value is None else f"{value:.1f}", _relative(value, base.speeds.get(point))]
        rows.append(row)
    return header, rows
