"""The Locust load test runs end to end against the session server (briefly) and writes its report."""

from __future__ import annotations

import csv
import re

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
    fresh, repeat = Requests("m", [clip], 8, {}, "fresh"), Requests("m", [clip], 8, {}, "repeat")
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
    answered = asyncio.run(load(url, Requests(model, clips, 4, {"earwitness": {"guard": "off"}}, "fresh"), 2, 60.0, 6))
    assert answered["errors"] == 0 and len(answered["latencies"]) == 6
    assert all(0 < x < answered["wall_s"] for x in answered["latencies"])
    refused = asyncio.run(load(url, Requests("no-such-model", clips, 4, {}, "repeat"), 2, 60.0, 4))
    assert refused["errors"] == 4 and refused["latencies"] == []


def _rounds(rng, scale: float, jitter: list[float], n: int = 200) -> list[dict]:
    """One system's windows: round j's latencies drawn around ``scale * jitter[j]`` ms (the host's load then)."""
    rounds = [list(rng.gamma(20, scale * j / 20, n)) for j in jitter]
    return [{"latencies_ms": lat, "wall_s": sum(lat) / 1000} for lat in rounds]  # one client: back to back


def test_engine_bench_interval_pairs_rounds_and_flags_verdicts_within_noise():
    """bench_engines' paired bootstrap: a round's load weighs on both sides of a pair, so it cancels; a real
    difference lies outside the interval of no difference; a target inside the interval is flagged."""
    import numpy as np

    from loadtests.bench_engines import LOGPROBS, _p50, _rps, merge, ratio_interval, verdicts

    rng = np.random.default_rng(1)
    jitter = [1.0, 1.4, 0.8, 1.2, 0.9, 1.3]  # the host's load moves latency by ±30% from round to round
    base = _rounds(rng, 50, jitter)
    same = ratio_interval(_rounds(rng, 50, jitter), base, _p50)
    slower = ratio_interval(_rounds(rng, 60, jitter), base, _p50)
    assert same[0] < 1.0 < same[1] and same[1] - same[0] < 0.1  # paired: the ±30% between rounds cancels
    assert 1.1 < slower[0] < 1.2 < slower[1] < 1.3
    unpaired = ratio_interval(_rounds(rng, 50, jitter[::-1]), base, _p50)
    assert unpaired[1] - unpaired[0] > 2 * (same[1] - same[0])  # pairing is what makes it narrow
    fewer = ratio_interval(_rounds(rng, 50, jitter), base, _rps)
    assert fewer[0] < 1.0 < fewer[1]

    def row(system: str, windows: list[dict]) -> dict:  # as run_all makes it: merge() over the windows' load() results
        parts = [{"concurrency": 1, "latencies": [x / 1000 for x in w["latencies_ms"]], "errors": 0, "wall_s": w["wall_s"]} for w in windows]
        return {**merge(parts), "system": system, "workload": "fresh"}

    near = row("earwitness fused, guard on", _rounds(rng, 65, jitter))  # 1.3x: on the target
    far = row("earwitness fused, guard off", _rounds(rng, 80, jitter))  # 1.6x: well past it
    logprobs = row(LOGPROBS, _rounds(rng, 60, jitter))  # a reference: no verdict of its own
    lines = verdicts([row("vllm serve", base), logprobs, near, far])
    assert len(lines) == 2
    assert "latency 1.3" in lines[0] and "(within noise); p50 +1" in lines[0]
    against_logprobs = float(lines[0].split(", ")[-1].split("x of vLLM's with the answer's log-probs")[0])
    assert abs(against_logprobs - 65 / 60) < 0.03
    missed = re.search(r"throughput 0\.6\dx .*: MISSED; p50 \+(\d+) ms$", lines[1])
    assert missed and 25 <= int(missed.group(1)) <= 40  # 80 vs 50 ms around the rounds' medians


def test_a_known_request_is_judged_by_its_answer_alone():
    """The fuzz campaign fails a known request whose answer differs from its reference, in content only."""
    import json

    from loadtests.fuzz import KNOWN, Result, answer_content, problems

    case = KNOWN[0]
    alone = {"answer": "yes", "guard": {"claims": [{"event": "Dog", "verifier_score": 0.52}]}, "timing": {"total_ms": 10.0}}
    refs = {case.reference: answer_content(json.dumps(alone).encode())}
    same = {**alone, "timing": {"total_ms": 99.0}, "request_id": "x"}  # handling differs, content does not
    other = {**alone, "guard": {"claims": [{"event": "Dog", "verifier_score": 0.24}]}}
    assert problems(case, Result(200, json.dumps(same).encode(), {}, 0.1), refs) == []
    assert problems(case, Result(200, json.dumps(other).encode(), {}, 0.1), refs) == ["differs from its reference"]
    assert problems(case, Result(503, b'{"error": {"code": "overloaded"}}', {"retry-after": "1"}, 0.1), refs) == []
