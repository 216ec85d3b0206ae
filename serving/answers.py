"""Reading a free-form answer as yes / no / other, the way the hallucination benchmarks do."""

from __future__ import annotations

import re

_YES = {"yes", "yeah", "yep", "correct", "true", "indeed", "present", "affirmative"}
_NO = {"no", "nope", "not", "false", "absent", "none", "never", "negative"}
_WORD = re.compile(r"[a-z']+")


def classify(answer: str) -> str:
    """``'yes'``/``'no'`` from the answer's first word (benchmarks' rule), else a whole-word search.

    Answers like "There is no dog" start with neither word, so a leading-word miss falls back to
    the first yes/no word anywhere; an answer with neither is ``'other'``.
    """
    words = _WORD.findall(answer.lower())
    if not words:
        return "other"
    if words[0] in _YES:
        return "yes"
    if words[0] in _NO:
        return "no"
    for word in words[:12]:
        if word in {"yes"}:
            return "yes"
        if word in {"no", "not"} or word.endswith("n't"):
            return "no"
    return "other"
