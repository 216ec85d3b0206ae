"""Earwitness on a real two-node Ray cluster on this machine (tests/cluster_helpers.py), deployed by
``earwitness serve --address`` with two ingress and two model replicas, one of each on either node.

- Metrics: each node's exporter (``python -m serving.metrics``, the pods' sidecar in k8s/) reports its own
  replicas; a real Prometheus scrapes both, and every counter summed in PromQL equals what the clients saw.
- A node crash: the second node's raylet, agents and workers are SIGKILLed under load. Requests keep being
  answered; those the dead node held fail fast with a JSON 5xx naming the request, none hangs, and within
  30 s every request succeeds again. The phases are printed as a table (loadtests/results/multinode.md).

Serve's proxy runs on the head only (both nodes share this host's ports) and is told not to prefer its own
node's ingress replica: it spreads requests over both, as a load balancer in front of every node's proxy would.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.cluster_helpers import NODE_METRICS_VAR, ROOT, Cluster, new_cluster, placement
from tests.helpers import build_tiny_checkpoint, encode, free_port, tone
from tests.test_ops_prometheus import _query, _wait, run_prometheus
from tests.test_ops_variants import wait_ready

pytestmark = pytest.mark.slow  # starts its own two-node cluster

QUESTION = "Is there a sound of a dog barking in the audio?"
REQUEST_TIMEOUT_S = 10.0
CLIENT_TIMEOUT_S = 30.0  # past the service's own timeout: a hang shows as a client timeout, never as a stuck test
RECOVERY_S = 30.0
CLIENTS = 4  # concurrent clients during the node crash


def _clip_samples(i: int) -> np.ndarray:
    """The i-th answerable clip of the metrics mix: tones of several pitches and lengths."""
    return tone(1.0 + i % 4, 16_000, 1, freq=150.0 + 37.0 * i)


def yes_no_checkpoint(directory: Path) -> Path:
    """The tiny test model with an output layer that knows two words, 'yes' and 'no': which one is the sign of the
    last hidden state along the direction that tells the mix's first two clips apart (its component common to
    both removed), so the first clip is answered 'yes', the second 'no', and the others by their own sound."""
    import torch
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    from serving.backends.base import AudioPrompt
    from serving.backends.hf import TransformersBackend

    build_tiny_checkpoint(directory)
    processor = AutoProcessor.from_pretrained(directory)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(directory).eval()
    backend = TransformersBackend("yes-no", processor, model)
    with torch.no_grad():
        last = [model(**backend.inputs([AudioPrompt(_clip_samples(i), QUESTION, 1)]), output_hidden_states=True).hidden_states[-1][0, -1]
                for i in (0, 1)]
        mean = (last[0] + last[1]) / 2
        direction = last[0] - last[1]
        direction -= (direction @ mean) / (mean @ mean) * mean  # zero on the common part: the sign comes from the clip
        (yes,), (no,) = (processor.tokenizer(w, add_special_tokens=False).input_ids for w in ("yes", "no"))
        head = model.get_output_embeddings().weight
        head.zero_()
        head[yes], head[no] = direction, -direction
    model.save_pretrained(directory)
    return directory


@dataclass
class Deployed:
    url: str
    cluster: Cluster
    placement: dict


def _all_running(where: dict) -> bool:
    return all(state == "RUNNING" for replicas in where.values() for _, state, _ in replicas)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """Head + second node (1 CPU each, so one model replica lands on each), then ``earwitness serve --address``."""
    base = Path(tempfile.mkdtemp(prefix="ewmn-", dir="/tmp"))  # short: Ray puts unix sockets under it
    cluster = new_cluster()
    spread = {"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}
    serve = None
    try:
        head = cluster.start_node("head", "127.0.0.2", 1, base, head=True, wait=False, **spread)
        checkpoint = yes_no_checkpoint(tmp_path_factory.mktemp("yes-no-tiny"))  # while the head starts
        head.wait_started()
        cluster.start_node("second", "127.0.0.3", 1, base, **spread)
        port = free_port()
        settings = dict(INGRESS_REPLICAS="2", INGRESS_MAX_PER_NODE="1", MODEL_REPLICAS="2", MODEL_CPUS="1", VERIFIER="", GUARD_POLICY="off",
                        PROXY_LOCATION="HeadOnly", METRICS_DIR="${%s}" % NODE_METRICS_VAR, REQUEST_TIMEOUT_S=str(REQUEST_TIMEOUT_S))
        log = open(base / "serve.log", "w")
        serve = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "serve", "--address", cluster.address, "--model", str(checkpoint), "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=cluster.env(**{f"EARWITNESS_{k}": v for k, v in settings.items()}), cwd=ROOT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, 180)
        except TimeoutError:
            raise AssertionError((base / "serve.log").read_text()[-4000:]) from None
        deadline = time.monotonic() + 90
        while not _all_running(where := placement(cluster)):
            assert time.monotonic() < deadline, where
            time.sleep(2)
        yield Deployed(url, cluster, where)
    finally:
        if serve is not None:
            serve.terminate()  # the command's own shutdown: Serve off the cluster (the nodes go next anyway)
            try:
                serve.wait(5)
            except subprocess.TimeoutExpired:
                serve.kill()
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_serve_address_places_replicas_on_both_nodes(deployed):
    print(f"\nplacement (Serve's status): {json.dumps(deployed.placement)}")
    for deployment in ("Ingress", "ModelServer"):
        assert sorted(node for node, _, _ in deployed.placement[deployment]) == ["head", "second"], deployment


# --- metrics ------------------------------------------------------------------------------------------------


def _ask(client: httpx.Client, data: bytes, max_tokens: int = 1) -> httpx.Response:
    return client.post("/v1/audio/qa", files={"file": ("clip.wav", data)}, data={"question": QUESTION, "max_tokens": str(max_tokens)})


def _mix() -> list[bytes]:
    """32 answerable clips (tones of several pitches and lengths, one silence), 4 empty bodies (400), 4 non-audio (415)."""
    clips = [encode(_clip_samples(i), 16_000) for i in range(31)]
    clips.append(encode(np.zeros(16_000, np.float32), 16_000))
    return clips + [b""] * 4 + [b"not audio at all" * 50] * 4


@pytest.fixture()
def exporters(deployed):
    """Each node's exporter, reading that node's metrics directory only."""
    procs, targets = [], {}
    try:
        for node in deployed.cluster.nodes:
            port = free_port()
            procs.append(subprocess.Popen([sys.executable, "-m", "serving.metrics", "--dir", str(node.metrics_dir), "--port", str(port),
                                           "--host", "127.0.0.1"], cwd=ROOT, env=deployed.cluster.env()))
            targets[node.name] = f"127.0.0.1:{port}"
        yield targets
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def _by(prometheus: str, expr: str, label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in _query(prometheus, expr)}


def test_metrics_summed_over_nodes_equal_the_requests_sent(deployed, exporters, tmp_path):
    with run_prometheus(tmp_path, exporters) as prometheus:
        with httpx.Client(base_url=deployed.url, timeout=CLIENT_TIMEOUT_S) as client, cf.ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda data: _ask(client, data), _mix()))
        codes = collections.Counter(str(r.status_code) for r in responses)
        kinds = collections.Counter(r.json()["answer_kind"] for r in responses if r.status_code == 200)
        sent = len(responses)
        qa = 'endpoint="/v1/audio/qa"'
        _wait(lambda: _by(prometheus, f"sum(earwitness_requests_total{{{qa}}})", "") == {"": sent}, 30, "the final counts to be scraped")

        per_pod = _by(prometheus, f"sum by (pod) (earwitness_requests_total{{{qa}}})", "pod")
        answers = _by(prometheus, "sum by (answer) (earwitness_answers_total)", "answer")
        print(f"\nsent {sent}: {dict(codes)}, answers {dict(kinds)}; Prometheus per pod {per_pod}, answers {answers}")
        assert codes == {"200": 32, "400": 4, "415": 4}
        assert {"yes", "no"} <= set(kinds), kinds  # the two-word model answers both ways across the mix
        assert set(per_pod) == {"head", "second"} and all(0 < n < sent for n in per_pod.values()), per_pod  # one pod alone is wrong
        assert _by(prometheus, f"sum by (code) (earwitness_requests_total{{{qa}}})", "code") == codes
        assert answers == kinds
        assert _by(prometheus, "sum(earwitness_audio_duration_seconds_count)", "") == {"": codes["200"]}
        total = _by(prometheus, f'sum(earwitness_request_latency_seconds_count{{{qa}, stage="total"}})', "")
        assert total == {"": sent}
        # the recording rules sum over pods too: every one evaluates, and the request rate covers both pods' series
        _wait(lambda: _query(prometheus, "earwitness:qa_requests:rate5m"), 10, "the rules' first evaluation")
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        assert [r["name"] for g in groups for r in g["rules"] if r["health"] != "ok"] == []


# --- a node crash under load ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    start: float
    end: float
    status: int | str  # HTTP status, or the client exception's name (a hang ends as ReadTimeout)
    code: str = ""
    request_id: str = ""


def _ask_once(url: str, clip: bytes, sent_id: str) -> Outcome:
    start = time.monotonic()
    try:
        r = httpx.post(f"{url}/v1/audio/qa", files={"file": ("clip.wav", clip)}, data={"question": QUESTION, "max_tokens": "4"},
                       headers={"X-Request-Id": sent_id}, timeout=CLIENT_TIMEOUT_S)
    except httpx.HTTPError as exc:
        return Outcome(start, time.monotonic(), type(exc).__name__)
    end = time.monotonic()
    if r.status_code == 200:
        return Outcome(start, end, 200, request_id=r.json().get("request_id", ""))
    try:
        error = r.json()["error"]
        return Outcome(start, end, r.status_code, error.get("code", ""), error.get("request_id", ""))
    except (ValueError, KeyError, TypeError):
        return Outcome(start, end, r.status_code, f"not JSON: {r.text[:60]!r}")


def _recovered_at(outcomes: list[Outcome], killed_at: float) -> float | None:
    """The start of the first request after the kill from which on every request succeeded."""
    after = sorted((o for o in outcomes if o.start >= killed_at), key=lambda o: o.start)
    failed = [i for i, o in enumerate(after) if o.status != 200]
    first_good = failed[-1] + 1 if failed else 0
    return after[first_good].start if first_good < len(after) else None


def _phase_table(phases: dict[str, list[Outcome]]) -> str:
    rows = ["| phase | requests | 2xx | 503 | other | max latency (s) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, items in phases.items():
        statuses = [o.status for o in items]
        ok, unavailable = sum(s == 200 for s in statuses), sum(s == 503 for s in statuses)
        latency = max((o.end - o.start for o in items), default=0.0)
        rows.append(f"| {name} | {len(items)} | {ok} | {unavailable} | {len(items) - ok - unavailable} | {latency:.2f} |")
    return "\n".join(rows)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _moved_off(where: dict, name: str) -> bool:
    """Whether Serve's status has no replica on node ``name`` and none running on a node that is gone."""
    return not any(node == name or (node == "none" and state == "RUNNING") for replicas in where.values() for node, state, _ in replicas)


