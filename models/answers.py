"""Reading a free-form answer: yes / no / other, the way the hallucination benchmarks do (:func:`classify`);
whether it has the form its question asks for (:func:`answers_the_question`); and what it claims to hear, the
sound events the guard checks against the audio (:func:`extract_claims`):

- A presence question (any wording :func:`models.questions.read_presence` knows: "Is there X", "Is someone
  talking?", "Any music?", "Are there X or Y?") answered 'yes' claims each sound it asks about (``either``: one of
  several alternatives). Answered 'no', it claims nothing here (the guard checks a 'no' as a claim of absence).
- Any other answer (a caption, "I hear a dog and rain") claims each sound it mentions: the
  answer is cut into mention spans at clause and list boundaries, stripped of hearing verbs
  ("I hear", "there is"), and negated spans ("no dog", "without rain") are dropped. Which of
  those spans name a sound is decided later, by matching them to the ontology with the text
  encoder; spans that match nothing are not claims.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from models.questions import is_open_request, read_presence

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



_SPLIT = re.compile(r"\s*(?:[.;:!?]+\s+|[.;:!?]+$|,\s*|\s+(?:and|then|while|as|with|followed\s+by|before|after|plus|also|but)\s+)\s*", re.I)
_LEAD = re.compile(
    r"^(?:yes|yeah|no)?[\s,]*(?:i\s+(?:can\s+)?(?:hear|heard|detect|notice)|(?:you\s+can\s+)?hear|there\s+(?:is|are|was|were)|"
    r"it\s+(?:sounds|is)\s+like|this\s+is|the\s+(?:audio|clip|recording)\s+(?:has|contains|features|includes)|"
    r"in\s+the\s+(?:background|foreground)|(?:in\s+)?the\s+background|someone\s+can\s+be\s+heard|can\s+be\s+heard)\b\s*",
    re.I,
)
_CONNECT = re.compile(r"^(?:and|then|with|while|also|only|plus|but|as|or|just|maybe|perhaps|possibly)\b[\s,]*", re.I)
_TAIL = re.compile(r"[\s,]+(?:in\s+the\s+(?:background|foreground|distance)|too|as\s+well|again|nearby|at\s+the\s+(?:start|end|beginning))$", re.I)
_NEGATED = re.compile(r"^(?:no|not|never|without|nothing|none|neither|nor)\b|\b(?:no|not|n't|never|without)\s+\w+", re.I)
_FILLER = re.compile(r"^(?:sound|sounds|noise|noises|audio|clip|it|this|that|here|there|something|yes|no|then|a|the)?$", re.I)


_WORDY = re.compile(r"[A-Za-z]{3,}")
MAX_MENTIONS = 8  # an answer's first mentions; bounds the guard's matching work per answer
MAX_MENTION_WORDS = 10


@dataclass(frozen=True)
class Claim:
    text: str  # the mention as written ("a puppy yapping")
    source: str  # "question" (a presence question answered yes) or "answer" (a free-form mention)
    span: tuple[int, int] | None = None  # where in the answer, for answer mentions
    either: bool = False  # one of a question's alternatives ("X or Y"): judged with the others, as one


def answer_mentions(answer: str) -> list[Claim]:
    """Candidate sound mentions in a free-form answer, negated ones left out."""
    out: list[Claim] = []
    pos = 0
    for piece in _SPLIT.split(answer):
        if not piece:
            continue
        start = answer.find(piece, pos)
        pos = start + len(piece) if start >= 0 else pos
        text = piece.strip()
        while True:
            stripped = _TAIL.sub("", _CONNECT.sub("", _LEAD.sub("", text))).strip()
            if stripped == text:
                break
            text = stripped
        if _NEGATED.search(text) or _FILLER.fullmatch(text.strip(" .,")):
            continue
        if not _WORDY.search(text) or len(text.split()) > MAX_MENTION_WORDS:
            continue  # not a phrase naming a sound (digits, symbols, a run-on sentence)
        out.append(Claim(text.strip(" .,"), "answer", (start, start + len(piece)) if start >= 0 else None))
        if len(out) >= MAX_MENTIONS:
            break
    return out


def extract_claims(question: str, answer: str) -> list[Claim]:
    """The sound events an answer claims to hear.

    A presence question with a 'yes' claims its targets; with a 'no' nothing. Anything else is
    read as free text. A presence answer that goes on ("Yes, a dog barks and rain falls") also
    claims the extra mentions.
    """
    asked = read_presence(question)
    kind = classify(answer)
    if asked is not None and kind == "no":
        return []
    claims: list[Claim] = []
    if asked is not None and kind == "yes":
        claims += [Claim(t, "question", either=asked.any_of) for t in asked.targets]
    targets = {t.lower() for t in asked.targets} if asked else set()
    claims += [m for m in answer_mentions(answer) if m.text.lower() not in targets]
    return claims


_COUNT_Q = re.compile(r"^\s*(?:how\s+many\b(?!\s+seconds)|count\b)", re.I)
_DURATION_Q = re.compile(r"\bhow\s+long\b|\bhow\s+many\s+seconds\b|\bfor\s+how\s+long\b|\bduration\b", re.I)
_NUMBER = re.compile(r"\d|\b(?:zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|once|twice|none)\b", re.I)
_BARE = re.compile(r"^\W*(?:yes|no|\d+(?:\.\d+)?)\W*$", re.I)


def is_open_question(question: str) -> bool:
    """An open question about the clip ("What do you hear?", "Generate a caption for the audio."): a sentence answers
    it, not a yes, a no or a number."""
    return is_open_request(question) and not (_DURATION_Q.search(question) or _COUNT_Q.search(question))


def answers_the_question(question: str, answer: str) -> bool:
    """Whether the answer has the form the question asks for: a yes or a no to a presence question (any phrasing
    :func:`read_presence` knows), a number to a count or a duration, more than a bare yes, no or number to an
    open question. Anything else (a "1" to "Can you hear someone talking?") is reported as unparsed."""
    if _DURATION_Q.search(question) or _COUNT_Q.search(question):
        return bool(_NUMBER.search(answer))
    if is_open_question(question):
        return not _BARE.match(answer) and bool(re.search(r"[A-Za-z]{3,}", answer))
    if read_presence(question) is not None:
        return classify(answer) in ("yes", "no")
    return True
