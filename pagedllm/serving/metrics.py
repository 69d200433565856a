"""Prometheus metrics of the server: the engine's gauges and counters, and per-request latency histograms."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pagedllm.engine.engine import EngineStats
from pagedllm.engine.host_memory import peak_resident_bytes, resident_bytes
from pagedllm.engine.output import RequestOutput

PREFIX = "pagedllm"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
WEIGHT_BYTES = f"{PREFIX}_model_weight_bytes"
FILE_WEIGHT_BYTES = f"{PREFIX}_model_file_weight_bytes"
KV_CACHE_BYTES = f"{PREFIX}_kv_cache_bytes"
RESIDENT_BYTES = f"{PREFIX}_process_resident_memory_bytes"
PEAK_RESIDENT_BYTES = f"{PREFIX}_process_peak_resident_memory_bytes"


class EngineStatsCollector(Collector):
    """Reads the engine's latest stats at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self.stats = stats
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        spec = stats.spec_decode
        gauges = (
            ("num_requests_running", "sequences in the running batch", stats.num_running),
            ("num_requests_waiting", "sequences waiting to be scheduled", stats.num_waiting),
            ("kv_cache_usage_ratio", "fraction of KV-cache blocks in use (0 to 1)", stats.kv_cache_usage),
            ("spec_decode_acceptance_rate", "accepted / verified draft tokens so far", spec.acceptance_rate),
            (
                "spec_decode_mean_accepted_length",
                "tokens emitted per verification so far, the target's own token included",
                spec.mean_accepted_length,
            ),
        )
        for name, documentation, value in gauges:
            gauge = GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=["model_name"])
            gauge.add_metric([self.model_name], value)
            yield gauge
        counters = (
            ("num_preemptions", "sequences preempted for want of KV-cache blocks", stats.num_preemptions),
            ("prompt_tokens", "prompt tokens prefilled", stats.prompt_tokens),
            ("generation_tokens", "tokens generated", stats.generation_tokens),
            ("prefix_cache_queries", "prompt tokens looked up in the prefix cache", stats.prefix_cache_queried_tokens),
            ("prefix_cache_hits", "prompt tokens found in the prefix cache", stats.prefix_cache_hit_tokens),
            ("spec_decode_num_drafts", "sequence steps that verified draft tokens", spec.num_drafts),
            ("spec_decode_num_draft_tokens", "draft tokens verified", spec.num_draft_tokens),
            ("spec_decode_num_accepted_tokens", "draft tokens accepted", spec.num_accepted_tokens),
        )
        for name, documentation, value in counters:
            counter = CounterMetricFamily(f"{PREFIX}_{name}", documentation, labels=["model_name"])
            counter.add_metric([self.model_name], value)
            yield counter
        if stats.replica_prefix_caches:
            yield from self._replica_prefix_caches(stats)

    def _replica_prefix_caches(self, stats: EngineStats) -> Iterator[Metric]:
        """Each data-parallel replica's prefix-cache counters and hit rate, labelled by its index."""
        labels = ["model_name", "replica"]
        queries = CounterMetricFamily(
            f"{PREFIX}_replica_prefix_cache_queries",
            "prompt tokens a replica looked up in its prefix cache",
            labels=labels,
        )
        hits = CounterMetricFamily(
            f"{PREFIX}_replica_prefix_cache_hits", "prompt tokens a replica found in its prefix cache", labels=labels
        )
        rates = GaugeMetricFamily(
            f"{PREFIX}_replica_prefix_cache_hit_rate", "a replica's prefix-cache hits / queries so far", labels=labels
        )
        for index, cache in enumerate(stats.replica_prefix_caches):
            replica = [self.model_name, str(index)]
            queries.add_metric(replica, cache.queried_tokens)
            hits.add_metric(replica, cache.hit_tokens)
            rates.add_metric(replica, cache.hit_rate)
        yield from (queries, hits, rates)