def _ask_quietly(url: str, clip: bytes, n: int, prefix: str) -> list[Outcome]:
    return [_ask_once(url, clip, f"{prefix}-{i}") for i in range(n)]


def test_second_node_killed_under_load(deployed):
    second = next(n for n in deployed.cluster.nodes if n.name == "second")
    on_second = {name: [pid for node, _, pid in replicas if node == "second"] for name, replicas in deployed.placement.items()}
    assert all(on_second.values()), on_second  # an ingress and a model replica die with the node
    clip = encode(tone(2.0, 16_000, 1), 16_000)
    outcomes: list[Outcome] = []
    stop = threading.Event()

    def client(k: int) -> None:
        for i in range(10_000):  # bounded; `stop` ends it long before
            if stop.is_set():
                return
            outcomes.append(_ask_once(deployed.url, clip, f"mn-{k}-{i}"))

    with cf.ThreadPoolExecutor(CLIENTS) as pool:
        clients = [pool.submit(client, k) for k in range(CLIENTS)]
        time.sleep(6.0)  # the cluster whole, under load
        killed_at = time.monotonic()
        killed = second.kill(workers=[pid for pids in on_second.values() for pid in pids])
        # until every request for 5 s has succeeded (recovered), or well past the limit
        while time.monotonic() - killed_at < RECOVERY_S + 20:
            time.sleep(0.5)
            recovered_at = _recovered_at(list(outcomes), killed_at)
            if recovered_at is not None and time.monotonic() - recovered_at > 5.0:
                break
        stop.set()
        for c in clients:
            c.result(timeout=CLIENT_TIMEOUT_S + 10)
    assert not any(_alive(pid) for pid in killed), "the second node's processes outlived the kill"

    # then until Ray declares the node dead and Serve moves its replicas off it (its health checks: seconds)
    deadline = time.monotonic() + 90
    while not _moved_off(after := placement(deployed.cluster), "second"):
        assert time.monotonic() < deadline, after
        time.sleep(1)
    gone_at = time.monotonic()
    final = _ask_quietly(deployed.url, clip, 8, "mn-final")

    recovered_at = _recovered_at(outcomes, killed_at)
    phases = {
        "before kill": [o for o in outcomes if o.end < killed_at],
        "during (kill to recovery)": [o for o in outcomes if o.end >= killed_at and (recovered_at is None or o.start < recovered_at)],
        "after recovery": [o for o in outcomes if recovered_at is not None and o.start >= recovered_at],
        "after the node is declared dead": final,
    }
    failures = sorted((o for o in outcomes if o.status != 200), key=lambda o: o.start)
    print(f"\nsecond node killed ({len(killed)} processes, its ingress and model replicas among them); recovery "
          f"{recovered_at - killed_at if recovered_at else float('nan'):.1f} s after the kill; node declared dead and its replicas "
          f"moved {gone_at - killed_at:.1f} s after it\n{_phase_table(phases)}\nfailures (s from kill, status, code, request id): "
          f"{[(round(o.start - killed_at, 2), o.status, o.code, o.request_id) for o in failures]}\nplacement after: {json.dumps(after)}")

    assert len(phases["before kill"]) >= 8 and all(o.status == 200 for o in phases["before kill"])
    assert recovered_at is not None and recovered_at - killed_at <= RECOVERY_S, "no recovery to 100% success within 30 s"
    assert len(phases["after recovery"]) >= 8, "too little traffic after recovery to call it 100%"
    assert all(o.status == 200 for o in final), final
    # none hangs, none is dropped: every request got an HTTP answer, well inside the client's timeout
    assert [o for o in outcomes if not isinstance(o.status, int)] == []
    assert max(o.end - o.start for o in outcomes) < REQUEST_TIMEOUT_S + 5
    # the failures are the dead node's: 5xx with a JSON error naming the request, bounded in number
    for o in failures:
        assert isinstance(o.status, int) and 500 <= o.status < 600 and not o.code.startswith("not JSON"), o
        assert o.request_id.startswith("mn-"), o
    # bounded: at most a few per client (its request in flight at the kill, and any routed to the dead node's
    # replicas before Serve's routers learnt of their death)
    assert len(failures) <= 3 * CLIENTS, failures
    assert [node for node, state, _ in after["Ingress"] if state == "RUNNING"] == ["head"]
