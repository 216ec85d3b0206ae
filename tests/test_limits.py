"""Request-body checks that need no server: JSON depth and text that is not text."""

from __future__ import annotations

import pytest

from serving.errors import ApiError
from serving.intake import MAX_JSON_DEPTH, check_json, check_text


def _nested(depth: int) -> object:
    value: object = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_json_depth_is_capped():
    check_json({"a": _nested(MAX_JSON_DEPTH - 1)})
    with pytest.raises(ApiError) as err:
        check_json({"a": _nested(MAX_JSON_DEPTH)})
    assert (err.value.status, err.value.code) == (400, "invalid_json")
    with pytest.raises(ApiError):
        check_json({"a": _nested(100_000)})  # walked without recursion


@pytest.mark.parametrize("body, param", [
    ({"question": "dog\ud800?"}, "question"),
    ({"events": ["ok", "\udfff"]}, "events.1"),
    ({"messages": [{"content": [{"text": "a\udc80"}]}]}, "messages.0.content.0.text"),
    ({"k\ud800": 1}, "k\\ud800"),  # the error names it escaped: it must be sendable as UTF-8
])
def test_lone_surrogates_are_refused_where_they_are(body, param):
    with pytest.raises(ApiError) as err:
        check_json(body)
    assert (err.value.status, err.value.code, err.value.param) == (422, "invalid_text", param)
    err.value.message.encode("utf-8")


def test_real_text_passes():
    assert check_text("a dog 🐕 bellt, 狗叫") == "a dog 🐕 bellt, 狗叫"
