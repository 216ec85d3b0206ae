"""The absent-sound guard: claims in an answer, checked against the audio before it is returned.

- :mod:`serving.guard.text` — the frozen text encoder (all-MiniLM-L6-v2) and ontology matching.
- :mod:`serving.guard.claims` — which sound events a question/answer pair claims are heard.
- :mod:`serving.guard.scorer` — the embedded audio–text scorer (log-mel CNN projected into MiniLM space).
- :mod:`serving.guard.verifier` — verifiers behind one interface (embedded, CLAP), calibrated.
- :mod:`serving.guard.policy` — per-claim judgement, verdicts and the off/annotate/abstain/correct policies.
"""
