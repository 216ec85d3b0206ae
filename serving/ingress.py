"""The HTTP edge: FastAPI on a Ray Serve ingress deployment.

It owns schemas, intake, errors and metrics; the model deployment behind a handle owns the model.
Nothing model-specific lives here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import traceback

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from models.verifier.events import EventReport
from serving import intake, openai_api
from serving.adapters import Catalog, UnknownModel, store_adapters
from serving.backends import AudioPrompt
from serving.config import Settings
from serving.errors import ApiError
from serving.guard.runner import GuardRunner, Heard
from serving.heap import freeze_startup_heap
from serving.metrics import Metrics, mark_process_dead, prepare_metrics_dir
from serving.middleware import ApiKeyMiddleware, BodyLimitMiddleware, keys_from_settings
from serving.model_client import InProcess, LocalModel, RemoteModel
from serving.proxy import request_id
from serving.schemas import AudioInfo, ErrorResponse, EventsResponse, GuardInfo, Health, ModelCard, ModelList, QARequest, QAResponse, Timing, VerifyResponse, audio_body
from serving.verify_api import EVENTS_BODY, VERIFY_BODY, ask_verifier, events as audio_events, verify as verify_audio

log = logging.getLogger("earwitness.http")

# What a served model or adapter name may look like: no path separators, no "..", bounded length
# (":" joins a model and its adapter: earwitness-tiny:base; see serving/adapters.py).
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 408, 413, 415, 422, 500, 503, 504)}
# How long /readyz waits for the model: the whole answer, 503 included, within the README's 0.5 s (under a
# probe's usual 1 s timeout), with room for the request's own handling.
READY_PROBE_S = 0.35
STORE_LIST_S = 3.0  # GET /v1/models waits this long for the adapter store's listing, then lists the configured adapters
# What a response's status is counted as when the client went away before one was sent (nginx's 499).
CLIENT_CLOSED = 499

_QA_BODY = audio_body(
    {
        "question": {"type": "string"},
        "max_tokens": {"type": "integer", "minimum": 1},
        "model": {"type": "string"},
        "guard": {"type": "string", "enum": ["off", "annotate", "abstain", "correct"]},
    },
    ["question"],
    QARequest,
)


def _route_template(app: FastAPI, scope) -> str:
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", "other")
    return "unmatched"


class RequestMetricsMiddleware:
    """Counts every response by route template and status, and times it, 404s and 413s included."""

    def __init__(self, asgi, app: FastAPI, metrics: Metrics):
        self.asgi, self.app, self.metrics = asgi, app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.asgi(scope, receive, send)
        endpoint = _route_template(self.app, scope)
        status = {"code": 500}
        start = time.perf_counter()

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.asgi(scope, receive, tracking_send)
        except (asyncio.CancelledError, ClientDisconnect):
            if status["code"] == 500:  # no response went out: the client left, the server did not fail
                status["code"] = CLIENT_CLOSED
            raise
        finally:
            self.metrics.in_flight.dec()
            if endpoint != "/metrics":
                self.metrics.requests.labels(endpoint, str(status["code"])).inc()
                self.metrics.latency.labels(endpoint, "total").observe(time.perf_counter() - start)


def _error_response(request: Request, error: ApiError) -> JSONResponse:
    """The error as JSON, with the request's id: a client quotes it, and a retry of a 5xx can be told apart."""
    body = {"error": {**error.body()["error"], "request_id": request_id(request.headers)}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error_response(request, exc)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error_response(request, intake.invalid(exc.errors()))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}  # 400: a body the form parser cannot read
    return _error_response(request, ApiError(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail)))


def _stack(exc: BaseException) -> str:
    """Where ``exc`` and its causes were raised: frames and exception types, not their messages (which may
    quote the request's text)."""
    parts = []
    while exc is not None and len(parts) < 8:
        parts.append(f"{type(exc).__module__}.{type(exc).__qualname__} raised at:\n" + "".join(traceback.format_tb(exc.__traceback__)))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


