"""Property tests against the real app: whatever a request holds, the answer is < 500 (but 503 backpressure), a
4xx has a JSON error body, and valid requests sent beside it are still answered, with the answers they get alone
(known requests from the campaign's pool, their references taken alone once).

The cases come from the fuzz campaign's builders (loadtests/fuzz.py: containers and their headers, sample
values, lengths, channel counts, text, JSON shapes and depths, parameters, HTTP headers, raw protocol), driven
by hypothesis' ``randoms()``; text and JSON values also come from hypothesis' own strategies. Derandomized and
bounded: about a minute on two cores. ``python -m loadtests.fuzz`` is the long campaign.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadtests.fuzz import (
    CLASSES,
    ENDPOINTS,
    KNOWN,
    SPECIAL_TOKENS,
    Case,
    known_references,
    problems,
    send,
    valid_clip,
)

pytestmark = pytest.mark.slow  # about a minute of hostile traffic

TIMEOUT_S = 60.0
BOUNDED = settings(max_examples=70, deadline=None, derandomize=True, database=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
HOSTILE = sorted(set(CLASSES) - {"valid", "known"})
# text as a client may send it: any code point, lone surrogates, special tokens of the served and verifier tokenizers
TEXT = st.lists(st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr), st.sampled_from(SPECIAL_TOKENS)), max_size=40).map("".join)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=12)


_REFERENCES: dict[str, dict] = {}


def _references(url: str) -> dict:
    """The known requests' answers alone, taken once per server."""
    if url not in _REFERENCES:
        _REFERENCES[url] = known_references(url, TIMEOUT_S)
    return _REFERENCES[url]


def _with_neighbours(url: str, case: Case, neighbours: int = 2) -> None:
    """``case`` sent with ``neighbours`` known valid requests at the same time (so they share model batches and the
    verifier); all judged, and the neighbours' answers must be the ones they get alone."""
    refs = _references(url)
    valid = [KNOWN[(len(case.body) + i) % len(KNOWN)] for i in range(neighbours)]
    with cf.ThreadPoolExecutor(1 + neighbours) as pool:
        results = list(pool.map(lambda c: send(url, c, TIMEOUT_S), [case, *valid]))
    for sent, result in zip([case, *valid], results):
        found = problems(sent, result, refs)
        assert not found, (sent.cls, sent.path, found, result.status, result.body[:300])


@BOUNDED
@given(rnd=st.randoms(use_true_random=False), cls=st.sampled_from(HOSTILE))
def test_no_hostile_request_gets_a_5xx_or_fails_its_neighbours(server, rnd, cls):
    url, _ = server
    _with_neighbours(url, CLASSES[cls][0](rnd))


@settings(BOUNDED, max_examples=50)
@given(path=st.sampled_from(ENDPOINTS), text=TEXT, fields=st.dictionaries(st.sampled_from(
    ["max_tokens", "max_completion_tokens", "model", "guard", "truncate", "n", "stream", "earwitness", "messages", "events", "question"]), JSON, max_size=3),
    depth=st.integers(0, 40))
def test_any_json_fields_and_text_get_a_json_answer(server, path, text, fields, depth):
    url, _ = server
    audio = base64.b64encode(valid_clip(random.Random(len(text)))).decode()
    body = {"audio": audio, "question": text, "events": [text or "a dog"],
            "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}, {"type": "text", "text": text}]}],
            **fields}
    for _ in range(depth):
        body = {"nested": body} if path != "/v1/chat/completions" else {**body, "earwitness": {"x": body.get("earwitness")}}
    raw = json.dumps(body, ensure_ascii=True, allow_nan=True).encode()
    _with_neighbours(url, Case("json", path, raw, {"content-type": b"application/json"}), neighbours=1)
