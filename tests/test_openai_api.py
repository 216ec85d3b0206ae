"""OpenAI-compatible chat completions and LoRA adapters routed by Serve model multiplexing.

Driven with the official ``openai`` client against a real Serve application (a variant beside the
session server) that serves the tiny checkpoint plus two random LoRA adapters, one kept loaded at a time.
"""

from __future__ import annotations

import base64

import httpx
import openai
import pytest
import torch

from tests.helpers import encode, tone
from tests.test_ops_variants import variant_app


def _random_adapter(base, out, seed: int):
    from peft import get_peft_model
    from transformers import Qwen2AudioForConditionalGeneration

    from train.lora import lora_config

    model = Qwen2AudioForConditionalGeneration.from_pretrained(base)
    peft_model = get_peft_model(model, lora_config(model, r=4))
    gen = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero (a no-op adapter); make it change the answers
            param.data = torch.randn(param.shape, generator=gen)
    peft_model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def adapter_dirs(tiny_checkpoint, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {"a1": _random_adapter(tiny_checkpoint, root / "a1", 1), "a2": _random_adapter(tiny_checkpoint, root / "a2", 2)}


@pytest.fixture(scope="module")
def adapted(server, tiny_checkpoint, adapter_dirs):
    with variant_app(server, "oai", adapters=adapter_dirs, max_loaded_adapters=1, max_batch_size=4) as base:
        yield base, tiny_checkpoint.name


@pytest.fixture(scope="module")
def oai(adapted):
    base, _ = adapted
    with openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def _audio_part(ext: str = "wav") -> dict:
    data = base64.b64encode(encode(tone(1.0, 16_000, 1), 16_000, ext)).decode()
    return {"type": "input_audio", "input_audio": {"data": data, "format": ext}}


def _ask(oai, model, *, ext="wav", question="Is there a dog barking?", **kw):
    messages = [{"role": "user", "content": [_audio_part(ext), {"type": "text", "text": question}]}]
    return oai.chat.completions.create(model=model, messages=messages, max_tokens=6, **kw)


def test_models_lists_base_and_adapters(oai, adapted):
    _, name = adapted
    ids = [m.id for m in oai.models.list().data]
    assert ids == [name, f"{name}:a1", f"{name}:a2"]


def test_chat_completion_with_input_audio(oai, adapted):
    _, name = adapted
    out = _ask(oai, name)
    assert out.object == "chat.completion" and out.model == name
    assert isinstance(out.choices[0].message.content, str) and out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 6
    extra = out.model_extra["earwitness"]
    assert extra["answer_kind"] in ("yes", "no", "other", "unparsed")
    assert extra["audio"]["duration_s"] == pytest.approx(1.0, abs=0.01)
    assert "guard" in extra  # the guard's verdict (null where no guard runs)


@pytest.mark.parametrize("ext", ["flac", "ogg", "mp3"])
def test_other_audio_formats(oai, adapted, ext):
    assert _ask(oai, adapted[1], ext=ext).choices[0].message.content is not None


def test_adapters_are_routed_and_reloaded(oai, adapted):
    """a1 → a2 → a1 with one adapter slot per replica: each switch evicts and reloads, answers stay the adapter's."""
    _, name = adapted
    answers = {}
    for model in (name, f"{name}:a1", f"{name}:a2", f"{name}:a1", "a2"):
        answers.setdefault(model.split(":")[-1], []).append(_ask(oai, model).choices[0].message.content)
    assert answers["a1"][0] == answers["a1"][1]  # reloaded after eviction: the same weights
    assert answers["a2"][0] == answers["a2"][1]  # the bare adapter name routes to the same adapter
    assert len({answers[name][0], answers["a1"][0], answers["a2"][0]}) > 1  # adapters change the model


@pytest.mark.slow
def test_fused_topology_serves_the_same_adapters(oai, adapted, server, adapter_dirs):
    """The engine in the ingress replica (topology fused) answers every model id as the split app does."""
    _, name = adapted
    models = (name, f"{name}:a1", f"{name}:a2", f"{name}:a1", "a2")
    split = [_ask(oai, model).choices[0].message.content for model in models]
    with variant_app(server, "oai-fused", topology="fused", adapters=adapter_dirs, max_loaded_adapters=1, max_batch_size=4) as base:
        with openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60) as fused:
            assert [m.id for m in fused.models.list().data] == [name, f"{name}:a1", f"{name}:a2"]
            assert [_ask(fused, model).choices[0].message.content for model in models] == split


