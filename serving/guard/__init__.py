"""The absent-sound guard: claims in an answer, checked against the audio before it is returned.

What an answer claims is read by :mod:`models.answers`; the verifier itself (text encoder, scorers, calibration,
checkpoints) is a model in :mod:`models.verifier`, run by the verifier deployment (``serving/verifier_server.py``).

- :mod:`serving.guard.runner` — the ingress side: the verifier's call beside the model's, then the judgement.
- :mod:`serving.guard.policy` — per-claim judgement, verdicts and the off/annotate/abstain/correct policies.
"""
