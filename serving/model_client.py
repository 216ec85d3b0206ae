"""How the ingress reaches its model and verifier: over deployment handles (``split``) or in its own process (``fused``).

``split`` (the default): the model is its own deployment. Ingress replicas (CPU, audio decoding) scale
apart from model replicas (GPU), and a request's adapter is routed by Serve model multiplexing to a
replica that has it loaded. Each request costs one process hop with the decoded clip in it.

``fused``: each ingress replica owns a model server and the verifier, as vLLM's own OpenAI server owns
its engine: one deployment, no hop. Adapters load where the request lands (vLLM keeps ``max_loaded_adapters`` of them);
Serve's proxy still routes a request whose ``serve_multiplexed_model_id`` header names one to a replica
holding it. The admission limit the model deployment's queue gave in ``split`` is kept here: past
``max_ongoing_requests + max_queued_requests`` in flight a request is refused with 503 ``overloaded``.

Both return, for every call, an awaitable the caller can ``cancel()``.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable

from ray.serve.exceptions import BackPressureError

from serving.backends import AudioPrompt, Generation
from serving.config import Settings


class RemoteModel:
    """The model deployment behind a Serve handle."""

    def __init__(self, handle):
        self.handle = handle
        self._routed: dict[str, object] = {}

    def info(self) -> Awaitable[dict]:
        return self.handle.info.remote()

    def complete(self, prompt: AudioPrompt, model_id: str | None) -> Awaitable[Generation]:
        """Routed (Serve model multiplexing) to a replica holding ``model_id``'s adapter; None: the default."""
        if not model_id:
            return self.handle.generate.remote(prompt)
        if model_id not in self._routed:
            self._routed[model_id] = self.handle.options(multiplexed_model_id=model_id)
        return self._routed[model_id].complete.remote(prompt)

    def close(self) -> None:
        """Nothing to release: the model deployment's replicas outlive this one."""


class LocalModel:
    """A model server in this replica's process, called as its handle would be.

    ``multiplexed=False`` outside a Serve replica (``earwitness ask``), where Serve's multiplexing cannot run:
    every request gets the served default (base, or the default adapter).
    """

    def __init__(self, settings: Settings, multiplexed: bool = True):
        from serving.model_server import ModelServer  # function-level: a split ingress never loads a model server

        self.multiplexed = multiplexed
        self.server = ModelServer.func_or_class(settings.model_dump())  # the deployment's class itself
        queued = settings.max_queued_requests
        self.max_queued = queued
        self.limit = None if queued < 0 else settings.max_ongoing_requests + queued
        self.in_flight = 0

    def info(self) -> Awaitable[dict]:
        async def info() -> dict:
            return self.server.info()

        return asyncio.ensure_future(info())

    def complete(self, prompt: AudioPrompt, model_id: str | None) -> Awaitable[Generation]:
        if self.limit is not None and self.in_flight >= self.limit:  # refused where it is awaited, as a handle's is
            refused = asyncio.get_running_loop().create_future()
            refused.set_exception(BackPressureError(num_queued_requests=self.max_queued, max_queued_requests=self.max_queued))
            return refused
        self.in_flight += 1
        call = self.server.complete(prompt, model_id) if model_id and self.multiplexed else self.server.generate(prompt)
        task = asyncio.ensure_future(call)
        task.add_done_callback(self._done)
        return task

    def _done(self, _task) -> None:
        self.in_flight -= 1

    def close(self) -> None:
        self.server.close()


class InProcess:
    """A deployment's class instantiated in this process, called as its handle is: ``x.method.remote(*args)``
    returns a cancellable awaitable (the fused topology's verifier, for the guard's unchanged calls)."""

    def __init__(self, instance):
        self.instance = instance

    def __getattr__(self, name: str) -> "_Method":
        return _Method(getattr(self.instance, name))


class _Method:
    def __init__(self, method):
        self.method = method

    def remote(self, *args, **kwargs) -> Awaitable:
        result = self.method(*args, **kwargs)
        if asyncio.iscoroutine(result):
            return asyncio.ensure_future(result)
        done = asyncio.get_running_loop().create_future()
        done.set_result(result)
        return done