def test_streaming(oai, adapted):
    chunks = list(_ask(oai, adapted[1], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _ask(oai, adapted[1]).choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_qa_endpoint_takes_adapter_names(adapted):
    base, name = adapted
    files = {"file": ("a.wav", encode(tone(1.0, 16_000, 1), 16_000), "audio/wav")}
    r = httpx.post(f"{base}/v1/audio/qa", files=files, data={"question": "Is there a dog?", "model": f"{name}:a2", "max_tokens": "4"}, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("model", ["nope", "../../etc/passwd", "x" * 80, "tiny:../a1"])
def test_unknown_model_is_404_in_openai_shape(oai, model):
    with pytest.raises(openai.NotFoundError) as err:
        _ask(oai, model)
    body = err.value.body
    assert body["code"] == "model_not_found" and body["type"] == "invalid_request_error" and body["param"] == "model"


def test_remote_audio_url_refused_without_allowlist(oai, adapted):
    messages = [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "http://127.0.0.1:9/a.wav"}}, {"type": "text", "text": "dog?"}]}]
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=adapted[1], messages=messages)
    assert err.value.body["code"] == "audio_url_not_allowed" and err.value.body["param"] == "audio_url.url"


def test_data_url_audio_is_accepted(oai, adapted):
    data = base64.b64encode(encode(tone(1.0, 16_000, 1), 16_000)).decode()
    messages = [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": f"data:audio/wav;base64,{data}"}}, {"type": "text", "text": "dog?"}]}]
    assert oai.chat.completions.create(model=adapted[1], messages=messages, max_tokens=4).choices


@pytest.mark.parametrize(
    "content, code",
    [
        ([{"type": "text", "text": "dog?"}], "missing_audio"),
        ([_audio_part(), _audio_part(), {"type": "text", "text": "dog?"}], "too_many_audio_items"),
        ([{"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}}, {"type": "text", "text": "dog?"}], "invalid_base64"),
        ([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aiff"}}, {"type": "text", "text": "dog?"}], "unsupported_audio_format"),
        ([{"type": "image_url", "image_url": {"url": "x"}}], "invalid_request"),
        ([_audio_part()], "empty_question"),
    ],
)
def test_bad_requests_are_400_with_code(oai, adapted, content, code):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=adapted[1], messages=[{"role": "user", "content": content}])
    assert err.value.body["code"] == code and err.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, code", [(b"{nope", "invalid_json"), (b"[1, 2]", "invalid_request")])
def test_malformed_json_body_is_400_with_code(adapted, body, code):
    base, _ = adapted
    r = httpx.post(f"{base}/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == code


def test_the_adapter_in_use_is_merged_and_switching_restores_the_base(tiny_checkpoint, tmp_path):
    """Merged LoRA answers as the unmerged adapter does; unmerging for the base gives the base back."""
    from models.registry import resolve
    from serving.adapters import PeftAdapters
    from serving.backends import AudioPrompt
    from serving.backends.hf import TransformersBackend

    backend = TransformersBackend.load(resolve(str(tiny_checkpoint)))
    peft = PeftAdapters(backend)
    peft.load("a1", _random_adapter(tiny_checkpoint, tmp_path / "a1", 1))
    inputs = backend.inputs([AudioPrompt(tone(1.0, 16_000, 1), "Is there a dog?", 1)])

    def logits(name):
        with peft.active(name), torch.no_grad():
            return backend.model(**inputs).logits[0, -1]

    base = logits(None)
    merged = logits("a1")
    assert peft.merged == "a1"
    assert torch.allclose(logits(None), base, atol=1e-5) and peft.merged is None
    backend.model.set_adapter("a1")  # the same adapter, unmerged
    with torch.no_grad():
        unmerged = backend.model(**inputs).logits[0, -1]
    assert torch.allclose(merged, unmerged, atol=1e-4)
    assert (merged - base).abs().max() > 1e-3  # the adapter does change the model

    from serving.backends import AudioPrompt
    prompt = AudioPrompt(tone(1.0, 16_000, 1), "Is there a dog?", 3, contrast=True)
    peft.generate([prompt], "a1")  # leaves a1's blank prefix cached
    [after_switch] = peft.generate([prompt], None)  # must not reuse it: other weights
    backend.contrast.prefixes.clear()
    [fresh] = peft.generate([prompt], None)
    if fresh.blank_logprob is None:
        pytest.skip("the random base answered 'no': nothing to contrast")
    assert after_switch.blank_logprob == pytest.approx(fresh.blank_logprob, abs=1e-5)
