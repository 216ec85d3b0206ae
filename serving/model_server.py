"""The model deployment: owns one backend, batches concurrent requests into one forward pass.

Adapters are Ray Serve multiplexed models (serving/adapters.py): :meth:`ModelServer.complete` serves the
request's ``multiplexed_model_id`` (base, default adapter, or a named one), loading it on first use and
keeping the most recently used ``max_loaded_adapters`` per replica. The vLLM engine batches by itself
(continuous batching), so its requests go straight to the engine; the transformers engine's requests are
batched by :class:`Batcher` (no wait when the model is idle).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import torch
from ray import serve

from models.registry import ModelSpec, resolve
from models.store import is_uri, local_copy
from serving.adapters import BadAdapter, Catalog, LoadedAdapter, PeftAdapters, UnknownModel, fetch_adapter, lora_problem, unavailable
from serving.backends import AudioPrompt, Generation
from serving.config import Settings
from serving.errors import ApiError
from serving.heap import freeze_startup_heap

log = logging.getLogger("earwitness.model")

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Dynamic batching that never makes an idle model wait.

    Ray Serve's ``@serve.batch`` waits ``batch_wait_timeout_s`` after a batch's first request for
    more to arrive, so a lone request pays that wait in full; with the wait at zero it forms each
    batch the moment one request arrives and queues it behind the running one, so under load the
    batches stay at one. A ``Batcher`` forms a batch when the model becomes free instead: a
    request to an idle model starts at once (after an optional ``wait_s``), and whatever arrives
    while a batch runs goes into the next one, up to ``max_batch_size`` — the continuous batching
    rule of vLLM's scheduler, at the granularity of a whole ``generate`` call.

    No request can fail another: when a batch's call raises, its requests are run again one by one, so
    only the one at fault gets the error and the others get their answers.
    """

    def __init__(self, run: Callable[[list[T]], Awaitable[list[R]]], max_batch_size: int = 8, wait_s: float = 0.0):
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self._queue: list[tuple[T, asyncio.Future]] = []
        self._busy = False

    async def submit(self, item: T) -> R:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if not self._busy:
            self._busy = True  # set before the task starts, so concurrent submits start one drain only
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            if self.wait_s > 0:
                await asyncio.sleep(self.wait_s)
            while self._queue:
                batch, self._queue = self._queue[: self.max_batch_size], self._queue[self.max_batch_size :]
                live = [(item, f) for item, f in batch if not f.done()]  # callers that gave up are not computed
                if not live:
                    continue
                try:
                    results = await self.run([item for item, _ in live])
                except Exception as exc:  # noqa: BLE001 - alone, the error is its caller's; in a batch, find whose
                    if len(live) == 1:
                        _settle(live[0][1], exception=exc)
                    else:
                        await self._one_by_one(live)
                    continue
                for (_, f), result in zip(live, results):
                    _settle(f, result)
        finally:
            self._busy = False

    async def _one_by_one(self, live: list[tuple[T, asyncio.Future]]) -> None:
        """A failed batch again, each request alone: only the offending ones get their error."""
        for item, f in live:
            if f.done():
                continue
            try:
                (result,) = await self.run([item])
            except Exception as exc:  # noqa: BLE001 - this request's own error
                _settle(f, exception=exc)
            else:
                _settle(f, result)


def _settle(future: asyncio.Future, result=None, exception: BaseException | None = None) -> None:
    """A caller's answer or error, unless it gave up waiting."""
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)


def served_spec(settings: Settings) -> ModelSpec:
    """The model spec ``settings`` serve, its weights in a local directory: a store URI (``model`` itself, or
    ``model_source`` for a registered name) is copied once into the store cache (models/store.py)."""
    spec = resolve(settings.model, settings.store_options)
    source = settings.model_source or spec.source
    if is_uri(source):
        source = str(local_copy(source, settings.store_options))
    return dataclasses.replace(spec, source=source)


