"""FastAPI app: thin routes over a `Serving`. The same app runs under uvicorn and Ray Serve.

Routes parse, call one Serving method and shape the HTTP reply; errors of every kind leave as
OpenAI error objects. Generation runs on the model engine's own thread, so /health answers while
the model works.
"""

from __future__ import annotations

import json
import logging
import math
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

import lvlm_fix
from lvlm_fix.lvlm import LVLM
from lvlm_fix.service import schemas as s
from lvlm_fix.service.config import ServeConfig
from lvlm_fix.service.engine import Engine, LocalEngine
from lvlm_fix.service.metrics import Gauges, Metrics
from lvlm_fix.service.serving import ServiceError, Serving, internal_error, new_request_id

log = logging.getLogger(__name__)

ALWAYS_PUBLIC = frozenset({"/health", "/ready"})
DOCS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
INT64 = 2**63  # JSON integers beyond int64 are refused while parsing


def build_app(
    engine: LVLM | Engine | Serving,
    config: ServeConfig | None = None,
    *,
    metrics: Metrics | None = None,
    proxy_echoes_request_id: bool = False,
) -> FastAPI:
    """An app over an in-process LVLM, any Engine (e.g. Ray's) or a ready Serving.

    `metrics`: where the app records (default: a private Prometheus registry served at
    /metrics; on Ray, Ray's metrics). `proxy_echoes_request_id`: behind a proxy that sets
    `X-Request-Id` on responses itself (Ray Serve's), the app leaves that header alone instead
    of adding a second value.
    """
    config = config or ServeConfig()
    metrics = metrics or Metrics()
    if isinstance(engine, LVLM):
        engine = LocalEngine(engine, Gauges(metrics))
    serving = engine if isinstance(engine, Serving) else Serving(engine, config, metrics)
    app = FastAPI(
        title="lvlm-fix",
        version=lvlm_fix.__version__,
        description="OpenAI-compatible LVLM serving with hallucination interventions.",
    )
    app.state.serving = serving
    app.router.route_class = _bounded_route(serving.config.max_request_bytes)
    _add_error_handlers(app, serving)
    # The last added runs first: request id, then the API key, then faults around the route.
    _add_fault_middleware(app, serving)
    _add_auth_middleware(app, serving)
    _add_request_middleware(app, serving, proxy_echoes_request_id)
    _add_routes(app, serving)
    return app


def _error(serving: Serving, error: ServiceError) -> JSONResponse:
    serving.metrics.errors.inc(model_name=serving.config.model_name, code=str(error.status))
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
        # 400, as OpenAI's API and vLLM answer a request that does not fit the schema.
        return _error(serving, ServiceError(400, message, where or None, first.get("type")))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return _error(serving, ServiceError(error.status_code, str(error.detail)))


def _add_fault_middleware(app: FastAPI, serving: Serving) -> None:
    """A server fault answers "internal error" and the request id; the detail goes to the log.
    Caught here, inside the request-id middleware, the reply carries X-Request-Id and the
    connection stays usable (Starlette's last-resort handler re-raises and drops it)."""

    @app.middleware("http")
    async def contain_faults(request: Request, call_next):
        try:
            return await call_next(request)
        except Exception:
            request_id = request.state.request_id
            log.exception("request %s failed", request_id)
            return _error(serving, internal_error(request_id))


def _add_auth_middleware(app: FastAPI, serving: Serving) -> None:
    """The API key is checked before any route reads the body, so an unauthenticated client
    costs no parsing; /health and /ready stay public, docs and metrics as configured."""
    public = set(ALWAYS_PUBLIC)
    if serving.config.public_docs:
        public |= DOCS
    if serving.config.public_metrics:
        public.add("/metrics")

    @app.middleware("http")
    async def require_api_key(request: Request, call_next):
        if request.url.path not in public:
            try:
                serving.check_auth(request.headers.get("authorization"))
            except ServiceError as error:
                return _error(serving, error)
        return await call_next(request)


