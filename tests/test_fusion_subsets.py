"""The fusion benchmark's choices: weights on the validation simplex, held-out packages fused on shared questions."""

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
