"""The quantization table: variants' perplexity, memory and speed against the unquantized baseline."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pagedllm.benchmarks import results
from pagedllm.benchmarks.report import latest_offline, markdown_report
from pagedllm.benchmarks.throughput import DecodePoint, OfflineThroughput, PrefillPoint
from pagedllm.benchmarks.variants import variants_table


def variant_run(variant: str, prefill: float, decode_1: float, weight_mib: int, kv_tokens: int) -> results.Run:
    throughput = OfflineThroughput(
        [PrefillPoint(512, prefill)], [DecodePoint(1, decode_1), DecodePoint(32, decode_1 * 5)]
    )
    memory = {"weight_bytes": weight_mib * 2**20, "kv_cache_bytes": 2**30, "kv_cache_tokens": kv_tokens}
    return results.new_run("offline", "pagedllm", {"variant": variant}, {**asdict(throughput), "memory": memory})


def perplexity_run(variant: str, perplexity: float) -> results.Run:
    return results.new_run("perplexity", "pagedllm", {"variant": variant}, {"perplexity": perplexity, "tokens": 1000})


def kl_run(variant: str, kl: float, agreement: float) -> results.Run:
    return results.new_run(
        "kl-divergence", "pagedllm", {"variant": variant}, {"mean_kl_divergence": kl, "top1_agreement": agreement}
    )


def write_variants(path: Path) -> None:
    main = OfflineThroughput([PrefillPoint(512, 900.0)], [DecodePoint(1, 30.0)])
    for run in [
        results.new_run("offline", "pagedllm", {}, asdict(main)),
        variant_run("unquantized", 1000.0, 20.0, 256, 10_000),
        perplexity_run("unquantized", 10.0),
        variant_run("int8", 500.0, 40.0, 128, 19_000),
        perplexity_run("int8", 10.05),
        kl_run("int8", 0.00123, 0.972),
    ]:
        results.append_run(path, run)


def test_variant_rows_compare_with_the_baseline(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_variants(path)
    header, rows = variants_table(results.load_results(path))
    by_name = {row[0]: dict(zip(header, row)) for row in rows}
    int8 = by_name["int8"]
    assert int8["perplexity"] == "10.050" and int8["vs unquantized"] == "+0.5%"
    assert int8["weights MiB"] == "128" and int8["KV tokens per GiB"] == "19,000"
    assert int8["prefill 512 tok/s"] == "500.0"
    assert [row[header.index("÷ unquantized")] for row in rows] == ["1.00×", "0.50×"]
    assert by_name["unquantized"]["vs unquantized"] == "+0.0%"
    assert int8["KL vs float32"] == "0.00123" and int8["top-1 agreement"] == "97.2%"
    assert by_name["unquantized"]["KL vs float32"] == "–"


def test_variants_leave_the_main_rows_alone(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_variants(path)
    document = results.load_results(path)
    assert latest_offline(document)["pagedllm"].prefill[0].tokens_per_s == 900.0
    assert "Quantization: perplexity, memory and speed against unquantized" in markdown_report(document)


def test_no_variants_no_table(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    results.append_run(path, perplexity_run("", 10.0))
    assert variants_table(results.load_results(path)) is None
