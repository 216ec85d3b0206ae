"""Faults on a real Serve cluster: a model replica killed under load, a full queue, a request past its timeout.

Each fault runs on its own variant application beside the session server (tests/test_ops_variants.py).
Not here yet: "verifier down gives `unverified` answers" — the verifier/guard doesn't exist yet; its
engineer adds that test with it.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import httpx
import pytest

from tests.helpers import encode, tone
from tests.test_ops_variants import variant_app, wait_ready

pytestmark = pytest.mark.slow  # each fault gets its own Serve deployment

CLIP = encode(tone(2.0, 16_000, 1), 16_000, "wav")
QUESTION = "Is there a sound of a dog barking in the audio?"


def _ask(base: str, max_tokens: int = 32, timeout: float = 60.0) -> tuple[float, float, int | str, str, dict]:
    """(start, end, status or exception name, error code, headers); never raises."""
    start = time.monotonic()
    try:
        r = httpx.post(
            f"{base}/v1/audio/qa",
            files={"file": ("clip.wav", CLIP)},
            data={"question": QUESTION, "max_tokens": str(max_tokens)},
            timeout=timeout,
        )
        try:
            code = r.json().get("error", {}).get("code", "") if r.status_code != 200 else ""
        except ValueError:
            code = f"not JSON: {r.text[:60]!r}"
        return start, time.monotonic(), r.status_code, code, dict(r.headers)
    except httpx.HTTPError as exc:
        return start, time.monotonic(), type(exc).__name__, "", {}


def _model_replica_actors(app: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#ModelServer#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


REQUEST_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def autoscaled(server):
    """The fault-tolerance app: autoscaling 1..2 replicas on ongoing requests (as the RayService runs)."""
    # guard off: this app measures model-replica faults, and a guarded request spends part of its time with
    # the verifier (its own deployment), where a model replica's death cannot reach it
    overrides = dict(request_timeout_s=REQUEST_TIMEOUT_S, max_batch_size=4, model_min_replicas=1, model_max_replicas=2, target_ongoing_requests=8,
                     guard_policy="off")
    with variant_app(server, "faults-kill", **overrides) as base:
        yield base


def _model_server_details(app: str) -> dict:
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()["applications"][app]["deployments"]["ModelServer"]


def test_settings_autoscaling_reaches_serve(autoscaled, server):
    """Settings.model_min/max_replicas + target_ongoing_requests -> the deployment's autoscaling_config."""
    details = _model_server_details("faults-kill")
    config = details["deployment_config"]["autoscaling_config"]
    assert (config["min_replicas"], config["max_replicas"], config["target_ongoing_requests"], config["initial_replicas"]) == (1, 2, 8.0, 1)
    assert details["deployment_config"]["health_check_period_s"] == 2.0
    assert details["status"] == "HEALTHY" and 1 <= len(details["replicas"]) <= 2
    fixed = _model_server_details("earwitness")["deployment_config"]  # the session app: min/max unset
    assert fixed.get("autoscaling_config") is None and fixed["num_replicas"] == server[1].model_replicas


def test_model_replica_killed_under_load_fails_fast_and_recovers(autoscaled):
    import ray

    request_timeout_s = REQUEST_TIMEOUT_S
    base = autoscaled
    assert _ask(base)[2] == 200
    (victim,) = _model_replica_actors("faults-kill")
    records: list[tuple] = []
    stop = threading.Event()

    def worker():
        for _ in range(500):  # bounded: ~0.2 s a request, the loop ends by `stop` long before
            if stop.is_set():
                return
            records.append(_ask(base, max_tokens=128, timeout=request_timeout_s + 15))

    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(worker) for _ in range(4)]
        time.sleep(1.5)
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        recovered_at = None
        while time.monotonic() - killed_at < 75 and recovered_at is None:
            ok_after = [end for start, end, status, *_ in list(records) if status == 200 and start > killed_at]
            recovered_at = min(ok_after) if ok_after else None
            time.sleep(0.1)
        time.sleep(1.0)  # some traffic after recovery
        stop.set()
        for f in futures:
            f.result(timeout=request_timeout_s + 30)

    statuses = [r[2] for r in records]
    failures = [r for r in records if r[2] != 200]
    print(f"\nreplica kill: {len(records)} requests, {len(failures)} failed "
          f"({sorted({(r[2], r[3]) for r in failures})}), recovery {recovered_at and recovered_at - killed_at:.2f} s")
    assert recovered_at is not None, "no 200 after the kill within 75 s"
    # The target is 30 s (measured ~15 s on an idle 2-core machine: the new replica's start dominates, the
    # death itself is noticed at once); 60 s here, because a busy CI machine can triple a replica's start.
    assert recovered_at - killed_at < 60, f"recovery took {recovered_at - killed_at:.1f} s"
    # every request answered: 200, 503 for those the dead replica held, and at worst 504 (bounded by
    # request_timeout_s) for one that arrived during the outage and waited in Serve's router for a replica
    assert set(statuses) <= {200, 503, 504}, f"unexpected outcomes: {sorted(set(map(str, statuses)))}"
    in_flight = [r for r in records if r[0] < killed_at < r[1]]
    assert in_flight, "nothing was in flight at the kill"
    for start, end, status, code, headers in failures:
        if status == 503:
            assert code in {"model_unavailable", "overloaded"} and "retry-after" in headers
            assert end - start < 10, "a request on the dead replica fails fast, not after its timeout"
        else:
            assert (status, code) == (504, "timeout")
    assert any(r[2] == 503 for r in in_flight), "in-flight requests on the killed replica get 503"
    assert all(r[1] - r[0] < request_timeout_s + 5 for r in records), "none hangs past its timeout"
    assert _model_replica_actors("faults-kill") and victim not in _model_replica_actors("faults-kill")
    assert wait_ready(base, 10) < 10
    assert _ask(base)[2] == 200


@pytest.mark.parametrize("topology", ["split", "fused"])  # fused: the limit is the ingress replica's own (serving/model_client.py)
def test_full_queue_is_answered_503_with_retry_after(server, topology):
    with variant_app(server, f"faults-queue-{topology}", topology=topology, max_ongoing_requests=1, max_queued_requests=1, max_batch_size=1) as base:
        with cf.ThreadPoolExecutor(10) as pool:
            results = list(pool.map(lambda _: _ask(base, max_tokens=256, timeout=60), range(10)))
        statuses = [r[2] for r in results]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) >= 1
        rejected = [r for r in results if r[2] == 503]
        assert rejected, "10 concurrent requests against 1 running + 1 queued slot: some must be refused"
        for _, end, _, code, headers in rejected:
            assert code == "overloaded" and headers.get("retry-after") == "1"
        assert max(r[1] - r[0] for r in rejected) < 5, "refusals are immediate, not queued"
        assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200


def test_request_over_its_timeout_gets_504_and_the_service_lives(server):
    with variant_app(server, "faults-timeout", request_timeout_s=0.05) as base:
        start, end, status, code, _ = _ask(base, max_tokens=256)  # ~0.3 s of decoding on the tiny model
        assert (status, code) == (504, "timeout")
        assert end - start < 5
        assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
