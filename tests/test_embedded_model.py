"""The committed embedded default: present, small, loadable offline with its adapter, answering real audio."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from models.registry import TINY_DIR, REGISTRY

pytestmark = pytest.mark.skipif(not (TINY_DIR / "model.safetensors").exists(), reason="the embedded model is not built")


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def test_checkpoint_is_complete_and_small():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "README.md"):
        assert (TINY_DIR / name).exists(), name
    adapter = TINY_DIR / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32
    assert "audio_tower" not in json.dumps(config["target_modules"])  # LoRA scoped to the language model
    assert _size_mb(TINY_DIR) <= 50


def test_shipped_files_name_no_training_machine_paths():
    """The committed model must not point at the directory it was trained in on someone's machine."""
    texts = {f: f.read_text() for f in TINY_DIR.parent.rglob("*") if f.suffix in (".json", ".md", ".jinja")}  # every committed model
    assert texts
    for f, text in texts.items():
        assert not re.search(r"(?<![\w.])/(?:home|work|tmp|root|Users|mnt)/", text), f
    adapter = json.loads((TINY_DIR / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "earwitness-tiny"


def test_point_adapter_at_rewrites_both_records(tmp_path):
    from train.stages import point_adapter_at

    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/somewhere/runs/base", "r": 16}))
    (tmp_path / "earwitness_dpo.json").write_text(json.dumps({"base_model": "/somewhere/runs/base", "beta": 0.1}))
    point_adapter_at(tmp_path, "earwitness-tiny")
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == {"base_model_name_or_path": "earwitness-tiny", "r": 16}
    assert json.loads((tmp_path / "earwitness_dpo.json").read_text()) == {"base_model": "earwitness-tiny", "beta": 0.1}


def test_default_spec_points_at_the_shipped_adapter():
    spec = REGISTRY["earwitness-tiny"]
    assert Path(spec.adapters["default"]).is_dir()


def test_answers_real_scenes_in_its_trained_forms(corpus):
    """On scenes mixed from real recordings, presence questions get yes/no and counts get a number."""
    from serving.backends.hf import TransformersBackend
    from train.evaluate import answer_rows
    from train.data.qa import read_qa_rows

    backend = TransformersBackend.load(REGISTRY["earwitness-tiny"], adapter=REGISTRY["earwitness-tiny"].adapters["default"])
    rows = read_qa_rows(corpus, "test")
    presence = [r for r in rows if r.kind == "presence"][:12]
    counts = [r for r in rows if r.kind == "count"][:6]
    answers = answer_rows(backend, presence + counts, corpus, progress=False)
    assert all(a.lower().rstrip(".") in {"yes", "no"} for a in answers[: len(presence)]), answers
    assert all(a.strip().isdigit() for a in answers[len(presence) :]), answers