def make_backend(settings: Settings, spec: ModelSpec | None = None):
    """The engine named by ``settings.engine`` (transformers | vllm) and the default adapter's location; the base
    weights and the default adapter are read from the local cache of their store URIs (models/store.py)."""
    spec = spec or served_spec(settings)
    adapter = settings.adapter or spec.adapters.get("default")
    local_adapter = str(local_copy(adapter, settings.store_options)) if adapter else None
    if settings.engine == "vllm":
        # function-level: only the configured engine loads (vLLM lives in its own environment)
        from serving.backends.vllm import load_for_settings

        backend = load_for_settings(spec, settings, local_adapter)
        return backend, (None if backend.merged_adapter else adapter)  # merged at load: the weights are base + adapter
    # function-level: only the configured engine loads (vLLM lives in its own environment)
    from serving.backends.hf import TransformersBackend

    return TransformersBackend.load(spec, adapter=local_adapter, device=settings.device, dtype=settings.dtype), adapter


def make_catalog(settings: Settings, served_name: str, default_adapter: str | None, spec: ModelSpec | None = None) -> Catalog:
    spec = spec or resolve(settings.model, settings.store_options)
    return Catalog.build(served_name, spec.adapters, settings.adapters, default_adapter, settings.adapter_store)


@serve.deployment(name="ModelServer")
class ModelServer:
    def __init__(self, settings: dict):
        self.settings = Settings(**settings)
        if self.settings.model_cpus >= 1:
            torch.set_num_threads(int(self.settings.model_cpus))
        self.spec = served_spec(self.settings)  # a store URI is copied here, once per cache (models/store.py)
        self.backend, self.adapter = make_backend(self.settings, self.spec)
        self.backend.warm_up()
        self._batcher = Batcher(self._run_batch, self.settings.max_batch_size, self.settings.batch_wait_timeout_s)
        # its own copy: ``split_special_tokens`` is a switch on the Rust tokenizer, and flipping it on the one a
        # batch is being tokenized with (in a worker thread) would turn the template's audio placeholder into text
        self._question_tokenizer = copy.deepcopy(self.backend.processor.tokenizer)
        self.catalog = make_catalog(self.settings, self.backend.model_name, self.adapter, self.spec)
        self._lora_ids: dict[str, int] = {}  # vLLM's adapter ids, one per local copy (a new version is a new id)
        self._default_ref = None  # vLLM: the default adapter's LoraRef
        # the frozen pretrained audio tower's signature, when every adapter served leaves it as fetched (guard_share_encoder)
        # (not with adapters from a store: which modules they adapt is known only once one is fetched)
        configured = list(self.catalog.paths.values())
        self.tower = None if self.catalog.store or any(map(is_uri, configured)) else self.backend.shared_tower(configured)
        self.is_async = self.backend.is_async
        # PEFT named the adapter loaded with the model "default"; the catalog may know it by another name
        self._peft = None if self.is_async else PeftAdapters(self.backend)
        self._peft_names = {self.catalog.default: "default"} if self.adapter and not self.is_async else {}

        async def load_adapter(model_id: str) -> LoadedAdapter:
            return await self._open(model_id)

        # A plain function (not a bound method) so Serve can cache its multiplexing state on it.
        self._adapter = serve.multiplexed(max_num_models_per_replica=self.settings.max_loaded_adapters)(load_adapter)
        freeze_startup_heap()
        log.info("model %s ready (adapter=%s)", self.backend.model_name, bool(self.adapter))

    def close(self) -> None:
        """Stop the engine: vLLM's engine-core process is not a Ray actor and would outlive the replica."""
        backend = getattr(self, "backend", None)  # None when the replica failed before its engine loaded
        if backend is not None:
            try:
                backend.shutdown()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass

    def __del__(self):
        self.close()  # Serve calls this on graceful shutdown

    def info(self) -> dict:
        return {
            "model": self.backend.model_name,
            "family": self.spec.family,
            "sample_rate": self.backend.sample_rate,
            "max_audio_s": self.backend.max_audio_s,
            "adapter": self.adapter,
            "engine": self.settings.engine,
            "catalog": self.catalog.to_dict(),
            "tower": self.tower,
            "guard_policy": self.spec.guard_policy,
        }

    def admit(self, prompt: AudioPrompt) -> None:
        """Bound a request's cost before it joins a batch: its question in the served tokenizer's tokens
        (tokenized as text, as the prompt will hold it), 422 ``question_too_long`` past ``max_question_tokens``."""
        tokens = self._question_tokenizer(prompt.question, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        limit = self.settings.max_question_tokens
        if len(tokens) > limit:
            raise ApiError(422, "question_too_long", f"'question' is {len(tokens)} tokens, over the {limit}-token limit", param="question")

    async def generate(self, prompt: AudioPrompt) -> Generation:
        """One answer from the default model (base, or the default adapter)."""
        self.admit(prompt)
        if self.is_async:  # the engine batches; the default adapter (if any) applies
            if self._default_ref is None and self.catalog.default:  # fetched and checked once, not per request
                self._default_ref = await self._lora_ref(self.catalog.default)
            ref = self._default_ref
            return await self.backend.generate_async(prompt, ref)
        return await self._batcher.submit((prompt, "default" if self.adapter else None))

    async def complete(self, prompt: AudioPrompt, model_id: str | None = None) -> Generation:
        """One answer from ``model_id``, else the id this request was routed with (``multiplexed_model_id``)."""
        self.admit(prompt)
        model_id = model_id or serve.get_multiplexed_model_id() or self.catalog.default_id
        loaded = await self._adapter(model_id)
        if self.is_async:
            return await self.backend.generate_async(prompt, loaded.ref)
        return await self._batcher.submit((prompt, self._peft_names.get(loaded.name, loaded.name)))

    async def _run_batch(self, items: list[tuple[AudioPrompt, str | None]]) -> list[Generation]:
        """A batch that may mix adapters (PEFT names): one greedy generate per adapter group, off the event loop."""
        results: list[Generation | None] = [None] * len(items)
        groups: dict[str | None, list[int]] = {}
        for i, (_, name) in enumerate(items):
            groups.setdefault(name, []).append(i)
        for name, idx in groups.items():
            out = await asyncio.to_thread(self._peft.generate, [items[i][0] for i in idx], name)
            for i, generation in zip(idx, out):
                results[i] = generation
        return results

    async def _open(self, model_id: str) -> LoadedAdapter:
        """The multiplexed loader: validate the id against the catalog, fetch its adapter from the store, load it.

        A missing adapter is a 404 and one that cannot be served a 503 ``adapter_unavailable``, both naming it;
        nothing is cached for a failed id, so the replica keeps serving the others and retries it when asked again.
        """
        try:
            canonical, name = self.catalog.resolve(model_id)
        except UnknownModel:
            raise ApiError(404, "model_not_found", f"model {model_id!r} is not served here; see GET /v1/models", param="model") from None
        if name is None or name == self.catalog.default:
            ref = None
            if self.is_async and name is not None:
                ref = await self._lora_ref(name)
            return LoadedAdapter(canonical, name, ref)  # base and default stay loaded
        if self.is_async:
            return LoadedAdapter(canonical, name, await self._lora_ref(name))
        path = await asyncio.to_thread(fetch_adapter, name, self.catalog.location(name), self.settings.store_options)
        peft_name = self._peft_names.get(name, name)
        try:
            await asyncio.to_thread(self._peft.load, peft_name, str(path))
        except BadAdapter as exc:
            log.warning("adapter %s refused: %s", name, exc)
            raise unavailable(name, str(exc)) from None
        return LoadedAdapter(canonical, name, unload=lambda: self._peft.unload(peft_name))

    async def _lora_ref(self, name: str):
        """vLLM's handle on adapter ``name``: its local copy, checked, with an id per copy."""
        # function-level: only the configured engine loads (vLLM lives in its own environment)
        from serving.backends.vllm import LoraRef, adapter_problem

        path = str(await asyncio.to_thread(fetch_adapter, name, self.catalog.location(name), self.settings.store_options))
        problem = lora_problem(Path(path)) or adapter_problem(path)
        if problem:
            raise unavailable(name, problem)
        lora_id = self._lora_ids.setdefault(path, len(self._lora_ids) + 1)
        return LoraRef(name=name, lora_id=lora_id, path=path)
