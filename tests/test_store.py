"""Weights and adapters from a store (models/store.py, serving/adapters.py), against a real S3 HTTP server.

The server is moto's (``moto[s3]``, a real S3 REST endpoint on a loopback port) and fsspec reaches it through
s3fs, as a pod reaches S3 or an S3-compatible store. The Serve test rolls a new adapter out by writing it to the
store while the application runs, and serves bad adapters beside good ones.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
from pathlib import Path

import httpx
import pytest

from models.store import COMPLETE, NotInStore, StoreError, local_copy
from serving.adapters import ADAPTER_NAME, Catalog, UnknownModel, lora_problem
from tests.conftest import S3_BUCKET as BUCKET
from tests.conftest import drop_served_copies
from tests.helpers import encode, free_port, tone

TINY_ADAPTER = Path(__file__).resolve().parents[1] / "models" / "earwitness-tiny" / "adapter"


def upload(fs, local: Path, key: str) -> str:
    """Write a directory to ``s3://earwitness/<key>/`` file by file; returns its URI."""
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{BUCKET}/{key}/{path.relative_to(local)}")
    fs.invalidate_cache()
    return f"s3://{BUCKET}/{key}"


def test_a_uri_is_copied_once_and_a_new_version_is_a_new_copy(s3, tmp_path):
    fs, options = s3
    uri = upload(fs, TINY_ADAPTER, "copies/a")
    first = local_copy(uri, options, cache=tmp_path)
    assert json.loads((first / COMPLETE).read_text())["uri"] == uri
    assert sorted(p.name for p in first.iterdir() if p.name != COMPLETE) == sorted(p.name for p in TINY_ADAPTER.iterdir())
    assert (first / "adapter_model.safetensors").read_bytes() == (TINY_ADAPTER / "adapter_model.safetensors").read_bytes()
    stamp = (first / "adapter_config.json").stat().st_mtime_ns
    assert local_copy(uri, options, cache=tmp_path) == first  # found, not downloaded again
    assert (first / "adapter_config.json").stat().st_mtime_ns == stamp
    fs.pipe_file(f"{BUCKET}/copies/a/README.md", b"version 2")  # the same URI, new content
    fs.invalidate_cache()
    second = local_copy(uri, options, cache=tmp_path)
    assert second != first and (second / "README.md").read_bytes() == b"version 2"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".partial")] == []  # no half copy left behind
    # the store unreachable: the newest complete copy of that URI serves (a pod restarting during an outage)
    down = {"s3": {**options["s3"], "endpoint_url": f"http://127.0.0.1:{free_port()}", "retries": 1,
                   "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}}
    assert local_copy(uri, down, cache=tmp_path) == second
    with pytest.raises(StoreError):
        local_copy(f"s3://{BUCKET}/copies/never-copied", down, cache=tmp_path)


def test_nothing_there_and_unknown_protocols_are_clear_errors(s3, tmp_path):
    _, options = s3
    with pytest.raises(NotInStore, match="nothing there"):
        local_copy(f"s3://{BUCKET}/no/such/adapter", options, cache=tmp_path)
    with pytest.raises(StoreError, match="nosuch://"):
        local_copy("nosuch://bucket/x", options, cache=tmp_path)
    assert local_copy(f"file://{TINY_ADAPTER}") == TINY_ADAPTER  # a file URI is read in place


def test_a_model_uri_resolves_to_its_cached_checkpoint(s3, tiny_checkpoint, tmp_path, monkeypatch):
    from models.registry import resolve

    fs, options = s3
    monkeypatch.setenv("EARWITNESS_STORE_CACHE", str(tmp_path))
    uri = upload(fs, tiny_checkpoint, "models/tiny")
    spec = resolve(uri, options)
    assert spec.name == "tiny" and spec.family == "qwen2-audio"
    assert Path(spec.source).parent == tmp_path and (Path(spec.source) / "config.json").is_file()


def test_catalog_with_a_store_accepts_any_adapter_name():
    catalog = Catalog.build("m", {}, {"a1": "s3://b/x/a1"}, None, store="s3://b/adapters/")
    assert catalog.resolve("m:later") == ("m:later", "later") and catalog.location("later") == "s3://b/adapters/later"
    assert catalog.location("a1") == "s3://b/x/a1"
    for bad in ("m:../etc", "m:a/b", "m:" + "x" * 60):
        with pytest.raises(UnknownModel):
            catalog.resolve(bad)
    assert not ADAPTER_NAME.fullmatch("..")
    assert Catalog.from_dict(catalog.to_dict()) == catalog
    with pytest.raises(UnknownModel):
        Catalog.build("m", {}, {}, None).resolve("m:later")  # no store: only the configured names


def test_the_models_list_holds_what_the_store_holds(s3, tmp_path):
    """``GET /v1/models`` lists the store's adapters (a directory with an ``adapter_config.json``) after the configured
    ones, once each; a directory without a config, a name no request could use, and an unreadable store list nothing."""
    from serving.adapters import store_adapters

    fs, options = s3
    for name in ("later", "a1", "bad name", "notes"):
        fs.pipe(f"{BUCKET}/listing/{name}/{'README.md' if name == 'notes' else 'adapter_config.json'}", b"{}")
    (tmp_path / "local" / "ready").mkdir(parents=True)
    (tmp_path / "local" / "ready" / "adapter_config.json").write_text("{}")
    (tmp_path / "local" / "empty").mkdir()
    assert store_adapters(f"s3://{BUCKET}/listing", options) == ["a1", "bad name", "later"]
    assert store_adapters(str(tmp_path / "local")) == ["ready"] and store_adapters(str(tmp_path / "nothing")) == []
    assert store_adapters(f"s3://{BUCKET}/nothing-here", options) == []
    assert store_adapters("nope://bucket/x") == []  # no such protocol: logged, not raised
    catalog = Catalog.build("m", {}, {"a1": "s3://b/x/a1"}, None, store=f"s3://{BUCKET}/listing")
    ids = [model_id for model_id, _ in catalog.ids(store_adapters(catalog.store, options))]
    assert ids == ["m", "m:a1", "m:later"]


def corrupt_copy(source: Path, out: Path) -> Path:
    shutil.copytree(source, out)
    data = (out / "adapter_model.safetensors").read_bytes()
    (out / "adapter_model.safetensors").write_bytes(data[: len(data) // 3])  # truncated mid-tensor
    return out


def other_base_copy(source: Path, out: Path) -> Path:
    """The adapter with its first LoRA A matrix one input feature wider, as one trained on a wider model is."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, out)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    key = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 8)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def test_bad_adapters_are_named_before_anything_is_loaded(tmp_path):
    from models.loading import load
    from models.registry import resolve

    _, model = load(resolve("earwitness-tiny"))
    assert lora_problem(TINY_ADAPTER, model) is None
    assert "adapter_config.json" in lora_problem(tmp_path, model)
    assert "not a readable safetensors" in lora_problem(corrupt_copy(TINY_ADAPTER, tmp_path / "corrupt"), model)
    problem = lora_problem(other_base_copy(TINY_ADAPTER, tmp_path / "wide"), model)
    assert "another base" in problem and "features" in problem


# -- a real Serve application whose adapters come from the store ---------------------------------------------


def _ask(base: str, model: str, question: str = "Is there a dog barking?") -> httpx.Response:
    files = {"file": ("clip.wav", encode(tone(1.0, 16_000, 1), 16_000, "wav"), "audio/wav")}
    return httpx.post(f"{base}/v1/audio/qa", files=files, data={"question": question, "model": model, "max_tokens": "6", "guard": "off"}, timeout=60)


@pytest.fixture()
def served_copies():
    """The app's replicas copy into the store cache of their environment: take this test's copies out after it."""
    prefix = f"s3://{BUCKET}/serve/"
    yield prefix
    drop_served_copies(prefix)


@pytest.mark.slow
def test_adapters_roll_out_from_the_store_and_bad_ones_are_refused(s3, server, tiny_checkpoint, tmp_path, served_copies):
    """A running app serves an adapter written to the store after it started, by id; a missing, a corrupt and a
    wrong-base adapter get a 404 / 503 naming them while the others keep being served; concurrent requests to two
    adapters get the answers they get one at a time."""
    from tests.test_openai_api import _random_adapter
    from tests.test_ops_variants import variant_app

    fs, options = s3
    name = tiny_checkpoint.name
    upload(fs, Path(_random_adapter(tiny_checkpoint, tmp_path / "a1", 1)), "serve/a1")
    with variant_app(server, "store", adapter_store=served_copies, store_options=options, max_loaded_adapters=2, max_batch_size=4) as base:
        first = _ask(base, f"{name}:a1")
        assert first.status_code == 200, first.text
        missing = _ask(base, f"{name}:a2")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found" and "'a2'" in missing.json()["error"]["message"]

        # roll out: write it to the store, ask for its id (no restart, no rebuild); the models list shows it
        listed = {m["id"] for m in httpx.get(f"{base}/v1/models", timeout=30).json()["data"]}
        assert f"{name}:a1" in listed and f"{name}:a2" not in listed
        upload(fs, Path(_random_adapter(tiny_checkpoint, tmp_path / "a2", 2)), "serve/a2")
        listed = {m["id"] for m in httpx.get(f"{base}/v1/models", timeout=30).json()["data"]}
        assert {f"{name}:a1", f"{name}:a2", name} <= listed
        second = _ask(base, f"{name}:a2")
        assert second.status_code == 200, second.text
        base_answer = _ask(base, f"{name}:base").json()["answer"]
        assert len({first.json()["answer"], second.json()["answer"], base_answer}) > 1  # the adapters are applied

        upload(fs, corrupt_copy(TINY_ADAPTER, tmp_path / "corrupt"), "serve/corrupt")
        upload(fs, other_base_copy(Path(tmp_path / "a1"), tmp_path / "wide"), "serve/wide")
        for bad in ("corrupt", "wide"):
            refused = _ask(base, f"{name}:{bad}")
            error = refused.json()["error"]
            assert refused.status_code == 503 and error["code"] == "adapter_unavailable" and f"'{bad}'" in error["message"], refused.text
            assert "s3://" not in error["message"]  # the store's location stays out of responses
        again = _ask(base, f"{name}:a1")
        assert again.status_code == 200 and again.json()["answer"] == first.json()["answer"]  # still served

        # a response depends on its own request only: two adapters interleaved == one at a time
        jobs = [(f"{name}:{a}", q) for q in ("Is there a dog barking?", "Is someone speaking?", "Is there music?") for a in ("a1", "a2")]
        sequential = [_ask(base, m, q).json()["answer"] for m, q in jobs]
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            concurrent_answers = [r.json()["answer"] for r in pool.map(lambda job: _ask(base, *job), jobs * 2)]
        assert concurrent_answers == sequential * 2
