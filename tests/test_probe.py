"""The encoder probe: a linear head fitted on the train split's audio tokens scores its questions."""

from train.probe import SAMPLINGS, probe, table


def test_probe_separates_present_from_absent_on_what_it_was_fitted_on(tiny_checkpoint, corpus):
    results = probe(tiny_checkpoint, corpus, splits=("train", "test"), epochs=12)
    assert set(results) == {"train", "test"}
    assert set(SAMPLINGS) <= set(results["train"])
    assert all(0.0 <= auc <= 1.0 for aucs in results.values() for auc in aucs.values())
    # fitted on the train scenes' strong labels (even over a random tiny encoder), the asked-about
    # classes must rank above chance there; a row or class mix-up would sit at 0.5
    assert sum(results["train"].values()) / len(SAMPLINGS) > 0.6
    assert table(results).count("\n") == 3
