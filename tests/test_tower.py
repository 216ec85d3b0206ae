"""The tower's distillation stage (``train.tower``): the split tower computes what the whole one does, and the
read-out averages exactly the frames inside each YAMNet patch."""

from __future__ import annotations

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