class ResidentMemoryCollector(Collector):
    """This process's resident memory and its peak so far, read at scrape time (beside the weight and KV-cache
    bytes, the rest is the runtime, the tokenizer and step activations)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        for name, documentation, value in (
            (RESIDENT_BYTES, "bytes of this process's resident memory", resident_bytes()),
            (PEAK_RESIDENT_BYTES, "the most bytes of resident memory this process has held", peak_resident_bytes()),
        ):
            if value is not None:
                gauge = GaugeMetricFamily(name, documentation, labels=["model_name"])
                gauge.add_metric([self.model_name], value)
                yield gauge


class QueueCollector(Collector):
    """The bounded queue at scrape time: sequences waiting for their first token, requests refused as overload."""

    def __init__(self, num_queued: Callable[[], int], num_rejected: Callable[[], int], model_name: str) -> None:
        self.num_queued = num_queued
        self.num_rejected = num_rejected
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        queued = GaugeMetricFamily(
            f"{PREFIX}_num_sequences_queued",
            "sequences of accepted requests waiting for their first token (bounded by max_queued_sequences)",
            labels=["model_name"],
        )
        queued.add_metric([self.model_name], self.num_queued())
        yield queued
        rejected = CounterMetricFamily(
            f"{PREFIX}_requests_rejected", "requests refused with 503 because the queue was full", labels=["model_name"]
        )
        rejected.add_metric([self.model_name], self.num_rejected())
        yield rejected


class ServingMetrics:
    """The server's registry; also the engine's OutputObserver, timing each request from its outputs."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "arrival to first generated token",
            labels,
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self.inter_token_latency = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "time between two successive tokens of a request",
            labels,
            buckets=ITL_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self.e2e_latency = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "arrival to last token of finished requests",
            labels,
            buckets=E2E_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self.finished = Counter(
            f"{PREFIX}_requests_finished",
            "requests that ended, by the finish reason of their first sample",
            ["model_name", "finish_reason"],
            registry=self.registry,
        )
        self._last_output_time: dict[str, float] = {}  # engine thread only

    def set_memory(self, weight_bytes: int, kv_cache_bytes: int, file_weight_bytes: int = 0) -> None:
        """Export the bytes the model's weights and the KV cache hold, fixed at start-up, the bytes the weights
        take in the checkpoint file, and the process's resident memory beside them."""
        for name, documentation, value in (
            (WEIGHT_BYTES, "bytes of the model's weights in memory", weight_bytes),
            (FILE_WEIGHT_BYTES, "bytes of the weights in the checkpoint file (0: not known)", file_weight_bytes),
            (KV_CACHE_BYTES, "bytes allocated to the KV cache", kv_cache_bytes),
        ):
            Gauge(name, documentation, ["model_name"], registry=self.registry).labels(self.model_name).set(value)
        self.registry.register(ResidentMemoryCollector(self.model_name))

    def watch(self, stats: Callable[[], EngineStats]) -> None:
        """Export the engine's gauges and counters, read from `stats` at each scrape."""
        self.registry.register(EngineStatsCollector(stats, self.model_name))

    def watch_queue(self, num_queued: Callable[[], int], num_rejected: Callable[[], int]) -> None:
        """Export the queue depth and the overload refusals, read at each scrape."""
        self.registry.register(QueueCollector(num_queued, num_rejected, self.model_name))

    def on_outputs(self, outputs: list[RequestOutput], now: float) -> None:
        for output in outputs:
            last = self._last_output_time.get(output.request_id)
            if last is None:
                self.time_to_first_token.observe((output.first_token_time or now) - output.arrival_time)
            else:
                self.inter_token_latency.observe(now - last)
            self._last_output_time[output.request_id] = now
            if output.finished:
                del self._last_output_time[output.request_id]
                self.e2e_latency.observe(now - output.arrival_time)
                reason = output.outputs[0].finish_reason if output.outputs else None
                self.finished.labels(self.model_name, reason or "unknown").inc()

    def on_abort(self, request_id: str) -> None:
        self._last_output_time.pop(request_id, None)
        self.finished.labels(self.model_name, "abort").inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
