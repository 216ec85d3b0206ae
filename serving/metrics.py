"""Prometheus metrics, created inside each Serve replica and summed over the replicas of a node.

Replicas are separate processes; prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set in
the replicas' runtime environment: ``serving.app.metrics_dir``) keeps each process' values in files of one
directory per node. On one node the ingress' ``/metrics`` reports their sum. On several nodes a request to
``/metrics`` reaches some ingress replica on some node, so each node runs this module as its exporter
(``python -m serving.metrics --dir D --port P``; the pods' metrics sidecar in k8s/), Prometheus scrapes every
node's exporter, and the recording rules sum over them: the totals stay the service's however many ingress
replicas run, wherever they run.
"""

from __future__ import annotations

import argparse
import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
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
            return generate_latest(node_registry(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
        return generate_latest(self._registry)


def mark_process_dead() -> None:
    """Drop a stopped replica's live gauges (its counters keep counting in the totals)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(os.getpid())


def prepare_metrics_dir() -> None:
    """Create this process' multiprocess directory; refuse one that expanded to nothing (an unset ``${VAR}``)."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    if not path:
        raise ValueError("metrics_dir is empty on this node: a ${VAR} it names is not set in the Ray node's environment")
    os.makedirs(path, exist_ok=True)


def node_registry(path: str) -> CollectorRegistry:
    """A registry that reads the node's metrics files at every scrape (their sum over the node's replicas)."""
    os.makedirs(path, exist_ok=True)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    return registry


def main(argv: list[str] | None = None) -> None:
    """The node's exporter: serve the sum of its replicas' metrics over HTTP until killed."""
    parser = argparse.ArgumentParser(prog="python -m serving.metrics", description=main.__doc__)
    parser.add_argument("--dir", required=True, help="the node's metrics_dir")
    parser.add_argument("--port", type=int, default=9464)
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (a pod's: every interface)")
    args = parser.parse_args(argv)
    start_http_server(args.port, addr=args.host, registry=node_registry(args.dir))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
