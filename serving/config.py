"""All of Earwitness' serving configuration, in one place.

Values come from (highest first) explicit arguments (CLI flags, a Serve config's ``args``),
``EARWITNESS_*`` environment variables, then these defaults — which run on a laptop CPU.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EARWITNESS_", extra="forbid", protected_namespaces=())

    # where to listen
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    direct_port: int | None = Field(
        None, ge=1, le=65435,
        description="also serve HTTP straight from each ingress replica, on direct_port, direct_port+1, … "
        "(Ray Serve direct ingress: no proxy hop); None: only the proxy on `port`",
    )

    # what to serve
    model: str = Field("earwitness-small", description="registered model name, checkpoint directory, or store URI (s3://, gs://, hf://…: copied once into the store cache)")
    model_source: str | None = Field(
        None, description="where a registered model's weights are read from instead of its spec's source: a directory or store "
        "URI (e.g. s3://models/qwen2-audio-7b-instruct, hf://Qwen/Qwen2-Audio-7B-Instruct), copied once into the store cache",
    )
    adapter: str | None = Field(None, description="LoRA adapter directory or store URI; None uses the model's shipped adapter")
    device: str = "auto"
    dtype: str = "auto"
    # more LoRA adapters, served as "<model>:<name>" (README "Models and adapters"); the model's shipped ones come too
    adapters: dict[str, str] = Field(default_factory=dict, description="adapter name -> LoRA directory or store URI")
    adapter_store: str | None = Field(
        None, description="directory or store URI holding adapters as <name>/: '<model>:<name>' loads <adapter_store>/<name> "
        "on first request (rolling one out = writing it there); None: only the adapters named above",
    )
    store_options: dict[str, dict] = Field(
        default_factory=dict, description="fsspec storage options per protocol for store URIs, e.g. {\"s3\": {\"endpoint_url\": …}}; "
        "credentials come from the environment (AWS_*, the pod's service account), not from here",
    )
    max_loaded_adapters: int = Field(4, ge=1, description="adapters a model replica keeps loaded (Serve multiplexing, LRU)")

    # engine (serving/backends/): transformers runs anywhere; vllm needs the .venv-vllm environment (or CUDA vLLM)
    engine: Literal["transformers", "vllm"] = "transformers"
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs one replica shards the model over")
    max_model_len: int | None = Field(None, ge=1, description="vllm: context length; None takes the model spec's")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description="vllm: None takes the model spec's")
    max_num_seqs: int = Field(64, ge=1, description="vllm: sequences decoded together")
    max_lora_rank: int = Field(16, ge=1, description="vllm: largest adapter rank")
    enforce_eager: bool = Field(False, description="vllm: no CUDA graphs (faster start, slower decode)")
    vllm_cpu_kvcache_gb: int = Field(1, ge=1, description="vllm on CPU: KV cache GiB (VLLM_CPU_KVCACHE_SPACE, whole GiB)")

    # OpenAI-compatible API: remote audio URLs are fetched only from these prefixes; empty = refused (400)
    audio_url_allowlist: list[str] = Field(default_factory=list, description="URL prefixes audio_url parts may fetch from")

    # request limits
    max_upload_mb: float = Field(25.0, gt=0)
    max_audio_s: float = Field(30.0, gt=0, description="longest clip accepted (the model's window may be shorter)")
    max_question_chars: int = Field(1000, gt=0)
    max_question_tokens: int = Field(512, gt=0, description="a question's length in the served tokenizer's tokens, checked before it joins a batch")
    body_timeout_s: float = Field(30.0, gt=0, description="longest wait for the next piece of a request body, then 408 body_timeout")
    header_timeout_s: float = Field(10.0, gt=0, description="longest a request's headers may take (uvicorn has none: serving/proxy.py), then the connection is closed")
    default_max_tokens: int = Field(32, ge=1)
    max_tokens_limit: int = Field(256, ge=1)
    request_timeout_s: float = Field(60.0, gt=0)

    # scale and batching: configuration, not code
    topology: Literal["split", "fused"] = Field(
        "split", description="split: ingress and model are two deployments (scaled apart, adapters routed by "
        "model multiplexing); fused: each ingress replica holds the model, as vLLM's own server does (one process "
        "hop less per request; model_* scale settings apply to it, ingress_replicas must stay 1)",
    )
    model_replicas: int = Field(1, ge=1)
    ingress_replicas: int = Field(1, ge=1)
    ingress_max_per_node: int | None = Field(
        None, ge=1, description="most ingress replicas on one Ray node (Serve's max_replicas_per_node); 1 spreads them over "
        "nodes, so a node's loss takes one of them (a cluster needs as many nodes as ingress_replicas); None: Serve places them",
    )
    model_cpus: float = Field(1.0, ge=0)
    model_gpus: float = Field(0.0, ge=0)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="how long an idle model waits for more requests before a batch; requests that arrive while one runs join the next")
    max_ongoing_requests: int = Field(16, ge=1, description="per model replica")
    max_queued_requests: int = Field(64, ge=-1, description="beyond this the ingress answers 503")
    # autoscaling of the model deployment (Serve autoscaling_config); None keeps model_replicas fixed
    model_min_replicas: int | None = Field(None, ge=0, description="set with model_max_replicas to autoscale")
    model_max_replicas: int | None = Field(None, ge=1)
    target_ongoing_requests: float | None = Field(None, gt=0, description="per replica; Serve's default when None")
    health_check_period_s: float = Field(2.0, gt=0, description="how often Serve health-checks model replicas (a crashed one is noticed at once, a stuck one at a failed check)")

    # the absent-sound guard (serving/guard/): every answer's sound claims checked against the audio
    guard_policy: Literal["off", "annotate", "abstain", "correct"] | None = Field(
        None, description="the server's policy for requests that name none (a request's 'guard' comes first); None: the served "
        "model's own default (models/registry.py: earwitness-small 'correct', the others 'annotate')"
    )
    verifier: str | None = Field(
        "earwitness-verifier-fused", description="shipped verifier name (earwitness-verifier-fused: the Whisper head and the AudioSet "
        "tagger's, fused; earwitness-verifier; earwitness-verifier-yamnet), a verifier directory, or a CLAP checkpoint (dir or hub id); "
        "None: no verifier"
    )
    verifier_replicas: int = Field(1, ge=1)
    verifier_cpus: float = Field(1.0, ge=0)
    verifier_timeout_s: float = Field(5.0, gt=0, description="past this the answer goes out 'unverified'")
    verifier_log_level: Literal["DEBUG", "INFO", "WARNING"] = Field(
        "INFO", description="DEBUG logs each verdict's clip (SHA-256 prefix, kept or scored), to trace which audio a verdict came from",
    )
    verifier_max_ongoing: int = Field(4, ge=1, description="clips a verifier replica scores at once (its encoder is CPU-bound: more only thrash)")
    verifier_max_queued: int = Field(
        16, ge=-1, description="verifier calls waiting per handle beyond the ongoing ones; past this a guarded answer goes out "
        "'unverified' at once and /v1/audio/verify answers 503 with Retry-After, rather than both waiting out the timeout; -1: unbounded"
    )
    verifier_cache_size: int = Field(
        1024, ge=0, description="clips whose class probabilities a verifier replica keeps (by SHA-256 of the samples); 0: none"
    )
    guard_share_encoder: bool = Field(
        True, description="when the served model's audio tower and the verifier's encoder are the same frozen pretrained part "
        "with the same window (the same `tower` signature in both info()), a clip that fills the window is encoded once: the model "
        "returns the encoder's layers and the verifier scores them after the answer, instead of encoding the clip beside it; "
        "false: the verifier always encodes the clip itself",
    )
    events_threshold: float | None = Field(
        0.8, ge=0, le=1, description="/v1/audio/events: an ontology class is detected at this calibrated probability (clip and "
        "frames); chosen on the corpus validation split for event-level F1 (python -m loadtests.event_f1 --tune-on validation): "
        "the verifier's own present_above (0.56, None here) reports too many sounds as events; None: present_above"
    )
    events_audioset_threshold: float | None = Field(
        None, ge=0, le=1, description="/v1/audio/events: the same for the tagger's AudioSet classes outside the ontology; None: where "
        "the tagger's own score is 0.5 (its own decision point, under the open vocabulary's calibration)"
    )
    events_min_gap_s: float = Field(1.0, ge=0, description="/v1/audio/events: a pause up to this long inside a sound's span is filled "
                                    "(chosen with events_threshold)")
    guard_contrast: bool = Field(True, description="also score the answer on blank audio (the model's audio contrast)")
    guard_contrast_prior: float = Field(0.05, description="nats; at or below, an answer the verifier is unsure of is a prior")
    guard_contrast_heard: float = Field(1.0, description="nats; at or above, an answer the verifier is unsure of was heard")

    # access: optional bearer-token auth (serving/middleware.py); /healthz, /readyz and /metrics stay open
    api_keys: SecretStr | None = Field(None, description="comma-separated API keys; when any is set, requests need one")
    api_keys_file: str | None = Field(None, description="file holding API keys, one per line ('#' comments)")

    # Ray
    ray_address: str | None = Field(None, description="join an existing cluster instead of starting one")
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode", description="where Serve runs its HTTP proxies on `port`: every node with a replica (a load balancer in "
        "front), or the head only (several Ray nodes on one host, whose proxies would all want the same port)",
    )
    metrics_dir: str | None = Field(
        None, description="where the replicas of a node keep their metrics (prometheus_client multiprocess files), read by "
        "that node's exporter (`python -m serving.metrics`; the pods' metrics sidecar) so Prometheus sums the nodes; "
        "`${VAR}` is expanded on each node from its Ray processes' environment. None: a fresh directory per application "
        "under ray_temp_dir, summed by the ingress' /metrics (one node)",
    )
    ray_temp_dir: str = Field(default_factory=lambda: str(Path(tempfile.gettempdir()) / "earwitness-ray"))
    num_cpus: int | None = Field(None, description="CPUs a locally started Ray may use")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


CPU_REPLICAS_CAP = 4  # one earwitness-small replica holds ~1 GiB; a big laptop need not fill its memory by default


def usable_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def scaled_to_cores(settings: Settings, cores: int, gpu: bool) -> Settings:
    """``earwitness serve`` on a machine without a GPU: one model replica per core, when nothing chose the count.

    On a CPU a replica computes one batch at a time and a batch costs what its requests cost one by one, so
    concurrency pays only across replicas (README "Concurrency on a CPU": 1.80x requests/s at c=8 with two
    replicas on two cores, 1.06x from batching in one). Left alone: a replica count or autoscaling bounds that
    were set, a GPU, the vLLM engine, an existing cluster. A set ``num_cpus`` bounds the count (each replica
    reserves ``model_cpus``, the verifier ``verifier_cpus``); otherwise Ray is given what the replicas reserve.
    """
    chosen = {"model_replicas", "model_min_replicas", "model_max_replicas"} & settings.model_fields_set
    if chosen or gpu or settings.engine != "transformers" or settings.model_gpus > 0 or settings.ray_address:
        return settings
    per_replica = max(settings.model_cpus, 1.0)
    verifier = settings.verifier_cpus if settings.verifier else 0.0
    if settings.topology == "fused":  # each replica holds its own verifier
        per_replica, verifier = per_replica + verifier, 0.0
    replicas = min(cores, CPU_REPLICAS_CAP)
    if settings.num_cpus is not None:
        replicas = min(replicas, int((settings.num_cpus - verifier) // per_replica))
    replicas = max(1, replicas)
    update = {"model_replicas": replicas}
    if settings.num_cpus is None and replicas > 1:
        update["num_cpus"] = math.ceil(replicas * per_replica + verifier)
    return settings.model_copy(update=update)
