"""The encoder probe: a linear head fitted on the train split's audio tokens scores its questions."""

import pytest

from train.data.qa import NEGATIVE_SAMPLINGS as SAMPLINGS
from train.tower_probe import probe, table


def test_probe_separates_present_from_absent_on_what_it_was_fitted_on(tiny_checkpoint, corpus):
    results = probe(tiny_checkpoint, corpus, splits=("train", "test"), epochs=12)
    assert set(results) == {"train", "test"}
    assert set(SAMPLINGS) <= set(results["train"])
    assert all(0.0 <= auc <= 1.0 for aucs in results.values() for auc in aucs.values())
    # fitted on the train scenes' strong labels (even over a random tiny encoder), the asked-about
    # classes must rank above chance there; a row or class mix-up would sit at 0.5
    assert sum(results["train"].values()) / len(SAMPLINGS) > 0.6
    assert table(results).count("\n") == 3


@pytest.mark.slow
def test_frozen_whisper_probe_caches_features_and_holds_packages_out(corpus):
    """Whisper tiny.en's frozen features, cached per (encoder, window, view), fit every head; the
    leave-one-package-out head never trains on the held-out package's scenes."""
    import numpy as np

    from train.features import encoder_features
    from train.frozen_features import held_out_packages
    from train.probe import probe_table, run_probe
    from train.tower_probe import POOLINGS

    clean = encoder_features(corpus, "train", "whisper-tiny.en", window_s=10, progress=False)
    assert clean.last.shape[1:] == (250, 384) and clean.middle.shape == clean.last.shape  # 10 s = 500 positions, pooled by 2
    again = encoder_features(corpus, "train", "whisper-tiny.en", window_s=10, progress=False)
    assert isinstance(again.last, np.memmap) and np.array_equal(again.last[:2], clean.last[:2])  # read back, not recomputed
    heard_elsewhere = encoder_features(corpus, "train", "whisper-tiny.en", window_s=10, view=1, progress=False)
    assert not np.array_equal(heard_elsewhere.last[:4], clean.last[:4])  # an augmented view is other audio
    assert heard_elsewhere.rows == clean.rows

    # raw logits: on 48 train scenes, validation's prior correction would swamp what the heads fitted
    results = run_probe(corpus, encoders=("whisper-tiny.en",), views=(0, 1), lopo_count=2, progress=False, epochs=20, prior_correction=False)
    assert [r["pooling"] for r in results] == list(POOLINGS)
    for r in results:
        assert set(SAMPLINGS) <= set(r["train"]) and all(0.0 <= v <= 1.0 for v in r["test"].values())
        assert r["train"]["all"] > 0.7  # fitted there: a row, class or target mix-up would sit near 0.5
        assert set(r["lopo"]) == set(held_out_packages(corpus, 2))
        for held in r["lopo"].values():
            assert held["train_scenes"] < 2 * 48  # two views of 48 scenes, less those holding the package
    assert probe_table(results).count("\n") == len(results) + 1


def test_prior_correction_takes_out_as_much_prior_as_validation_says_helps():
    """Scores that are a class's prior plus signal want the prior out (β = 1); scores of pure signal want none."""
    import numpy as np

    from train.metrics import choose_prior_correction, class_prior_logits, roc_auc

    rng = np.random.default_rng(0)
    labels = (rng.random((400, 5)) < np.array([0.05, 0.2, 0.4, 0.6, 0.9])).astype(np.float32)
    prior = class_prior_logits(labels)
    present = rng.random((200, 5)) < 0.5  # questions: each class asked about as often present as absent
    signal = present * 1.0 + 0.3 * rng.standard_normal(present.shape)

    def auc_with(scores):
        return lambda offsets: roc_auc(present.ravel(), (scores + offsets).ravel())

    assert choose_prior_correction(auc_with(signal + prior), prior) == 1.0
    assert choose_prior_correction(auc_with(signal), prior) == 0.0


def test_ranking_bounds_read_the_ceiling_and_the_floor_off_the_scores():
    """Separable scores reach accuracy 1 and pass no absent sound; scores that ignore presence reach 0.5 and pass them all."""
    import numpy as np

    from train.metrics import ranking_bounds

    y = np.array([1] * 40 + [0] * 60, bool)
    assert ranking_bounds(y, np.where(y, 0.9, 0.1)) == (1.0, 0.0)
    assert ranking_bounds(y, np.full(100, 0.5)) == (0.5, 1.0)
    # half the absent sounds score like the present ones: the best threshold keeps all present and drops the other half
    s = np.concatenate([np.linspace(0.6, 1.0, 40), np.linspace(0.6, 1.0, 30), np.full(30, 0.1)])
    best, passed = ranking_bounds(y, s)
    assert best == 0.75 and 0.45 <= passed <= 0.5
