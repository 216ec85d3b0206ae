"""A real Prometheus (Debian's binary, loopback, temp dir) scrapes the session's Earwitness; the recording
rules from k8s/ must give the 'no'-answer rate of a known mix of requests, and every dashboard query runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.helpers import encode, free_port, tone

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "k8s" / "base" / "monitoring" / "earwitness-rules.yaml"
DASHBOARD = ROOT / "k8s" / "base" / "monitoring" / "earwitness-dashboard.json"
QUESTION = "Is there a sound of a dog barking in the audio?"


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def run_prometheus(tmp: Path, targets: dict[str, str]) -> Iterator[str]:
    """A real Prometheus scraping each ``pod -> host:port`` target every second, with k8s/'s rules (evaluated every
    second instead of every 30) and a ``pod`` label as the PodMonitor gives; yields its URL once every target is up."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus server is not installed (Debian package 'prometheus'; .ci/run installs it)")
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
    (tmp / "rules.yaml").write_text(yaml.safe_dump(rules))
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp / "rules.yaml")],
        "scrape_configs": [
            {
                "job_name": "earwitness",
                "static_configs": [{"targets": [target], "labels": {"service_name": "earwitness", "pod": pod}} for pod, target in targets.items()],
            }
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp / "prometheus.log", "w")
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        def ready():
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()
            try:
                return httpx.get(f"{base}/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(ready, 30, "Prometheus to start")
        _wait(lambda: len(_query(base, 'up{job="earwitness"} == 1')) == len(targets), 30, "the first successful scrape of every target")
        time.sleep(2.5)  # two more scrapes: every series has its baseline
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    url, _ = server
    for _ in range(3):  # warm up: the answer series exist before Prometheus' first scrape (rate needs a baseline)
        httpx.post(f"{url}/v1/audio/qa", files={"file": ("a.wav", encode(tone(1.0, 16_000, 1), 16_000))}, data={"question": QUESTION}, timeout=30)
    with run_prometheus(tmp_path_factory.mktemp("prometheus"), {"session": url.removeprefix("http://")}) as base:
        yield base


def _query(base: str, expr: str) -> list:
    r = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _scalar(base: str, expr: str) -> float | None:
    result = _query(base, expr)
    return float(result[0]["value"][1]) if result else None


def _mix(url: str) -> dict[str, int]:
    """A known mix: clips of 1-8 s in several formats, silence, a too-long clip, bad inputs; kinds as answered."""
    kinds = {"yes": 0, "no": 0, "other": 0, "unparsed": 0, "overridden": 0, "guarded": 0}
    statuses = []
    with httpx.Client(base_url=url, timeout=30) as client:
        def ask(data: bytes, name: str = "clip.wav", **fields):
            r = client.post("/v1/audio/qa", files={"file": (name, data)}, data={"question": QUESTION, **fields})
            statuses.append(r.status_code)
            if r.status_code == 200:
                body = r.json()
                kinds[body["answer_kind"]] += 1
                kinds["guarded"] += bool(body.get("guard"))
                kinds["overridden"] += body.get("original_answer") is not None

        for seconds, freq, ext in [(1, 220, "wav"), (2, 440, "flac"), (3, 660, "ogg"), (5, 880, "wav"), (8, 330, "mp3"), (4, 550, "wav")]:
            ask(encode(tone(seconds, 16_000, 1, freq=freq), 16_000, ext), f"clip.{ext}")
        ask(encode(np.zeros(16_000, np.float32), 16_000))  # silence: answered, flagged
        ask(encode(tone(12.0, 16_000, 1), 16_000), truncate="true")  # cut to the window: answered
        ask(encode(tone(12.0, 16_000, 1), 16_000))  # too long: 413
        ask(b"")  # 400
        ask(b"not audio at all" * 50)  # 415
    assert statuses.count(200) == 8 and sorted(s for s in statuses if s != 200) == [400, 413, 415]
    return kinds


def test_recording_rules_give_the_no_rate_of_a_known_mix(server, prometheus):
    url, _ = server
    kinds = _mix(url)
    answered = kinds["yes"] + kinds["no"] + kinds["other"] + kinds["unparsed"]
    expected_no_rate = kinds["no"] / answered  # 0.0 with the random test model, whose answers are other or unparsed

    # wait until Prometheus has scraped the final counts and evaluated the rules on them
    final = sum(v for k, v in _metrics_answers(url).items())
    _wait(lambda: _scalar(prometheus, "sum(earwitness_answers_total)") == final, 20, "the final answer counts to be scraped")
    time.sleep(2.5)  # rule evaluations on the final samples

    model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    no_rate = _scalar(prometheus, f'earwitness:answers_no:ratio_rate5m{{model="{model}"}}')
    assert no_rate is not None, "the no-rate rule returned nothing"
    # equal, up to Prometheus' per-series rate extrapolation when a series first appears mid-window
    assert no_rate == pytest.approx(expected_no_rate, abs=1e-9 if expected_no_rate in (0.0, 1.0) else 0.02)
    yes_rate = _scalar(prometheus, f'earwitness:answers_yes:ratio_rate5m{{model="{model}"}}')
    assert yes_rate == pytest.approx(kinds["yes"] / answered, abs=1e-9 if kinds["yes"] in (0, answered) else 0.02)

    overrides = _scalar(prometheus, "earwitness:guard_overrides:ratio_rate5m")  # the guard's, once it runs
    assert overrides == pytest.approx(kinds["overridden"] / answered, abs=1e-9 if kinds["overridden"] == 0 else 0.02)
    if kinds["guarded"]:
        shares = {r["metric"]["verdict"]: float(r["value"][1]) for r in _query(prometheus, "earwitness:guard_verdicts:ratio_rate5m")}
        assert shares and sum(shares.values()) == pytest.approx(1.0)

    assert _scalar(prometheus, "earwitness:qa_requests:rate5m") > 0
    assert _scalar(prometheus, "earwitness:qa_errors_5xx:ratio_rate5m") == 0  # 4xx are the client's, not errors
    p95 = _scalar(prometheus, 'earwitness:request_latency_seconds:p95_5m{endpoint="/v1/audio/qa", stage="total"}')
    assert p95 is not None and 0 < p95 <= 60
    flags = {r["metric"]["flag"] for r in _query(prometheus, "earwitness:audio_flags:rate5m")}
    assert {"digital_silence", "truncated"} <= flags
    assert _query(prometheus, 'ALERTS{alertname="EarwitnessDown"}') == []


def _metrics_answers(url: str) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == "earwitness_answers_total":
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_every_rule_evaluates_and_every_dashboard_query_runs(prometheus):
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
    assert [r["name"] for r in rules if r["health"] != "ok"] == []
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            _query(prometheus, target["expr"].replace("$model", ".*"))  # asserts status success
