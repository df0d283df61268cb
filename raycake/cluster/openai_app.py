"""The OpenAI-compatible HTTP API on Ray Serve: a FastAPI app as the ingress deployment.

Replicas are stateless: each is one more driver over the deployment's named actors
(``Cluster.attach``), so Serve may run, add or remove any number of them (``http.num_replicas``,
``http.autoscaling_config``). Routes: ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` for Server-Sent Events), ``GET /health`` and
``GET /metrics``. With ``http.api_key`` set, every ``/v1`` route wants
``Authorization: Bearer <key>``.

Bodies are read and validated here rather than by FastAPI's body parameters, so that the key is
checked first and every malformed body, down to invalid JSON, gets OpenAI's 400 shape naming the
field (never FastAPI's 422).
"""

# NOTE: no ``from __future__ import annotations`` here. Serve rebuilds the routes' methods into
# functions of its own module, where FastAPI cannot resolve string annotations: ``request:
# "Request"`` would become a required query parameter.
import hmac
import time
import urllib.error
import urllib.request
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.deployment import Application
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from raycake.cluster.cluster import Cluster
from raycake.cluster.config import ClusterConfig, HttpConfig
from raycake.cluster.deployment import ensure_deployment
from raycake.cluster.openai_errors import (
    ApiError,
    from_validation_errors,
    unauthorized,
    unavailable,
)
from raycake.cluster.openai_protocol import ChatCompletionRequest, CompletionRequest
from raycake.cluster.openai_service import EventStream, OpenAIService
from raycake.cluster.prometheus_scrape import MetricsUnavailable, raycake_metrics

APP_NAME = "raycake-openai"
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# How long serve_http waits for Serve's proxy to answer on the configured port.
LISTEN_TIMEOUT_S = 30.0

app = FastAPI(title="raycake", description="OpenAI-compatible API over a raycake cluster")


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return await _api_error(request, from_validation_errors(exc.errors()))


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    # Unknown routes and methods, in the same shape as every other error.
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    error = ApiError(
        exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code
    )
    return await _api_error(request, error)


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not a cluster fault: still a JSON error, and the server serves on.
    error = ApiError(500, f"{type(exc).__name__}: {exc}", type="server_error", code="internal")
    return await _api_error(request, error)


class _ClosingStreamingResponse(StreamingResponse):
    """Calls ``on_close`` however the response ends: completed, or cancelled because the client
    went away (the body iterator may then be suspended at a ``yield``, never to be resumed)."""

    def __init__(self, stream: EventStream) -> None:
        super().__init__(stream.events, media_type="text/event-stream")
        self._on_close = stream.close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _read(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise from_validation_errors(exc.errors()) from None


def _reply(result: dict[str, Any] | EventStream) -> Response:
    if isinstance(result, EventStream):
        return _ClosingStreamingResponse(result)
    return JSONResponse(result)


@serve.deployment(name="OpenAIIngress")
@serve.ingress(app)
class OpenAIIngress:
    """One replica: a driver attached to the running deployment's actors."""

    def __init__(self, cluster_config: ClusterConfig) -> None:
        self._api_key = cluster_config.http.api_key
        self.service = OpenAIService(Cluster.attach(cluster_config), cluster_config.http)

    def _authorize(self, request: Request) -> None:
        if self._api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Constant time: the comparison must not tell how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self._api_key.encode()
        ):
            raise unauthorized()

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse(self.service.models())

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        return _reply(await self.service.completion(await _read(request, CompletionRequest)))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        return _reply(await self.service.chat(await _read(request, ChatCompletionRequest)))

    @app.get("/health")
    async def health(self) -> JSONResponse:
        return JSONResponse(await self.service.health())

    @app.get("/metrics")
    async def metrics(self) -> Response:
        try:
            text = await raycake_metrics()
        except MetricsUnavailable as exc:
            raise unavailable(str(exc)) from None
        return PlainTextResponse(text, media_type=PROMETHEUS_CONTENT_TYPE)


def build_openai_app(config: ClusterConfig) -> Application:
    """The Serve application for ``config``'s deployment, sized by ``config.http``."""
    http = config.http
    options: dict[str, Any] = {
        "max_ongoing_requests": http.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": http.num_cpus},
    }
    if http.autoscaling_config is not None:
        options["autoscaling_config"] = dict(http.autoscaling_config)
    else:
        options["num_replicas"] = http.num_replicas or 1
    return OpenAIIngress.options(**options).bind(config)


def app_builder(args: dict[str, Any]) -> Application:
    """Ray Serve's application builder, for a RayService's ``serveConfigV2`` or ``serve run``:
    ``import_path: raycake.cluster.openai_app:app_builder`` with ``args: {config: <cluster config
    file>}``. Brings the deployment's actors up, detached (they must outlive the builder's
    task), unless they already run in the config's namespace; returns the ingress over them."""
    if not isinstance(args, dict):
        raise ValueError(f"args: expected a mapping with key 'config', got {args!r}")
    unknown = sorted(set(args) - {"config"})
    if unknown:
        raise ValueError(f"args: unknown key(s) {unknown}; expected only 'config'")
    path = args.get("config")
    if not isinstance(path, str) or not path:
        raise ValueError(f"args.config: expected the path of a cluster config file, got {path!r}")
    config = ClusterConfig.from_file(path)
    ensure_deployment(config)
    return build_openai_app(config)


def serve_http(cluster_config: ClusterConfig, http_config: HttpConfig | None = None) -> str:
    """Start Ray Serve's HTTP proxy on ``http.host:http.port`` and deploy the app over the
    running deployment (its actors must exist); returns the API's base URL. The app keeps
    serving after this returns, until ``serve.shutdown()`` or the Ray cluster ends."""
    config = cluster_config if http_config is None else replace(cluster_config, http=http_config)
    http = config.http
    serve.start(http_options={"host": http.host, "port": http.port})
    serve.run(build_openai_app(config), name=APP_NAME, route_prefix=http.route_prefix)
    prefix = http.route_prefix.rstrip("/")
    _check_listening(http, prefix)
    return f"http://{http.host}:{http.port}{prefix}/v1"


def _check_listening(http: HttpConfig, prefix: str) -> None:
    """Serve already running in this Ray cluster keeps its own host and port (it only warns):
    fail here rather than report a URL nothing listens on."""
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host
    url = f"http://{host}:{http.port}{prefix}/health"
    deadline = time.monotonic() + LISTEN_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError:
            return  # something answers HTTP there: Serve's proxy (503 while instances start)
        except OSError as exc:
            if time.monotonic() > deadline:
                raise ValueError(
                    f"http.port: nothing answers on {http.host}:{http.port} ({exc}); Ray Serve "
                    "may already run in this Ray cluster with other HTTP options (they cannot "
                    "change while it runs: use its port, or `serve shutdown` first)"
                ) from None
            time.sleep(0.5)
