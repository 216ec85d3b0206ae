"""Leave-one-package-out: fit without a package's recordings, score the questions about them.

The honest figure for recordings from elsewhere: shared by the probes, the tagger and the verifier's training.
"""

from __future__ import annotations

import numpy as np

from train.frozen_features import ProbeData
from train.metrics import class_prior_logits, question_scores, roc_auc


def leave_one_package_out(data: dict[str, ProbeData], qa: dict[str, list], classes: list[str], packages: list[str], fit,
                          prior_beta: float = 0.0, keep_scores: bool = False) -> dict[str, dict]:
    """Per package P: fit on train scenes holding none of P's recordings; score, over every split's scenes
    that hold P's recordings, questions whose present class came from P against the absent ones.

    ``fit(keep)`` trains a head on the train rows in ``keep`` and returns its ``features -> clip logits``;
    ``prior_beta`` takes that share of the fitted scenes' class prior out of the scores (as chosen on validation).
    ``keep_scores`` also returns each question's key ``(split, scene, class, sampling)``, label and score, so that
    the held-out scores of two heads can be fused question by question."""
    train = data["train"]
    out = {}
    for pkg in packages:
        keep = np.array([pkg not in p for p in train.packages])
        score_of = fit(keep)
        offsets = -prior_beta * class_prior_logits(train.targets[keep].max(1))
        scores, positives, keys = [], [], []
        for split, d in data.items():

            def from_pkg(r, d=d, split=split):
                row = d.rows[r.scene_id]
                if pkg not in d.packages[row] or (split == "train" and keep[row]):
                    return False
                return r.sampling != "positive" or pkg in d.event_packages[row].get(r.label, ())

            asked, positive, score = question_scores(score_of(d.features[: len(d.rows)]) + offsets, d.rows, classes, qa[split], from_pkg)
            scores.append(score)
            positives.append(positive)
            keys += [(split, r.scene_id, r.label, r.sampling) for r in asked]
        y, scores = np.concatenate(positives), np.concatenate(scores)
        out[pkg] = {"auc": roc_auc(y, scores) if y.any() and (~y).any() else float("nan"),
                    "questions": int(len(y)), "train_scenes": int(keep.sum())}
        if keep_scores:
            out[pkg] |= {"keys": keys, "y": y, "scores": scores}
    return out
