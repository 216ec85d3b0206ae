"""Prometheus metrics, created inside each Serve replica and aggregated across replicas of a node.

Replicas are separate processes; prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``,
set in the replicas' runtime environment) lets whichever ingress replica answers ``/metrics``
report the sum over all of them, so the 'no'-answer rate is right however far the service scales.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

PREFIX = "earwitness"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.5, 1, 2, 5, 10, 15, 20, 30, 60)


class Metrics:
    """The service's metric families; build one per replica process, after the env is set."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        registry = None if self.multiprocess else CollectorRegistry()
        self._registry = registry
        self.latency = Histogram(
            f"{PREFIX}_request_latency_seconds",
            "Latency by endpoint and stage (decode, model, guard, total).",
            ["endpoint", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(f"{PREFIX}_requests", "Requests by endpoint and HTTP status code.", ["endpoint", "code"], registry=registry)
        self.internal_errors = Counter(
            f"{PREFIX}_internal_errors", "Requests answered 500 internal_error (an unexpected exception: a bug), by endpoint.", ["endpoint"], registry=registry
        )
        self.answers = Counter(f"{PREFIX}_answers", "Answers by kind: yes, no, other, unparsed (not the form the question asks for).", ["answer", "model"], registry=registry)
        self.audio_duration = Histogram(
            f"{PREFIX}_audio_duration_seconds", "Duration of accepted audio clips.", buckets=DURATION_BUCKETS, registry=registry
        )
        self.in_flight = Gauge(
            f"{PREFIX}_requests_in_flight", "Requests being handled now.", registry=registry, multiprocess_mode="livesum"
        )
        self.audio_flags = Counter(f"{PREFIX}_audio_flags", "Accepted clips carrying a flag (digital_silence, truncated).", ["flag"], registry=registry)
        self.guard_verdicts = Counter(
            f"{PREFIX}_guard_verdicts", "Guarded answers by verdict: supported, unsupported, uncertain, unverified.", ["verdict"], registry=registry
        )
        self.guard_overrides = Counter(f"{PREFIX}_guard_overrides", "Answers the guard changed, by policy (abstain, correct).", ["policy"], registry=registry)
        self.verifier_clips = Counter(
            f"{PREFIX}_verifier_clips", "Guarded clips by how the verifier judged them: kept (its result for that clip, no audio pass), "
            "shared (from the model's tower layers, no encoder pass of its own) or scored.",
            ["result"], registry=registry,
        )
        self.verifier_kept_hits = Counter(
            f"{PREFIX}_verifier_kept_hits", "Verifier results served from a replica's kept results (the same clip's samples, "
            "byte for byte, heard before): guarded answers and /v1/audio/verify alike.", registry=registry,
        )
        self.events_detected = Counter(
            f"{PREFIX}_events_detected", "Sound events /v1/audio/events reported (and events listed on request), by vocabulary "
            "(ontology, audioset).", ["vocabulary"], registry=registry,
        )
        self.verifier_failures = Counter(
            f"{PREFIX}_verifier_failures", "Verifier calls that failed: timeout, unavailable, overloaded, error, disabled.", ["reason"], registry=registry
        )

    def exposition(self) -> bytes:
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self._registry)


def mark_process_dead() -> None:
    """Drop a stopped replica's live gauges (its counters keep counting in the totals)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(os.getpid())
