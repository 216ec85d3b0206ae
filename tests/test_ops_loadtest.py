"""The Locust load test runs end to end against the session server (briefly) and writes its report."""

from __future__ import annotations

import csv

import pytest

from loadtests import run


def test_duration_and_host_guards():
    assert run.parse_duration("60s") == 60 and run.parse_duration("1m30s") == 90 and run.parse_duration("45") == 45
    for bad in ("", "forever", "0s", "2h"):
        with pytest.raises(Exception):
            run.parse_duration(bad)
    assert run.is_loopback("http://127.0.0.1:8000") and run.is_loopback("http://localhost:1") and run.is_loopback("http://[::1]:80")
    assert not run.is_loopback("http://10.0.0.5:8000") and not run.is_loopback("http://example.org")
    with pytest.raises(SystemExit):
        run.main(["--host", "http://192.168.1.10:8000", "--duration", "5s"])


def test_short_load_run_writes_the_report(server, tmp_path):
    url, _ = server
    out = tmp_path / "load"
    assert run.main(["--host", url, "--users", "4", "--duration", "6s", "--out", str(out)]) == 0  # 0: nothing unexpected
    for name in ("samples.csv", "summary.csv", "errors.csv", "report.md", "latency.png"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "summary.csv")))
    overall = rows[-1]
    assert overall["scenario"] == "ALL" and int(overall["requests"]) >= 3 and int(overall["unexpected"]) == 0
    assert float(overall["p50_ms"]) <= float(overall["p95_ms"]) <= float(overall["p99_ms"])
    report = (out / "report.md").read_text()
    assert "p99" in report and "5xx other than 503 backpressure: 0" in report
    assert (out / "latency.png").read_bytes()[:4] == b"\x89PNG"


def test_engine_bench_fresh_clips_are_new_recordings_that_sound_the_same():
    """bench_engines' fresh workload: each request a clip no server has heard (so no cache answers it),
    decoding to the same length and, but for six samples moved by at most 15/32768, the same audio."""
    import base64
    import io

    import numpy as np
    import soundfile as sf

    from loadtests.bench_engines import Requests, fresh_clip, make_clips

    (clip,) = make_clips(1, 1.0)
    original, rate = sf.read(io.BytesIO(base64.b64decode(clip)), dtype="int16")
    variants = [sf.read(io.BytesIO(base64.b64decode(fresh_clip(clip, n))), dtype="int16") for n in (1, 2, 4097)]
    heard = {v.tobytes() for v, _ in variants}
    assert len(heard) == 3 and original.tobytes() not in heard
    for v, r in variants:
        assert r == rate and v.shape == original.shape
        changed = np.flatnonzero(v != original)
        assert set(changed) <= set(range(2, 8)) and np.abs(v[2:8]).max() <= 15
    fresh, repeat = Requests("m", [clip], 8, "off", "fresh"), Requests("m", [clip], 8, "off", "repeat")
    audio = lambda body: body["messages"][0]["content"][0]["input_audio"]["data"]  # noqa: E731
    assert audio(repeat(0)) == audio(repeat(1)) == clip
    assert audio(fresh(0)) != audio(fresh(0)) and fresh(0)["messages"][0]["content"][1] == repeat(0)["messages"][0]["content"][1]


def test_engine_bench_load_is_a_closed_loop_that_counts_refusals(server):
    """bench_engines' load generator against the real app: bounded by its request budget, every answer
    timed, and a refused request (an unknown model, 404) counted as an error rather than as a latency."""
    import asyncio

    import httpx

    from loadtests.bench_engines import Requests, load, make_clips

    url, _ = server
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    clips = make_clips(2, 1.0)
    answered = asyncio.run(load(url, Requests(model, clips, 4, "off", "fresh"), 2, 60.0, 6))
    assert answered["errors"] == 0 and len(answered["latencies"]) == 6
    assert all(0 < x < answered["wall_s"] for x in answered["latencies"])
    refused = asyncio.run(load(url, Requests("no-such-model", clips, 4, "off", "repeat"), 2, 60.0, 4))
    assert refused["errors"] == 4 and refused["latencies"] == []
