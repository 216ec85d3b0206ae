"""The fusion benchmark's choices: weights on the validation simplex, held-out packages fused on shared questions."""

import json

import numpy as np

from loadtests.bench_fusion import best_weights, fused_lopo


def test_the_weights_go_to_the_member_that_ranks_and_sum_to_one():
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.4
    informative = y * 2.0 + rng.normal(0, 1, 400)
    noise = [rng.normal(0, 1, 400) for _ in range(2)]
    w = best_weights([noise[0], informative, noise[1]], y)
    assert abs(sum(w) - 1) < 1e-9 and len(w) == 3 and all(x >= -1e-9 for x in w)
    assert w[1] == max(w) and w[1] >= 0.7
    assert best_weights([informative], y) == [1.0]


def test_held_out_fusion_uses_only_the_questions_every_member_scored():
    a = {"pkg": {("s1", "Dog", "positive"): (True, 2.0), ("s2", "Dog", "random"): (False, -1.0), ("s3", "Cat", "random"): (False, 5.0)}}
    b = {"pkg": {("s1", "Dog", "positive"): (True, 1.0), ("s2", "Dog", "random"): (False, 0.0)}}
    assert fused_lopo([a, b], [0.5, 0.5]) == 1.0  # s3 (only a scored it, and wrongly) is left out
    assert fused_lopo([a], [1.0]) == 0.5  # a alone keeps s3: the positive ranks above one absent, below the other


def _member(tmp_path, name, corpus):
    d = tmp_path / name
    d.mkdir()
    (d / "verifier.json").write_text(json.dumps({"training": {"corpus": str(corpus)}}))
    return d


def _qa(corpus, text):
    (corpus / "qa").mkdir(parents=True)
    (corpus / "qa" / "test.jsonl").write_text(text)
    return corpus


def test_a_member_trains_on_its_cards_corpus_only_when_it_asks_the_same_test_questions(tmp_path):
    from loadtests.bench_fusion import member_corpus

    base = _qa(tmp_path / "base", '{"q": 1}\n')
    teacher = _qa(tmp_path / "teacher", '{"q": 1}\n')
    other = _qa(tmp_path / "other", '{"q": 2}\n')
    assert member_corpus(_member(tmp_path, "t", teacher), base) == teacher
    assert member_corpus(_member(tmp_path, "o", other), base) == base  # other questions: the benchmark's corpus
    assert member_corpus(_member(tmp_path, "m", tmp_path / "missing"), base) == base


def test_held_out_scores_are_kept_and_reread_with_their_keys(tmp_path):
    from loadtests.bench_fusion import cached_held_out

    base = _qa(tmp_path / "base", '{"q": 1}\n')
    member = _member(tmp_path, "earwitness-verifier-aisfx", base)
    scores = {"pkg": {("test", "s1", "Dog", "positive"): (True, 1.5), ("test", "s2", "Dog", "random"): (False, -0.5)}}
    calls = []

    def compute():  # what the heads' training returns (trained for real in test_whisper_verifier)
        calls.append(1)
        return scores

    first = cached_held_out(base, member, None, 3, tmp_path / "cache", 0, compute)
    again = cached_held_out(base, member, None, 3, tmp_path / "cache", 0, compute)
    assert first == again == scores and len(calls) == 1  # the keys come back as tuples, the labels as booleans
    cached_held_out(base, member, None, 5, tmp_path / "cache", 0, compute)  # other epochs: computed again
    assert len(calls) == 2
