"""A verifier's calibration: raw score → probability, and what a probability says on its own (absent / present /
uncertain). Light (numpy only), so the guard's judgement reads the same thresholds without loading a network."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def reading(p: float | None, absent_below: float, present_above: float, reason: str | None = None) -> bool | None:
    """What a calibrated probability says on its own: absent below ``absent_below``, present from ``present_above``,
    else None (uncertain). A phrase with a ``reason`` (outside the ontology) is never read either way: its score is
    its free text through a space trained only on the classes, and no match is no evidence of absence."""
    if p is None or reason is not None:
        return None
    if p < absent_below:
        return False
    if p >= present_above:
        return True
    return None


@dataclass(frozen=True)
class Calibration:
    """``p = sigmoid(a · raw + b)``, and the two thresholds that turn ``p`` into present / absent / uncertain."""

    a: float = 1.0
    b: float = 0.0
    absent_below: float = 0.1
    present_above: float = 0.5

    def prob(self, raw: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.a * np.asarray(raw, dtype=np.float64) + self.b)))

    def reading(self, p: float | None, reason: str | None = None) -> bool | None:
        """:func:`reading` with this calibration's thresholds."""
        return reading(p, self.absent_below, self.present_above, reason)


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def fuse_logits(weights: list[float], parts: list[np.ndarray]) -> np.ndarray:
    """Verifiers' calibrated probabilities (one array each) as one score: their logits, weighted."""
    return sum(w * logit(p) for w, p in zip(weights, parts))
