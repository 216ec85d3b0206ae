"""Locust scenarios for Earwitness' POST /v1/audio/qa: a realistic mix, every outcome checked.

Mix (task weights): presence questions on 1-10 s clips (55), open questions on 1-10 s clips (20), the same
as base64 JSON (5), 10-30 s clips without truncate -> 413 audio_too_long (4), 10-30 s clips with
truncate -> 200 (3), bad inputs -> their 4xx (empty file, not audio, corrupt WAV, empty question) (8),
GET /v1/models (5). A 503 (queue full, Retry-After) is backpressure, counted apart; anything else
unexpected is a failure named by status and error code. Run it with ``python -m loadtests.run``.

Environment: LOADTEST_SAMPLES (CSV path for per-request samples), LOADTEST_SEED, LOADTEST_MAX_WINDOW_S
(the served model's audio window; clips up to it are 'short', 10 for the embedded default).
"""

from __future__ import annotations

import base64
import csv
import os
import random
import time

from locust import HttpUser, between, events, task

from loadtests.clips import bad_inputs, make_pool

SEED = int(os.environ.get("LOADTEST_SEED", "7"))
WINDOW_S = float(os.environ.get("LOADTEST_MAX_WINDOW_S", "10"))
SHORT = make_pool(48, 1.0, min(10.0, WINDOW_S), SEED)
LONG = make_pool(6, WINDOW_S + 0.5, 30.0, SEED + 1)
BAD = bad_inputs(SEED + 2)
PRESENCE = [
    "Is there a dog barking in the audio?",
    "Did you hear a siren?",
    "Is someone speaking in this recording?",
    "Is there music playing?",
    "Can you hear rain? Answer with yes or no.",
    "Is a door slamming in the clip?",
]
OPEN = ["What is making the sound in this clip?", "Describe the audio.", "What instrument is playing?", "Where might this have been recorded?"]
API_KEY = os.environ.get("LOADTEST_API_KEY")
REQUEST_TIMEOUT_S = 120  # longer than the server's own request timeout: a hang shows as 'no response'

_samples: list[tuple] = []


@events.request.add_listener
def _record(request_type, name, response_time, response_length, response=None, exception=None, start_time=None, context=None, **_):
    status = getattr(response, "status_code", 0) or 0
    code = ""
    if status and status != 200:
        try:
            code = response.json().get("error", {}).get("code", "")
        except Exception:
            code = "non-json"
    outcome = (context or {}).get("outcome", "ok" if exception is None else "failed")
    _samples.append((round(start_time or time.time(), 3), name, status, code, round(response_time, 2), outcome, type(exception).__name__ if exception else ""))


@events.quitting.add_listener
def _write(environment, **_):
    path = os.environ.get("LOADTEST_SAMPLES")
    if not path:
        return
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["start", "scenario", "status", "code", "latency_ms", "outcome", "exception"])
        writer.writerows(_samples)


class EarwitnessUser(HttpUser):
    wait_time = between(0.0, 0.2)

    def on_start(self):
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"

    def _qa(self, scenario: str, expect: int, files=None, data=None, json=None, expect_code: str | None = None):
        context = {"outcome": "ok"}
        with self.client.post(
            "/v1/audio/qa", files=files, data=data, json=json, name=scenario, catch_response=True, timeout=REQUEST_TIMEOUT_S, context=context
        ) as r:
            code = ""
            if r.status_code != 200:
                try:
                    code = r.json().get("error", {}).get("code", "")
                except Exception:
                    code = "non-json"
            if r.status_code == expect and (expect_code is None or code == expect_code):
                r.success()
            elif r.status_code == 503 and code == "overloaded":
                context["outcome"] = "backpressure"
                r.failure("503 overloaded (backpressure)")
            else:
                context["outcome"] = "unexpected"
                r.failure(f"{r.status_code or 'no response'} {code}".strip())

    def _form(self, clip, question: str, **fields):
        return {"files": {"file": (clip.filename, clip.data)}, "data": {"question": question, **fields}}

    @task(55)
    def presence(self):
        self._qa("qa presence 1-10s", 200, **self._form(random.choice(SHORT), random.choice(PRESENCE)))

    @task(20)
    def open_question(self):
        self._qa("qa open 1-10s", 200, **self._form(random.choice(SHORT), random.choice(OPEN), max_tokens="48"))

    @task(5)
    def as_json(self):
        clip = random.choice(SHORT)
        self._qa("qa json 1-10s", 200, json={"audio": base64.b64encode(clip.data).decode(), "question": random.choice(PRESENCE)})

    @task(4)
    def too_long(self):
        self._qa("qa long 10-30s -> 413", 413, expect_code="audio_too_long", **self._form(random.choice(LONG), random.choice(PRESENCE + OPEN)))

    @task(3)
    def too_long_truncated(self):
        self._qa("qa long 10-30s truncate", 200, **self._form(random.choice(LONG), random.choice(PRESENCE + OPEN), truncate="true"))

    @task(6)
    def bad_audio(self):
        name, data, filename, status, code = random.choice(BAD)
        self._qa(f"qa bad {name}", status, expect_code=code, files={"file": (filename, data)}, data={"question": random.choice(PRESENCE)})

    @task(2)
    def empty_question(self):
        self._qa("qa bad empty-question", 422, expect_code="empty_question", **self._form(random.choice(SHORT), "   "))

    @task(5)
    def models(self):
        with self.client.get("/v1/models", name="models", catch_response=True, timeout=30) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}")
