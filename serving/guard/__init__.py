"""The absent-sound guard: claims in an answer, checked against the audio before it is returned.

What an answer claims is read by :mod:`serving.answers` (which reads answers for the engines and train/ too).

- :mod:`serving.guard.text` — the frozen text encoder (all-MiniLM-L6-v2) and ontology matching.
- :mod:`serving.guard.scorer` — the embedded audio–text scorer (log-mel CNN projected into MiniLM space).
- :mod:`serving.guard.verifier` — verifiers behind one interface (embedded, CLAP), calibrated.
- :mod:`serving.guard.policy` — per-claim judgement, verdicts and the off/annotate/abstain/correct policies.
"""
