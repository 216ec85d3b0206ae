"""Scores into numbers: ROC-AUC, what any threshold could reach, Platt scaling, class-prior correction, and the
presence questions' ROC-AUC per negative sampling and per class.

Shared by the verifier's training (``train.verifier``), the probes (``train.probe``, ``train.tower_probe``), the binding diagnostic and
the benchmarks, which all rank presence questions by a score.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from train.data.qa import NEGATIVE_SAMPLINGS as SAMPLINGS


def fit_platt(scores: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """``p = sigmoid(a·s + b)`` by log-loss (L-BFGS with a line search), fitted on standardised scores so that scores
    of any scale (raw AudioSet logits span tens of units) converge, then mapped back to ``s``."""
    s = np.asarray(scores, dtype=np.float64)
    mean, std = float(s.mean()), float(s.std()) or 1.0
    a = torch.tensor(1.0, requires_grad=True)
    b = torch.tensor(0.0, requires_grad=True)
    z, t = torch.tensor((s - mean) / std, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    opt = torch.optim.LBFGS([a, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(a * z + b, t)
        loss.backward()
        return loss

    opt.step(closure)
    a_z, b_z = float(a.detach()), float(b.detach())
    return a_z / std, b_z - a_z * mean / std


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    y, s = np.asarray(y).astype(bool), np.asarray(s, dtype=np.float64)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ranking_bounds(y: np.ndarray, s: np.ndarray, keep: float = 0.95) -> tuple[float, float]:
    """What any threshold on these scores can reach, tuned on the very questions it is scored on.

    ``(best balanced accuracy, share of absent sounds scored at or above the threshold that keeps
    ``keep`` of the present ones)``: the ceiling on a presence answer read from the scores, and the
    floor on `correct`'s false 'yes' when it may override at most ``1 - keep`` of true 'yes' answers.
    """
    y, s = np.asarray(y).astype(bool), np.asarray(s, dtype=np.float64)
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    cuts = np.unique(s)
    tpr = 1.0 - np.searchsorted(pos, cuts, side="left") / len(pos)  # present scored >= cut
    tnr = np.searchsorted(neg, cuts, side="left") / len(neg)  # absent scored < cut
    cut = pos[int(np.floor((1.0 - keep) * len(pos)))]
    return float(np.max((tpr + tnr) / 2)), float(np.mean(neg >= cut))


PRIOR_BETAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def class_prior_logits(labels: np.ndarray) -> np.ndarray:
    """Each class's log-odds of being present in a training clip (``labels`` ``[N, C]``, Laplace-smoothed)."""
    prior = (labels.sum(0) + 1) / (len(labels) + 2)
    return np.log(prior / (1 - prior))


def choose_prior_correction(validation_auc, prior_logit: np.ndarray, betas: tuple[float, ...] = PRIOR_BETAS) -> float:
    """How much of the training prior to take out of each class's score: the β whose offsets ``-β·prior``
    give the best validation ROC-AUC (``validation_auc(offsets)``).

    Presence questions ask about rare and frequent sounds alike, while a head trained on scenes learns
    that frequent classes are usually there: left in, that prior ranks an absent popular sound above a
    present rare one.
    """
    return max(betas, key=lambda beta: validation_auc(-beta * prior_logit))


def question_scores(logits: np.ndarray, rows_of: dict[str, int], classes: list[str], qa_rows, select=None) -> tuple[list, np.ndarray, np.ndarray]:
    """``(questions, present?, the asked-about class's clip logit)`` of the presence questions about scenes in ``rows_of``.

    ``select(row) -> bool`` keeps only some questions (leave-one-package-out keeps a package's scenes).
    """
    index = {name: i for i, name in enumerate(classes)}
    asked = [r for r in qa_rows if r.kind == "presence" and r.scene_id in rows_of and r.label in index
             and (select is None or select(r))]
    score = np.array([logits[rows_of[r.scene_id], index[r.label]] for r in asked])
    return asked, np.array([r.sampling == "positive" for r in asked], dtype=bool), score


def presence_auc(logits: np.ndarray, rows_of: dict[str, int], classes: list[str], qa_rows, select=None) -> dict[str, float]:
    """ROC-AUC of the asked-about class's clip logit: positives against each negative sampling, and all together."""
    asked, positive, score = question_scores(logits, rows_of, classes, qa_rows, select)
    out = {}
    for sampling in (*SAMPLINGS, "all"):
        sel = np.array([r.sampling == "positive" or sampling in ("all", r.sampling) for r in asked], dtype=bool)
        if sel.any() and positive[sel].any() and (~positive[sel]).any():
            out[sampling] = roc_auc(positive[sel], score[sel])
    return out


def per_class_auc(logits: np.ndarray, rows_of: dict[str, int], classes: list[str], qa_rows) -> dict[str, float]:
    """Test ROC-AUC per asked-about class (all negative samplings): which classes stay weak."""
    out = {}
    for name in classes:
        auc = presence_auc(logits, rows_of, classes, qa_rows, select=lambda r, n=name: r.label == n).get("all")
        if auc is not None:
            out[name] = round(auc, 3)
    return out
