"""Which sounds a yes/no question asks about: a small grammar over English question forms (:func:`read_presence`).

Every way of asking whether a sound is there is a presence question, whatever its wording: the guard checks the
answer's 'yes' (or 'no') against the verifier only when it knows the question asked about a sound. The grammar
reads the *form* of the question, never a list of sentences; the sound itself is whatever phrase fills the form,
matched to a class later by the text encoder. The forms, tried in this order on the question with its politeness
("so", "please"), its tags (", right?", "or not", "answer with yes or no") and its place adjuncts ("in the
recording", "in the background", "at all") taken off:

- an embedded clause: "Tell me if / Do you think / I wonder whether <statement>" → the statement's sound;
- existential: "Is / Are / Was / Were / Isn't there X", "Has there been X", "Will there be X", "There's X?";
- hearing: "(Do / Did / Can / Could / Have) (you / we / anyone) hear / detect / notice / make out / pick up X",
  and its ellipses "Hear X?", "Hearing X?";
- passive: "Is / Can / Does X (be) heard / audible / present / there";
- the recording's content: "Does / Did the clip / it / this contain / include / have / feature / sound like X";
- "any": "Any X?", "Anything X-ing?" ("something X-ing"), "Anyone X-ing?" ("someone X-ing");
- a subject and an action: "Is / Are / Was (it / that) X" ("Is someone talking?", "Is a car passing?",
  "Is it raining?"), "Does / Did / Has X" ("Did someone knock?", "Has a dog barked?"), "Could (it) be X";
- a bare phrase with a question mark, short and with no question word: "A dog barking?", "Dogs or cats?".

X may list alternatives: "Are there dogs or cats?" asks about both (``any_of``: a 'yes' says at least one is
there, a 'no' says neither is); "Is there a dog and a cat?" asks about both together (a 'yes' claims each).
Not presence questions: open ones ("What / Which / How …", "Describe …"), counts and comparisons ("twice",
"louder than"), order ("before", "after", "followed by"), and "Is there no X?", whose 'yes' would mean absence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_TARGETS = 4  # the sounds one question may ask about; bounds the verifier's matching work per request


@dataclass(frozen=True)
class Asked:
    """The sounds a presence question asks about, as written, and how they combine."""

    targets: tuple[str, ...]
    any_of: bool = False  # "X or Y": a 'yes' is borne out when one of them is there


_BE = r"(?:is|are|was|were|isn'?t|aren'?t|wasn'?t|weren'?t)"
_DO = r"(?:do|does|did|don'?t|doesn'?t|didn'?t)"
_HAVE = r"(?:has|have|had|hasn'?t|haven'?t|hadn'?t)"
_MODAL = r"(?:can|could|would|will|may|might|cannot|can'?t|couldn'?t|won'?t|wouldn'?t)"
_WHO = r"(?:you|ya|u|we|i|one|anyone|anybody|someone|somebody|people)"
_HEAR = (r"(?:hear|heard|hearing|detect|detected|notice|noticed|make\s+out|pick\s+up|picked\s+up|catch|caught|perceive|"
         r"recogni[sz]e|identify|spot|spotted|distinguish|register)")
_MEDIUM = (r"(?:(?:the|this|that|your|my)\s+)?(?:audio|clip|recording|sound\s+file|sound|track|file|sample|snippet|excerpt|"
           r"soundscape|scene|it|this|that)")
_CONTAIN = (r"(?:contain|contains|containing|include|includes|including|have|has|feature|features|featuring|capture|captures|"
            r"carry|carries|hold|holds|got|sound\s+like|sounds\s+like|make|makes)")
_HEARD = (r"(?:heard|audible|hearable|present|detectable|detected|discernible|perceptible|noticeable|there|recorded|captured|"
          r"included|in\s+there|in\s+it)")

# the question's polite opening, and what may follow the sound without changing it
_OPENING = re.compile(r"^(?:(?:so|and|ok|okay|hey|well|now|also|then|quick\s+question|question|one\s+more|please|just)\b[\s,:;-]*)+", re.I)
_YES_NO = re.compile(r"[\s,.;:-]*\(?(?:please\s+)?(?:answer|respond|reply)\s+(?:with\s+|only\s+)?(?:a\s+)?(?:yes\s+or\s+no|yes/no)\b.*$|"
                     r"[\s,.;:-]*\(?(?:yes\s+or\s+no|yes/no)\)?\s*[?.!]*$", re.I)
_TAIL = re.compile(
    r"(?:[\s,]+(?:or\s+not|right|correct|yes|no|please|at\s+all|anywhere|somewhere|by\s+any\s+chance|here|right\s+now|now|"
    r"too|as\s+well|in\s+(?:it|there)|at\s+any\s+point|(?:any)?where\s+in\s+(?:it|there)|"
    r"(?:in|within|on|from|during|throughout|over|inside|anywhere\s+in|somewhere\s+in|at\s+any\s+point\s+in)\s+"
    r"(?:the|this|that|these|those|your|my)\s+(?:\w+\s+)?(?:audio|clip|recording|sound|track|file|sample|snippet|excerpt|"
    r"background|foreground|distance|scene|soundscape|mix|noise)s?))+\s*$",
    re.I,
)
# a request a sentence answers; after "Can / Could / Would / Will you (please)" only the ones that are never a hearing
# verb ("Can you identify the dog?" asks whether the dog is there)
_REQUEST = r"(?:describe|caption|list|name|summari[sz]e|transcribe|give|write|generate|explain|tell\s+(?:me|us)\s+(?:what|which|who|how|when|where))"
_OPEN = re.compile(rf"^(?:what|which|who|whom|whose|when|where|why|how|count|identify\s+(?:the|all|every)|{_REQUEST})\b", re.I)
_POLITE_REQUEST = re.compile(rf"^(?:can|could|would|will)\s+you\s+(?:please\s+)?{_REQUEST}\b", re.I)
_NOT_PRESENCE = re.compile(r"\b(?:before|after|until|followed\s+by|at\s+the\s+same\s+time|than|twice|thrice|\d+\s+times|"
                           r"(?:two|three|four|five|several|many)\s+times|what|which|who|whom|whose|when|where|why|how)\b", re.I)
_IDLE = re.compile(r"\s+(?:playing|happening|going\s+on|occurring|sounding|in\s+progress)$", re.I)  # "music playing": music

_EMBEDDED = [re.compile(p, re.I) for p in (
    r"^(?:(?:can|could|would|will)\s+you\s+)?(?:please\s+)?(?:tell|let)\s+(?:me|us)(?:\s+know)?\s+(?:if|whether)\s+(?P<c>.+)$",
    rf"^{_DO}\s+(?:you|we)\s+(?:think|believe|reckon|know|suppose)\s+(?:that\s+|if\s+|whether\s+)?(?P<c>.+)$",
    r"^i\s+(?:wonder|want\s+to\s+know|would\s+like\s+to\s+know|need\s+to\s+know)\s+(?:if|whether)\s+(?P<c>.+)$",
    r"^(?:check|confirm|verify|see)\s+(?:if|whether|that)\s+(?P<c>.+)$",
)]
# a statement (an embedded clause, or a question asked in statement order): its sound
_STATEMENT = [re.compile(p, re.I) for p in (
    r"^there(?:'s|\s+is|\s+are|\s+was|\s+were|\s+has\s+been|\s+have\s+been|\s+will\s+be)\s+(?:not\s+)?(?P<x>.+)$",
    rf"^{_WHO}\s+(?:(?:can|could|do|did)\s+)?(?:also\s+)?{_HEAR}\s+(?P<x>.+)$",
    rf"^{_MEDIUM}\s+(?:also\s+)?{_CONTAIN}\s+(?P<x>.+)$",
    rf"^(?P<x>.+?)\s+(?:is|are|was|were|can\s+be|could\s+be)\s+(?:being\s+)?{_HEARD}$",
    r"^(?P<s>.+?)\s+(?:is|are|was|were)\s+(?P<x>\w+ing\b.*)$",  # "someone is talking" → "someone talking"
)]
_QUESTION = [re.compile(p, re.I) for p in (
    rf"^{_BE}\s+there\s+(?:not\s+)?(?P<x>.+)$",
    rf"^{_HAVE}\s+there\s+(?:not\s+)?been\s+(?P<x>.+)$",
    rf"^{_MODAL}\s+there\s+(?:not\s+)?be\s+(?P<x>.+)$",
    r"^is\s+it\s+possible\s+to\s+" + _HEAR + r"\s+(?P<x>.+)$",
    rf"^(?:(?:{_DO}|{_MODAL}|{_HAVE})\s+)?(?:{_WHO}\s+)?(?:not\s+)?(?:also\s+|ever\s+|even\s+|actually\s+|just\s+|still\s+)?{_HEAR}\s+(?P<x>.+)$",
    rf"^(?:{_BE}|{_DO}|{_MODAL}|{_HAVE})\s+(?P<x>.+?)\s+(?:not\s+)?(?:(?:be|been|being)\s+)?{_HEARD}$",
    rf"^(?:{_DO}|{_MODAL}|{_HAVE}|{_BE})\s+{_MEDIUM}\s+(?:also\s+)?(?:not\s+)?{_CONTAIN}\s+(?P<x>.+)$",
    rf"^{_MODAL}\s+(?:it|that|this)\s+(?:not\s+)?be\s+(?P<x>.+)$",
    rf"^{_BE}\s+(?:not\s+)?(?:(?:it|that|this)\s+(?:just\s+|really\s+)?)?(?P<x>.+)$",
    rf"^(?:{_DO}|{_HAVE}|{_MODAL})\s+(?:not\s+)?(?P<x>.+)$",
)]
_ANY = re.compile(r"^(?P<who>any|anything|anyone|anybody|some|something|someone|somebody)\b\s*(?P<x>.*)$", re.I)
_PERSON = {"anyone": "someone", "anybody": "someone", "somebody": "someone", "someone": "someone",
           "anything": "something", "something": "something"}
_KIND_OF = re.compile(r"^(?:(?:any|some|the|a|an|either|both)\s+)?(?:(?:kind|sort|type|sign|trace|hint|bit|form)s?\s+of\s+|"
                      r"(?:sounds?|noises?|audio)\s+(?:of|like|from|made\s+by)\s+)", re.I)
_LEADING = re.compile(r"^(?:any|either|both|also|even|actually|really)\s+", re.I)
_SPLIT = re.compile(r"\s*,\s*(?:or|and)\s+|\s*,\s+|\s+(?:or|and|nor|as\s+well\s+as|plus)\s+", re.I)
_BE_WORD = re.compile(r"\b(?:be|been|being)\s+", re.I)
_EMPTY = re.compile(r"^(?:it|this|that|they|them|something|anything|sound|sounds|noise|noises|audio|any|some|one|ones|else|"
                    r"the|a|an|there|here|heard|audible|present|nothing|none)?$", re.I)
_NEGATIVE_EXISTENCE = re.compile(r"^(?:no|none|nothing|nobody|no\s+one)\b", re.I)
BARE_MAX_WORDS = 8


def _clean(question: str) -> str:
    """The question without its opening, its yes/no instruction, its final punctuation and trailing adjuncts."""
    q = re.sub(r"\s+", " ", question.replace("’", "'").replace("‘", "'")).strip()
    q = _YES_NO.sub("", q)
    q = _OPENING.sub("", q).strip()
    q = re.sub(r"[\s?!.]+$", "", q)
    previous = None
    while previous != q:
        previous, q = q, _TAIL.sub("", q).strip(" ,")
    return q


def _statement(clause: str) -> str:
    """The sound a statement names ("there is X", "you can hear X", "X is audible", "someone is talking"); else itself."""
    for pattern in _STATEMENT:
        m = pattern.match(clause)
        if m:
            return f"{m.group('s')} {m.group('x')}" if "s" in m.groupdict() else m.group("x")
    return clause


def _sounds(x: str) -> tuple[list[str], bool]:
    """The phrase cut into the sounds it lists, without "the sound of", "any", "be"; and whether they are alternatives."""
    x = _TAIL.sub("", x).strip(" ,")
    any_of = bool(re.search(r"\b(?:or|nor)\b", x, re.I))
    out: list[str] = []
    for part in _SPLIT.split(x):
        part = _IDLE.sub("", _BE_WORD.sub("", part).strip(" ,.'\""))
        previous = None
        while previous != part:
            previous = part
            part = _LEADING.sub("", _KIND_OF.sub("", part)).strip()
        m = _ANY.match(part)
        if m and m.group("who").lower() in _PERSON:
            part = f"{_PERSON[m.group('who').lower()]} {m.group('x')}".strip()
        if not _EMPTY.fullmatch(part) and part.lower() not in ("someone", "something") and re.search(r"[A-Za-z]{2,}", part):
            out.append(part)
    out = list(dict.fromkeys(out))[:MAX_TARGETS]
    return out, any_of and len(out) > 1


def read_presence(question: str) -> Asked | None:
    """The sounds a presence question asks about, or None when the question is not one (see the module's grammar)."""
    asked_as_question = question.strip().endswith("?")
    q = _clean(question)
    if not q:
        return None
    for pattern in _EMBEDDED:
        m = pattern.match(q)
        if m:
            q = m.group("c")
            x = _statement(q)
            return _asked(x if x != q else _question_phrase(q, True))
    if _opens(q):
        return None
    return _asked(_question_phrase(q, asked_as_question))


def _question_phrase(q: str, asked_as_question: bool) -> str | None:
    """The phrase a question's form leaves for the sound, or None when no form fits."""
    m = _ANY.match(q)
    if m:  # "Any music?", "Anything ringing?", "Anyone talking?"
        who = m.group("who").lower()
        rest = m.group("x").strip()
        return f"{_PERSON[who]} {rest}" if who in _PERSON and rest else rest or None
    for pattern in _QUESTION:
        m = pattern.match(q)
        if m:
            return m.group("x")
    x = _statement(q)
    if x != q:  # "There's a dog?", "You hear rain?"
        return x
    if asked_as_question and len(q.split()) <= BARE_MAX_WORDS:  # "A dog barking?", "Dogs or cats?"
        return q
    return None


def _asked(x: str | None) -> Asked | None:
    if not x or _NOT_PRESENCE.search(x) or _NEGATIVE_EXISTENCE.match(x.strip()):
        return None
    targets, any_of = _sounds(x)
    return Asked(tuple(targets), any_of) if targets else None


def is_open_request(question: str) -> bool:
    """A question or request that a sentence answers, not a yes or a no: "What do you hear?", "Describe the audio",
    "Generate a caption for the audio.", "Can you describe the clip?" (counts and durations included)."""
    return _opens(_OPENING.sub("", question.strip()).strip())


def _opens(q: str) -> bool:
    return bool(_OPEN.match(q) or _POLITE_REQUEST.match(q))


def presence_target(question: str) -> str | None:
    """The first sound a presence question asks about, or None when it is not one."""
    asked = read_presence(question)
    return asked.targets[0] if asked else None
