"""The tower's distillation stage (``train.tower``): the split tower computes what the whole one does, and the
read-out averages exactly the frames inside each YAMNet patch."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def _tiny_tower(layers: int = 4):
    from transformers import Qwen2AudioEncoder, Qwen2AudioEncoderConfig

    torch.manual_seed(0)
    config = Qwen2AudioEncoderConfig(num_mel_bins=8, encoder_layers=layers, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
                                     max_source_positions=50)
    return Qwen2AudioEncoder(config).eval()


@pytest.mark.parametrize("cut", [0, 2, 4])
def test_trunk_then_top_is_the_tower(cut):
    from train.tower import run_top, run_trunk

    tower = _tiny_tower()
    mel = torch.randn(2, 8, 100)
    with torch.no_grad():
        whole = tower(mel).last_hidden_state
        split = run_top(tower, run_trunk(tower, mel, cut), cut)
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-5)


def test_each_patch_averages_the_frames_inside_it():
    from models.pretrained.yamnet import PATCH_HOP_S, PATCH_S
    from train.tower import patch_pooling

    frames, frame_s = 250, 0.04  # a 10 s window's frames after the pooler
    pool = patch_pooling(frames, frame_s, 20)
    torch.testing.assert_close(pool.sum(1), torch.ones(20))
    times = torch.arange(frames) * frame_s + frame_s / 2
    for p in (0, 7, 19):
        inside = (times >= p * PATCH_HOP_S) & (times < p * PATCH_HOP_S + PATCH_S)
        assert torch.equal(pool[p] > 0, inside)


def test_a_config_trains_only_above_its_cache():
    from train.tower import TowerDistillConfig

    with pytest.raises(ValueError, match="tune_layers"):
        TowerDistillConfig(cached_layers=2, tune_layers=3)
    assert TowerDistillConfig(cached_layers=2, tune_layers=0).cut == 2


@pytest.mark.slow
def test_distillation_trains_only_the_top_layers_and_measures_on_test(corpus, tmp_path):
    """A real run on the test corpus: the stage writes the tuned layers and the read-out only, the layers below
    stay as fetched, and the card carries validation and test ROC-AUC and how much of AudioSet it kept."""
    import json

    from safetensors.torch import load_file

    from models.pretrained import POSITIONS_PER_SECOND, whisper_encoder
    from train.data.ontology import load_ontology
    from train.tower import TowerDistillConfig, distil, distilled_layers, export_whisper, make_student

    cfg = TowerDistillConfig(cached_layers=2, tune_layers=1, epochs=2, batch_size=8, lr_tower=1e-3)
    classes = load_ontology(corpus / "ontology.json").names
    card = distil(corpus, tmp_path / "tower", cfg, classes, progress=False)
    assert all(np.isfinite(h["loss"]) for h in card["history"]) and len(card["history"]) == 2
    assert 0.0 <= card["metrics"]["test_roc_auc"]["all"] <= 1.0 and 0.0 <= card["metrics"]["audioset_teacher_top1_in_top5"] <= 1.0
    saved = load_file(str(tmp_path / "tower" / "tower.safetensors"))
    assert {k.split(".")[2] for k in saved if k.startswith("tower.layers.")} == {"3"}  # the top layer only
    assert any(k.startswith("readout.") for k in saved)
    original = whisper_encoder(cfg.encoder, max_source_positions=cfg.window_s * POSITIONS_PER_SECOND).state_dict()
    assert any(not torch.equal(v, original[k.removeprefix("tower.")]) for k, v in saved.items() if k.startswith("tower.layers.3."))
    student = make_student(cfg, len(classes), 20)
    assert [p.requires_grad for p in student.tower.layers[2].parameters()] and not any(p.requires_grad for p in student.tower.layers[2].parameters())
    assert json.loads((tmp_path / "tower" / "distill.json").read_text())["config"]["tune_layers"] == 1
    assert distilled_layers(tmp_path / "tower") == (3,)  # what earwitness-small commits when built on it
    # exported as a Whisper checkpoint, which every encoder argument takes
    exported = export_whisper(tmp_path / "tower", cfg.encoder)
    tower = whisper_encoder(str(exported), max_source_positions=cfg.window_s * POSITIONS_PER_SECOND)
    torch.testing.assert_close(tower.layers[3].fc1.weight, saved["tower.layers.3.fc1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(tower.layers[2].fc1.weight, original["layers.2.fc1.weight"], rtol=0, atol=0)


def test_a_checkpoints_committed_tower_layers_become_its_whisper_tower():
    """``--tower models/earwitness-small``: the shipped distilled layers (float16, as committed) in the fetched Whisper,
    in a directory named by their hash, so every stage on that tower reads one feature cache."""
    from safetensors.torch import load_file

    from models.pretrained.wheels import WheelError
    from models.registry import SMALL_DIR
    from train.tower import tower_whisper

    try:
        whisper, layers = tower_whisper(SMALL_DIR)
    except WheelError as e:
        pytest.skip(f"pretrained wheels unavailable: {e}")
    assert layers == (2, 3) and tower_whisper(SMALL_DIR)[0] == whisper
    shipped, exported = load_file(str(SMALL_DIR / "trained.safetensors")), load_file(str(whisper / "model.safetensors"))
    key = next(k for k in exported if k.endswith("encoder.layers.3.fc1.weight"))
    assert torch.equal(exported[key], shipped["model.audio_tower.layers.3.fc1.weight"].float())
    assert not any(k.startswith("model.audio_tower.layers.1.") for k in shipped)  # the layers below stay the part's