class InternalErrorMiddleware:
    """Any exception nothing else handled is a bug report: a JSON 500 ``internal_error`` with the request id,
    logged with where it was raised (never the request's audio or text) and counted by endpoint.

    Pure ASGI, inside the metrics middleware (which then counts the 500), and it does not re-raise: Serve
    would log the exception's message, which may quote the request.
    """

    def __init__(self, asgi, app: FastAPI, metrics: Metrics):
        self.asgi, self.app, self.metrics = asgi, app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.asgi(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.asgi(scope, receive, tracking_send)
        except ClientDisconnect:
            raise  # the client left: counted as such, no bug
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            endpoint = _route_template(self.app, scope)
            rid = request_id(Headers(scope=scope))
            self.metrics.internal_errors.labels(endpoint).inc()
            log.error("internal error on %s (request %s): %s\n%s", endpoint, rid, type(exc).__name__, _stack(exc))
            if started:  # too late for a status: the connection ends with the partial response
                return
            error = ApiError(500, "internal_error", f"unexpected {type(exc).__name__}; quote the request id when reporting it")
            await JSONResponse({"error": {**error.body()["error"], "request_id": rid}}, status_code=500)(scope, receive, send)


class Service:
    """What one ingress replica knows: settings, its model (``serving.model_client``), its metrics."""

    def __init__(self, model: RemoteModel | LocalModel, settings: Settings, verifier=None):
        self.settings = settings
        self.model = model
        prepare_metrics_dir()
        self.metrics = Metrics()
        self.guard = GuardRunner(verifier, settings, self.metrics)  # the absent-sound guard (serving/guard/)
        self._model_info: dict | None = None
        self._was_ready = False

    async def model_info(self) -> dict:
        if self._model_info is None:
            self._model_info = await self._await_model(self.model.info())
        return self._model_info

    def check_question(self, question: str) -> str:
        return intake.check_question(question, self.settings)

    def check_max_tokens(self, requested: int | None) -> int:
        return intake.check_max_tokens(requested, self.settings)

    async def resolve_model(self, requested: str | None) -> tuple[str, dict]:
        """The served model id a request's ``model`` names (base, default or adapter), and the model info.

        Unknown or malformed names are 404 ``model_not_found``; a name never reaches the file system.
        """

        if requested and not MODEL_NAME.fullmatch(requested):
            raise ApiError(404, "model_not_found", "'model' is not a valid model name; see GET /v1/models", param="model")
        info = await self.model_info()
        catalog = Catalog.from_dict(info["catalog"]) if "catalog" in info else Catalog(info["model"])
        try:
            model_id, _ = catalog.resolve(requested)
        except UnknownModel:
            raise ApiError(404, "model_not_found", f"model {requested!r} is not served here; see GET /v1/models", param="model") from None
        return model_id, info

    async def hear(self, endpoint: str, clip, question: str, max_tokens: int, policy: str, model_id: str) -> Heard:
        """The model's answer to a decoded clip, judged by the guard under ``policy``; model and guard stages timed.

        The guard's plan first (does the model hand back its tower's layers?), then the model's call is sent, and the
        guard is given its answer to come: the guard calls the verifier, never back into this edge."""
        contrast = policy != "off" and self.settings.guard_contrast
        plan = await self.guard.plan(clip, policy, await self.model_info())
        prompt = AudioPrompt(clip.samples, question, max_tokens, contrast=contrast, tower_layers=plan.shared)
        answer = self._await_model(self.model.complete(prompt, model_id))  # sent now; awaited by the guard
        heard = await self.guard.run(clip, question, policy, answer, plan)
        self.metrics.latency.labels(endpoint, "model").observe(heard.model_s)
        if heard.guard_s is not None:
            self.metrics.latency.labels(endpoint, "guard").observe(heard.guard_s)
        return heard

    async def events(self, clip) -> EventReport:
        """The verifier's detections over a decoded clip (``/v1/audio/events``, and listed on request by the chat
        route and ``earwitness ask --events``); 503 when no verifier is deployed or it cannot answer."""
        if self.guard.verifier is None:
            raise ApiError(503, "verifier_unavailable", "no verifier is deployed here", {"Retry-After": "30"})
        report = await ask_verifier(self, self.guard.verifier.events(clip.samples))
        if report.kept:
            self.metrics.verifier_kept_hits.inc()
        for d in report.detections:
            self.metrics.events_detected.labels(d.vocabulary).inc()
        return report

    async def _await_model(self, response):
        """A model call's result; its timeout, full queue or dead replica as the API's 504 / 503."""
        try:
            return await asyncio.wait_for(response, self.settings.request_timeout_s)
        except asyncio.TimeoutError as exc:
            response.cancel()
            raise ApiError(504, "timeout", f"the model did not answer within {self.settings.request_timeout_s:g} s") from exc
        except BackPressureError as exc:
            raise ApiError(503, "overloaded", "the model's queue is full; retry shortly", {"Retry-After": "1"}) from exc
        except RayActorError as exc:
            raise ApiError(503, "model_unavailable", "the model replica failed; retry shortly", {"Retry-After": "2"}) from exc
        except RayTaskError as exc:  # the model replica refused the request (its ApiError), or a bug: a 500
            if isinstance(exc.cause, ApiError):
                raise exc.cause from None
            raise

    async def answer(self, request: Request) -> QAResponse:
        start = time.perf_counter()
        data, fields = await intake.read_audio_body(request, QARequest, "question")
        question = self.check_question(fields.question)
        max_tokens = self.check_max_tokens(fields.max_tokens)
        model_id, info = await self.resolve_model(fields.model)
        clip = await intake.decode_upload(data, self.settings, info["sample_rate"], info["max_audio_s"], fields.truncate)
        decoded = time.perf_counter()
        heard = await self.hear("/v1/audio/qa", clip, question, max_tokens, self.guard.policy_for(fields.guard, info), model_id)
        outcome = heard.outcome
        kind = outcome.kind
        self.observe("/v1/audio/qa", clip, kind, info["model"], decoded - start)
        return QAResponse(
            answer=outcome.answer,
            original_answer=outcome.original_answer,
            guard=GuardInfo(**outcome.guard_dict()),
            answer_kind=kind,
            model=info["model"],
            audio=AudioInfo.from_clip(clip),
            timing=Timing(
                decode_ms=round((decoded - start) * 1000, 2),
                model_ms=round(heard.model_s * 1000, 2),
                total_ms=round((time.perf_counter() - start) * 1000, 2),
                guard_ms=round(heard.guard_s * 1000, 2) if heard.guard_s is not None else None,
            ),
            request_id=request_id(request.headers),
        )

    def observe(self, endpoint: str, clip, kind: str, model: str, decode_s: float) -> None:
        """An answered request's decode stage, answer kind and audio facts."""
        m = self.metrics
        m.latency.labels(endpoint, "decode").observe(decode_s)
        m.answers.labels(kind, model).inc()
        m.audio_duration.observe(clip.duration_s)
        for flag in clip.flags:
            m.audio_flags.labels(flag).inc()

    async def models(self) -> ModelList:
        """Every servable id: the model (with its default adapter), ``:base``, and each named adapter."""

        info = await self.model_info()
        catalog = Catalog.from_dict(info["catalog"]) if "catalog" in info else Catalog(info["model"])
        in_store: list[str] = []
        if catalog.store:  # what a rollout wrote there is servable by id: list it (bounded, never failing the list)
            try:
                in_store = await asyncio.wait_for(asyncio.to_thread(store_adapters, catalog.store, self.settings.store_options),
                                                  STORE_LIST_S)
            except asyncio.TimeoutError:
                log.warning("adapter store listing took over %.0f s: only the configured adapters are listed", STORE_LIST_S)
        cards = [
            ModelCard(
                id=model_id,
                family=info["family"],
                max_audio_s=min(self.settings.max_audio_s, info["max_audio_s"]),
                sample_rate=info["sample_rate"],
                adapter=adapter,
            )
            for model_id, adapter in catalog.ids(in_store)
        ]
        return ModelList(data=cards)

    async def ready(self) -> str | None:
        """None when a warm model replica answers, else why not; within :data:`READY_PROBE_S`, so a probe
        during warm-up gets its 503 rather than timing out."""
        try:
            await asyncio.wait_for(self.model.info(), READY_PROBE_S)
        except BackPressureError:
            return None  # loaded and busy: readiness must not flap under load
        except asyncio.TimeoutError:  # slow: warming up, or a replica that answered before and is busy now
            return None if self._was_ready else "warming_up"
        except Exception as exc:  # any failure to reach a warm replica means not ready
            return type(exc).__name__
        self._was_ready = True
        return None


DOCS_ASSETS = "/docs-assets"


def mount_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI from the ``swagger-ui-bundle`` package's files, so it renders on a machine without
    internet (an air-gapped GPU box, a smart-speaker backend); under a route prefix too (Serve's ``root_path``)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request):
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - API",
                                   swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon-32x32.png")


def create_app(service: Service) -> FastAPI:
    """The FastAPI app of one ingress replica, its routes closed over that replica's service."""
    app = FastAPI(
        title="Earwitness",
        version="0.1.0",
        description="Audio question answering whose answers only testify to what was actually heard.",
        docs_url=None,  # served below from local files: FastAPI's default loads Swagger UI from a CDN
        redoc_url=None,
    )
    mount_docs(app)
    app.add_middleware(InternalErrorMiddleware, app=app, metrics=service.metrics)  # innermost: the others see its 500
    app.add_middleware(BodyLimitMiddleware, max_upload_bytes=service.settings.max_upload_bytes, body_timeout_s=service.settings.body_timeout_s)
    app.add_middleware(ApiKeyMiddleware, digests=keys_from_settings(service.settings))
    app.add_middleware(RequestMetricsMiddleware, app=app, metrics=service.metrics)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    openai_api.register(app, service)  # POST /v1/chat/completions (OpenAI-compatible, input_audio parts)

    @app.post("/v1/audio/qa", response_model=QAResponse, responses=_ERRORS, openapi_extra=_QA_BODY, summary="Ask a question about an audio clip")
    async def qa(request: Request) -> QAResponse:
        return await service.answer(request)

    @app.post("/v1/audio/verify", response_model=VerifyResponse, responses=_ERRORS, openapi_extra=VERIFY_BODY, summary="Presence scores of sound events in a clip (verifier only)")
    async def verify(request: Request) -> VerifyResponse:
        return await verify_audio(service, request)

    @app.post("/v1/audio/events", response_model=EventsResponse, responses=_ERRORS, openapi_extra=EVENTS_BODY, summary="The sound events heard in a clip, with their times (verifier only)")
    async def events(request: Request) -> EventsResponse:
        return await audio_events(service, request)

    @app.get("/v1/models", response_model=ModelList, summary="Models served here")
    async def models() -> ModelList:
        return await service.models()

    @app.get("/healthz", response_model=Health, summary="Liveness: the HTTP edge answers")
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, responses={503: {"model": Health}}, summary="Readiness: model loaded and warm")
    async def readyz():
        problem = await service.ready()
        if problem:
            return JSONResponse(Health(status="not_ready", detail=problem).model_dump(), status_code=503)
        return Health(status="ready")

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """The HTTP edge over the model and verifier deployments' handles, or (``model`` None: topology
    ``fused``) holding both in this process."""

    def __init__(self, model, settings: dict, verifier=None):
        config = Settings(**settings)
        if model is not None:
            self.service = Service(RemoteModel(model), config, verifier)
        else:
            from serving.verifier_server import VerifierServer  # function-level: only a fused replica loads the verifier's networks

            local_verifier = InProcess(VerifierServer.func_or_class(settings)) if config.verifier else None
            self.service = Service(LocalModel(config), config, local_verifier)
        freeze_startup_heap()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.service)

    def __del__(self):
        mark_process_dead()
        service = getattr(self, "service", None)
        if service is not None:
            service.model.close()