def _add_request_middleware(app: FastAPI, serving: Serving, proxy_echoes: bool) -> None:
    @app.middleware("http")
    async def request_id_and_arrival(request: Request, call_next):
        request.state.request_id = request.headers.get("x-request-id") or new_request_id()
        request.state.arrived = time.perf_counter()  # latency metrics count from here
        response = await call_next(request)
        if not proxy_echoes:
            response.headers["X-Request-Id"] = request.state.request_id
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
        text = serving.metrics.render()
        if text is None:
            raise ServiceError(
                404,
                "on Ray, metrics are exported by Ray's metrics agent of each node (its metrics "
                "export port), for every replica; see the README",
                code="metrics_exported_by_ray",
            )
        return Response(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=s.ModelList)
    async def models() -> s.ModelList:
        return serving.models()

    @app.get("/v1/models/{model:path}", response_model=s.ModelCard)
    async def model(model: str) -> s.ModelCard:
        return serving.model(model)

    @app.get("/v1/interventions")
    async def interventions() -> dict:
        return serving.interventions()

    @app.post(
        "/v1/chat/completions",
        response_model=s.ChatCompletionResponse,
        responses={400: {"model": s.ErrorResponse}, 404: {"model": s.ErrorResponse}},
    )
    async def chat(body: s.ChatCompletionRequest, request: Request):
        job = await serving.chat_job(body)
        request_id, arrived = request.state.request_id, request.state.arrived
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            events = serving.chat_stream(job, request_id, usage, arrived)
            return StreamingResponse(events, media_type="text/event-stream")
        return await serving.chat(job, request_id, arrived)

    async def task(kind: str, request: Request, schema: type[s.GenerationFields]):
        body, upload = await _read_task_body(request)
        try:
            parsed = schema.model_validate(body)
        except ValidationError as error:
            raise ServiceError(400, s.first_error(error), None, "validation_error") from None
        job = await serving.task_job(parsed, upload)
        return await serving.task(kind, job, request.state.request_id, request.state.arrived)

    @app.post(
        "/v1/caption", response_model=s.TaskResponse, openapi_extra=_task_openapi(s.CaptionRequest)
    )
    async def caption(request: Request) -> s.TaskResponse:
        return await task("caption", request, s.CaptionRequest)

    @app.post("/v1/vqa", response_model=s.TaskResponse, openapi_extra=_task_openapi(s.VQARequest))
    async def vqa(request: Request) -> s.TaskResponse:
        return await task("vqa", request, s.VQARequest)


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
    body = await request.json()
    if not isinstance(body, dict):
        raise ServiceError(400, "request body must be a JSON object")
    return body, None


def _json_field(key: str, value: str):
    return strict_json(value.encode(), f"form field {key!r}")


def strict_json(data: bytes, what: str = "request body"):
    """JSON as a client may send it: no NaN or Infinity (not JSON, and poison for every
    bound), no overflowing floats, integers within int64, nesting within Python's stack."""

    def refuse(problem: str):
        raise ServiceError(400, f"{what} is not valid JSON: {problem}", code="invalid_json")

    def finite(text: str) -> float:
        value = float(text)
        return value if math.isfinite(value) else refuse(f"number {text[:20]} overflows")

    def bounded(text: str) -> int:
        value = int(text) if len(text) <= 20 else INT64  # long digit strings: out of range
        return value if -INT64 <= value < INT64 else refuse(f"integer {text[:20]}... too large")

    try:
        return json.loads(
            data,
            parse_constant=lambda name: refuse(f"{name} is not a JSON value"),
            parse_float=finite,
            parse_int=bounded,
        )
    except RecursionError:
        refuse("nested too deeply")
    except ValueError as error:
        refuse(str(error).split(":")[0])


def _bounded_route(max_bytes: int) -> type[APIRoute]:
    """Routes whose request body is read within `max_bytes` and parsed as strict JSON before
    FastAPI sees it (FastAPI's own parser accepts NaN and turns parse failures into a bare 400;
    its body limit answers 413 in plain text, even before the API key is checked)."""

    class BoundedRequest(Request):
        async def body(self) -> bytes:
            if not hasattr(self, "_body"):
                chunks, size = [], 0
                async for chunk in self.stream():
                    size += len(chunk)
                    if size > max_bytes:
                        raise ServiceError(
                            413,
                            f"request body exceeds {max_bytes} bytes",
                            code="request_too_large",
                        )
                    chunks.append(chunk)
                self._body = b"".join(chunks)
            return self._body

        async def json(self):
            if not hasattr(self, "_json"):
                self._json = strict_json(await self.body())
            return self._json

    class BoundedRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def bounded(request: Request) -> Response:
                request = BoundedRequest(request.scope, request.receive)
                if _is_json(request) and await request.body():
                    await request.json()  # errors leave here as ServiceErrors, not FastAPI's 400
                return await handler(request)

            return bounded

    return BoundedRoute


def _is_json(request: Request) -> bool:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return request.method in ("POST", "PUT", "PATCH") and (
        kind in ("", "application/json") or kind.endswith("+json")
    )


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
