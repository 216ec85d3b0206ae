"""Engine settings, the production Serve configs, model names and adapter checks (no engine started)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from models.registry import REGISTRY
from serving.adapters import Catalog, UnknownModel
from serving.backends.vllm import EngineUnsupported, adapter_problem, check_checkpoint
from serving.config import Settings
from serving.placement import model_actor_options

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = ["qwen2-audio-7b.yaml", "qwen2.5-omni-7b.yaml"]


def _args(name: str) -> dict:
    config = yaml.safe_load((ROOT / "serving/configs" / name).read_text())
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)  # a config `serve run`/`serve deploy` accepts
    (app,) = config["applications"]
    assert app["import_path"] == "serving.app:app_builder"
    return app["args"]


@pytest.mark.parametrize("name", PRODUCTION)
def test_production_config_is_valid_settings(name):
    settings = Settings(**_args(name))  # extra="forbid": a misspelt key fails here
    spec = REGISTRY[settings.model]
    assert settings.engine == "vllm"
    assert settings.model_gpus >= spec.gpus == 1.0
    assert settings.max_audio_s <= spec.max_audio_s
    # the longest clip's audio tokens (25 a second) plus the longest answer fit the context
    assert settings.max_model_len >= spec.max_audio_s * 25 + settings.max_tokens_limit
    assert settings.max_model_len <= spec.max_model_len
    assert settings.gpu_memory_utilization == spec.gpu_memory_utilization
    assert settings.max_ongoing_requests <= settings.max_num_seqs  # the engine can hold every request a replica takes


@pytest.mark.parametrize("name", PRODUCTION)
def test_production_config_builds_an_application(name):
    from serving.app import build

    assert build(Settings(**_args(name))) is not None


def test_specs_state_the_audio_policy():
    audio, omni = REGISTRY["qwen2-audio-7b-instruct"], REGISTRY["qwen2.5-omni-7b"]
    assert audio.max_audio_s == 30.0 and audio.audio_items_per_prompt == 1 and audio.max_model_len == 4096
    assert omni.family == "qwen2.5-omni-thinker" and omni.max_model_len == 8192 and omni.gpus == 1.0


def test_engine_settings_are_checked():
    with pytest.raises(ValidationError):
        Settings(engine="tensorrt")
    with pytest.raises(ValidationError):
        Settings(tensor_paralel_size=2)  # misspelt
    with pytest.raises(ValidationError):
        Settings(gpu_memory_utilization=1.5)


def test_tensor_parallel_reserves_a_placement_group():
    one = model_actor_options(Settings(engine="vllm", model_gpus=1))
    assert one == {"ray_actor_options": {"num_cpus": 1.0, "num_gpus": 1.0}}
    two = model_actor_options(Settings(engine="vllm", tensor_parallel_size=2, model_gpus=2, model_cpus=4))
    assert two["placement_group_bundles"] == [{"CPU": 4.0}, {"GPU": 1.0}, {"GPU": 1.0}]
    assert two["placement_group_strategy"] == "STRICT_PACK" and two["ray_actor_options"]["num_gpus"] == 0
    assert "placement_group_bundles" not in model_actor_options(Settings(engine="transformers", tensor_parallel_size=2))


def test_catalog_names(tmp_path):
    shipped = {"default": str(tmp_path / "adapter")}
    cat = Catalog.build("earwitness-tiny", shipped, {"dpo-v2": str(tmp_path / "v2")}, str(tmp_path / "adapter"))
    assert cat.ids() == [("earwitness-tiny", "default"), ("earwitness-tiny:base", None), ("earwitness-tiny:dpo-v2", "dpo-v2")]
    assert cat.resolve(None) == ("earwitness-tiny", "default")
    assert cat.resolve("earwitness-tiny:default") == ("earwitness-tiny", "default")
    assert cat.resolve("earwitness-tiny:base") == ("earwitness-tiny:base", None)
    assert cat.resolve("dpo-v2") == ("earwitness-tiny:dpo-v2", "dpo-v2")
    for bad in ("../adapter", "earwitness-tiny:../../etc", "earwitness-tiny:/abs", "other-model", "", "a" * 70, "earwitness-tiny:nope"):
        if bad:
            with pytest.raises(UnknownModel):
                cat.resolve(bad)
    plain = Catalog.build("m", {}, {}, None)
    assert plain.ids() == [("m", None)] and plain.resolve("m:base") == ("m", None)
    with pytest.raises(ValueError):
        Catalog.build("m", {}, {"../x": "/tmp"}, None)  # adapter names are checked too
    assert Catalog.from_dict(cat.to_dict()) == cat


def test_vllm_refuses_what_it_cannot_run(tmp_path, tiny_checkpoint):
    # the test checkpoint's 10 s window at hop 320 is 500 mel frames; vLLM's Qwen2-Audio insists on 3000
    with pytest.raises(EngineUnsupported, match="3000"):
        check_checkpoint(str(tiny_checkpoint), "qwen2-audio")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"modules_to_save": ["multi_modal_projector"]}))
    assert "earwitness export --merge" in adapter_problem(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"modules_to_save": None, "r": 8}))
    assert adapter_problem(tmp_path) is None


def test_vllm_refuses_a_tied_config_with_its_own_lm_head(tmp_path, tiny_checkpoint):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    config = json.loads((ckpt / "processor_config.json").read_text())
    config["feature_extractor"].update(chunk_length=30, hop_length=160, nb_max_frames=3000)  # a window vLLM takes
    (ckpt / "processor_config.json").write_text(json.dumps(config))
    model_config = json.loads((ckpt / "config.json").read_text())
    model_config["text_config"]["tie_word_embeddings"] = True  # claims tied, yet the weights hold an lm_head
    (ckpt / "config.json").write_text(json.dumps(model_config))
    with pytest.raises(EngineUnsupported, match="tie_word_embeddings"):
        check_checkpoint(str(ckpt), "qwen2-audio")


def test_vllm_cpu_engine_processes_start_with_one_omp_thread(monkeypatch):
    """What a process started during the engine's start-up inherits: OMP_NUM_THREADS=1 on CPU (Ray's value for
    the replica would give vLLM's engine core that many spin-waiting torch threads beside the worker), the
    replica's own value with CUDA; and the replica's environment afterwards as it was, set or unset, also
    when the start fails."""
    import os
    import subprocess
    import sys

    from serving.backends.vllm import _one_engine_core_thread

    def child() -> str:
        code = "import os; print(os.environ.get('OMP_NUM_THREADS'))"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with _one_engine_core_thread(cuda=False):
        assert child() == "1"
    assert os.environ["OMP_NUM_THREADS"] == "2"
    with _one_engine_core_thread(cuda=True):
        assert child() == "2"
    monkeypatch.delenv("OMP_NUM_THREADS")
    with pytest.raises(RuntimeError):
        with _one_engine_core_thread(cuda=False):
            raise RuntimeError("the engine did not start")
    assert "OMP_NUM_THREADS" not in os.environ
