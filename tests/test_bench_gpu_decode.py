"""loadtests/bench_gpu_decode.py without a GPU: the 7B configs it builds, the bytes a decode step reads, the floor,
the checkpoint vLLM would load, and the fast refusal without CUDA. (The engine part runs with ``--tiny`` in the
vLLM environment: README "Benchmarks".)"""

from __future__ import annotations

import pytest
import torch

from loadtests import bench_gpu_decode as bench


@pytest.mark.parametrize("family, params_b, step_gb, kv", [
    ("qwen2-audio", 8.40, 14.23, 2 * 32 * 32 * 128 * 2),  # Qwen2-Audio-7B-Instruct: 8.4 B parameters, MHA 32 heads of 128
    ("qwen2.5-omni-thinker", 8.93, 14.14, 2 * 28 * 4 * 128 * 2),  # the Omni-7B thinker: GQA, 4 KV heads
])
def test_the_published_architectures_and_what_a_decode_step_reads(family, params_b, step_gb, kv):
    tokenizer = bench.make_tokenizer(family)
    ids = bench.special_ids(tokenizer)
    config = bench.build_config(family, ids)
    thinker = getattr(config, "thinker_config", config)
    assert thinker.audio_token_index == ids["<|AUDIO|>"] < len(tokenizer)  # the small tokenizer's placeholder is the model's
    sizes = bench.weight_bytes(family, config)
    assert sizes.total / 2 / 1e9 == pytest.approx(params_b, abs=0.01)
    assert sizes.per_step / 1e9 == pytest.approx(step_gb, abs=0.01)  # no towers, no embedding table
    assert sizes.kv_per_token == kv
    # the floor on an H100 SXM (3350 GB/s): the weights once, plus the KV cache of each sequence
    one = bench.floor_ms(sizes, 1, 288, 3350)
    assert one == pytest.approx(1000 * (sizes.per_step + 288 * kv) / 3350e9)
    assert 4.0 < one < 4.5 and bench.floor_ms(sizes, 32, 288, 3350) > one


def test_datasheet_bandwidth_matches_the_specific_card_first():
    assert bench.datasheet_bandwidth("NVIDIA H100 80GB HBM3") == 3350
    assert bench.datasheet_bandwidth("NVIDIA H100 NVL") == 3900
    assert bench.datasheet_bandwidth("NVIDIA H100 PCIe") == 2000
    assert bench.datasheet_bandwidth("NVIDIA H200") == 4800
    assert bench.datasheet_bandwidth("Some Other Card") is None


def test_the_checkpoint_holds_what_vllm_reads(tmp_path):
    config = bench.write_checkpoint("qwen2-audio", tmp_path)
    assert {"config.json", "tokenizer.json", "processor_config.json"} <= {p.name for p in tmp_path.iterdir()}
    assert not list(tmp_path.glob("*.safetensors"))  # vLLM's load_format="dummy" makes the weights
    ids = bench.prompt_ids(tmp_path)
    assert ids.count(config.audio_token_index) == 1  # one placeholder, expanded by vLLM to the clip's tokens


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_it_refuses_at_once(capsys):
    assert bench.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
