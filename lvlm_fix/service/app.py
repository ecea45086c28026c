"""FastAPI app: thin routes over a `Serving`. The same app runs under uvicorn and Ray Serve.

Routes parse, call one Serving method and shape the HTTP reply; errors of every kind leave as
OpenAI error objects. Generation runs on worker threads (the engine's job), so /health answers
while the model works.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from lvlm_fix.lvlm import LVLM
from lvlm_fix.service import schemas as s
from lvlm_fix.service.config import ServeConfig
from lvlm_fix.service.engine import Engine, LocalEngine
from lvlm_fix.service.serving import ServiceError, Serving, new_request_id

Authorization = Annotated[str | None, Header()]


def build_app(
    engine: LVLM | Engine | Serving,
    config: ServeConfig | None = None,
    *,
    proxy_echoes_request_id: bool = False,
) -> FastAPI:
    """An app over an in-process LVLM, any Engine (e.g. Ray's) or a ready Serving.

    `proxy_echoes_request_id`: behind a proxy that sets `X-Request-Id` on responses itself
    (Ray Serve's), the app leaves that header alone instead of adding a second value.
    """
    config = config or ServeConfig()
    if isinstance(engine, LVLM):
        engine = LocalEngine(engine)
    serving = engine if isinstance(engine, Serving) else Serving(engine, config)
    app = FastAPI(
        title="lvlm-fix",
        version="0.1.0",
        description="OpenAI-compatible LVLM serving with hallucination interventions.",
    )
    app.state.serving = serving
    _add_error_handlers(app, serving)
    _add_request_middleware(app, serving, proxy_echoes_request_id)
    _add_routes(app, serving)
    return app


def _error(serving: Serving, error: ServiceError) -> JSONResponse:
    serving.metrics.errors.labels(str(error.status)).inc()
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _add_error_handlers(app: FastAPI, serving: Serving) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, error: ServiceError) -> JSONResponse:
        return _error(serving, error)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return _error(serving, ServiceError(400, "request body is not valid JSON"))
        where = ".".join(loc)
        message = f"{where}: {first['msg']}" if where else first["msg"]
        return _error(serving, ServiceError(422, message, where or None, first.get("type")))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return _error(serving, ServiceError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def crashed(_: Request, error: Exception) -> JSONResponse:
        return _error(
            serving, ServiceError(500, f"internal error: {type(error).__name__}: {error}")
        )


def _add_request_middleware(app: FastAPI, serving: Serving, proxy_echoes: bool) -> None:
    @app.middleware("http")
    async def request_id_and_latency(request: Request, call_next):
        request.state.request_id = request.headers.get("x-request-id") or new_request_id()
        start = time.perf_counter()
        response = await call_next(request)
        if not proxy_echoes:
            response.headers["X-Request-Id"] = request.state.request_id
        route = request.scope.get("route")
        if route is not None and request.url.path.startswith("/v1/"):
            serving.metrics.latency.labels(route.path).observe(time.perf_counter() - start)
        return response


def _add_routes(app: FastAPI, serving: Serving) -> None:
    @app.get("/health")
    async def health() -> dict:
        """Liveness: answers while the process is up, never touching the model."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: 200 while a model can take requests, 503 while none can (e.g. its Ray
        replicas are starting, or died and are being restarted)."""
        if await serving.engine.ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(serving.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=s.ModelList)
    async def models(authorization: Authorization = None) -> s.ModelList:
        serving.check_auth(authorization)
        return serving.models()

    @app.get("/v1/interventions")
    async def interventions(authorization: Authorization = None) -> dict:
        serving.check_auth(authorization)
        return serving.interventions()

    @app.post(
        "/v1/chat/completions",
        response_model=s.ChatCompletionResponse,
        responses={400: {"model": s.ErrorResponse}, 422: {"model": s.ErrorResponse}},
    )
    async def chat(
        body: s.ChatCompletionRequest, request: Request, authorization: Authorization = None
    ):
        serving.check_auth(authorization)
        job = serving.chat_job(body)
        request_id = request.state.request_id
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            events = serving.chat_stream(job, request_id, usage)
            return StreamingResponse(events, media_type="text/event-stream")
        return await serving.chat(job, request_id)

    async def task(kind: str, request: Request, schema: type[s.GenerationFields], authorization):
        serving.check_auth(authorization)
        body, upload = await _read_task_body(request)
        try:
            parsed = schema.model_validate(body)
        except ValidationError as error:
            raise ServiceError(422, s.first_error(error), None, "validation_error") from None
        job = serving.task_job(parsed, upload)
        return await serving.task(kind, job, request.state.request_id)

    @app.post(
        "/v1/caption", response_model=s.TaskResponse, openapi_extra=_task_openapi(s.CaptionRequest)
    )
    async def caption(request: Request, authorization: Authorization = None) -> s.TaskResponse:
        return await task("caption", request, s.CaptionRequest, authorization)

    @app.post("/v1/vqa", response_model=s.TaskResponse, openapi_extra=_task_openapi(s.VQARequest))
    async def vqa(request: Request, authorization: Authorization = None) -> s.TaskResponse:
        return await task("vqa", request, s.VQARequest, authorization)


async def _read_task_body(request: Request) -> tuple[dict, bytes | None]:
    """JSON body, or multipart form: an `image` file part plus fields (JSON-valued or plain)."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        form = await request.form()
        body, upload = {}, None
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "image":
                    raise ServiceError(
                        400, f"unexpected file part {key!r}; send it as 'image'", key
                    )
                upload = await value.read()
            elif key in ("interventions", "stop") and value.lstrip().startswith(("[", "{")):
                body[key] = _json_field(key, value)
            else:
                body[key] = value
        return body, upload
    try:
        body = await request.json()
    except ValueError:
        raise ServiceError(
            400, "request body is not valid JSON (or use multipart/form-data)"
        ) from None
    if not isinstance(body, dict):
        raise ServiceError(400, "request body must be a JSON object")
    return body, None


def _json_field(key: str, value: str):
    import json

    try:
        return json.loads(value)
    except ValueError:
        raise ServiceError(400, f"form field {key!r} is not valid JSON", key) from None


def _task_openapi(schema: type) -> dict:
    """Document both request forms of a task route in /docs."""
    return {
        "requestBody": {
            "content": {
                "application/json": {"schema": schema.model_json_schema()},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"image": {"type": "string", "format": "binary"}},
                    }
                },
            }
        }
    }
