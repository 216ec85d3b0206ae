"""loadtests/bench_gpu_train.py and models/memory.py without a GPU: the 7B architectures counted on the meta device,
the memory estimate's parts, the clean skip without CUDA, and the DPO step's code path on tiny configs (CPU, 1 and 2
workers)."""

from __future__ import annotations

import pytest
import torch

from loadtests import bench_gpu_train as bench
from models.memory import count_parameters, dpo_memory, production_config


@pytest.mark.parametrize("family, params_b", [("qwen2-audio", 8.40), ("qwen2.5-omni-thinker", 8.93)])
def test_production_architectures_and_their_memory_order(family, params_b):
    counts = count_parameters(production_config(family))
    assert counts.total / 1e9 == pytest.approx(params_b, abs=0.01)
    assert counts.lora == 16 * counts.layers * sum(  # r=16 on q, k, v, o, gate, up, down of every decoder layer
        i + o for i, o in _linear_shapes(production_config(family).text_config))
    full, checkpointed, qlora = (dpo_memory(counts, mode)["total"] for mode in ("bf16", "bf16+gc", "qlora"))
    assert qlora < checkpointed < full
    assert dpo_memory(counts, "bf16")["weights"] == pytest.approx(counts.total * 2 / 2**30)


def _linear_shapes(text) -> list[tuple[int, int]]:
    head = text.hidden_size // text.num_attention_heads
    h, kv, inter = text.hidden_size, text.num_key_value_heads * head, text.intermediate_size
    return [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]


def test_the_meta_count_is_the_built_models_count():
    config = bench.tiny(production_config("qwen2-audio"))
    from transformers import Qwen2AudioForConditionalGeneration

    assert count_parameters(config).total == sum(p.numel() for p in Qwen2AudioForConditionalGeneration(config).parameters())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_skips_cleanly_without_cuda(capsys):
    assert bench.main([]) == 0
    assert "skipped, no CUDA device" in capsys.readouterr().out


@pytest.mark.slow
def test_the_dpo_step_runs_on_tiny_configs(capsys):
    assert bench.main(["--scale", "tiny", "--families", "qwen2-audio", "--modes", "bf16+gc"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| qwen2-audio")]
    assert [r[2].strip() for r in rows] == ["1", "2"] and all(float(r[3]) > 0 for r in rows)
