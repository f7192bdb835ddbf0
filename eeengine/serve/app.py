"""The HTTP server: FastAPI app, text-embeddings-inference's ``/predict``, health, info, metrics.

``create_app`` serves any :class:`eeengine.serve.batcher.Batcher` (the benchmarks serve a Hugging
Face full-depth model through the same app); :func:`engine_app` builds the app of an
:class:`eeengine.Engine` with the layer-wise or the static batcher.

- ``POST /predict``: TEI's request and response (:mod:`eeengine.serve.protocol`), plus each
  input's exit layer; TEI's timing headers (``x-total-time``, ``x-tokenization-time``,
  ``x-queue-time``, ``x-inference-time``, in ms).
- ``GET /health``: 200 once the model has run a warm-up request, 503 before (and if its worker
  thread died).
- ``GET /info``: model, labels, policy, backend, executor, precision, limits, and whether a
  lone request runs as one row graph (``row_graph``: ``available``, ``reason``).
- ``GET /metrics``: Prometheus (:mod:`eeengine.serve.metrics`).
- ``GET /docs``: OpenAPI (FastAPI).

Concurrency: at most ``max_concurrent_requests`` requests are in flight; one more gets 429 at
once. A request whose client disconnects is cancelled: its inputs leave the queues. On
shutdown (uvicorn handles SIGTERM/SIGINT), uvicorn stops accepting connections and waits for
the requests in flight; then the worker finishes what was submitted and stops.
"""

from __future__ import annotations

import asyncio
import math
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import Message
from transformers import PreTrainedTokenizerBase

from eeengine.engine import Engine
from eeengine.inputs import char_limit
from eeengine.runtime import ExitLoop, NonFiniteLogitsError, check_finite
from eeengine.serve import BATCHING
from eeengine.serve.batcher import Batcher, Job, JobResult, StaticBatcher
from eeengine.serve.layerwise import LayerwiseBatcher
from eeengine.serve.metrics import ServeMetrics
from eeengine.serve.protocol import (
    ErrorResponse,
    Prediction,
    PredictRequest,
    ServeError,
    parse_inputs,
    predictions,
    tokenize,
)


@dataclass
class ServeConfig:
    """The server's limits, with text-embeddings-inference's names, meaning and defaults.

    Attributes:
        max_concurrent_requests: requests in flight; one more gets 429 at once.
        max_batch_tokens: padded tokens per model call (inputs x longest input).
        max_batch_requests: inputs per model call; None for no limit.
        max_client_batch_size: inputs in one request; more get 413.
        batching: "continuous" (layer-wise, :mod:`eeengine.serve.layerwise`) or "static"
            (a batch runs to completion, TEI's scheme).
        schedule: the continuous batcher's choice of the next depth, "fullest" or "oldest"
            (:data:`eeengine.serve.SCHEDULES`).
        max_wait_ms: with "fullest", an input waiting longer than this (ms) makes the
            longest-waiting queue run next; None: never.
    """

    max_concurrent_requests: int = 512
    max_batch_tokens: int = 16384
    max_batch_requests: int | None = None
    max_client_batch_size: int = 32
    batching: str = "continuous"
    schedule: str = "fullest"
    max_wait_ms: float | None = 25.0


@dataclass
class ServedModel:
    """What the HTTP layer needs of the model.

    Attributes:
        tokenizer: encodes inputs as the model expects.
        label_names: class names, None for regression.
        num_layers: depth (the exit-layer histogram's range).
        max_input_length: tokens per input (TEI ``--max-input-length``).
        info: extra fields of ``GET /info`` (model id, policy, backend ...).
    """

    tokenizer: PreTrainedTokenizerBase
    label_names: list[str] | None
    num_layers: int
    max_input_length: int
    info: dict = field(default_factory=dict)


@dataclass
class _State:
    ready: bool = False
    in_flight: int = 0


def create_app(
    model: ServedModel,
    config: ServeConfig,
    make_batcher: type[Batcher] | object,
    metrics: ServeMetrics | None = None,
) -> FastAPI:
    """The FastAPI app serving ``model`` through a batcher.

    Args:
        model: tokenizer, labels and limits of the model.
        config: the server's limits.
        make_batcher: called with the batch limits (``num_layers``, ``pad_token_id``,
            ``max_batch_tokens``, ``max_batch_requests``, ``metrics`` keywords) to build the
            :class:`Batcher`, started when the app starts and stopped (drained) when it stops.
        metrics: the metrics to record into (a new :class:`ServeMetrics` by default).

    Raises:
        ValueError: ``max_batch_tokens`` below ``max_input_length`` (an input could never
            run), or a limit below 1.
    """
    if config.max_batch_tokens < model.max_input_length:
        raise ValueError(
            f"max_batch_tokens ({config.max_batch_tokens}) must be at least max_input_length "
            f"({model.max_input_length})"
        )
    if config.max_concurrent_requests < 1 or config.max_client_batch_size < 1:
        raise ValueError("max_concurrent_requests and max_client_batch_size must be positive")
    metrics = metrics or ServeMetrics(model.num_layers)
    batcher: Batcher = make_batcher(
        num_layers=model.num_layers,
        pad_token_id=model.tokenizer.pad_token_id,
        max_batch_tokens=config.max_batch_tokens,
        max_batch_requests=config.max_batch_requests,
        metrics=metrics,
    )
    state = _State()

    async def warm_up() -> None:
        """One request through the whole path: a short input and one of the maximum length."""
        long_text = " ".join(["word"] * model.max_input_length)
        ids, types = tokenize(
            model.tokenizer, [("warm up", None), (long_text, None)], model.max_input_length, True
        )
        job = Job(ids, types)
        batcher.submit(job)
        await asyncio.wrap_future(job.future)
        state.ready = True

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        warming = asyncio.create_task(warm_up())
        yield
        warming.cancel()
        await asyncio.to_thread(batcher.stop)

    app = FastAPI(
        title="eeengine",
        summary="Early-exit encoder classifier, text-embeddings-inference compatible /predict",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.metrics = metrics

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, error: ServeError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        message = "; ".join(
            f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        metrics.requests.labels("client_error").inc()
        return JSONResponse({"error": message, "error_type": "validation"}, status_code=422)

    @app.post(
        "/predict",
        response_model=list[Prediction] | list[list[Prediction]],
        responses={
            400: {"model": ErrorResponse, "description": "no input, or an empty text"},
            413: {"model": ErrorResponse, "description": "too many or too long inputs"},
            422: {"model": ErrorResponse, "description": "not a PredictRequest"},
            429: {"model": ErrorResponse, "description": "max_concurrent_requests reached"},
            503: {"model": ErrorResponse, "description": "warming up"},
        },
    )
    async def predict(body: PredictRequest, request: Request) -> Response:
        """Classify a text, a pair, or a batch; each input exits at its own layer."""
        started = time.perf_counter()
        if not state.ready:
            raise ServeError(503, "unhealthy", "the model is warming up")
        if state.in_flight >= config.max_concurrent_requests:
            metrics.requests.labels("overloaded").inc()
            raise ServeError(429, "overloaded", "Model is overloaded")
        state.in_flight += 1
        metrics.in_flight.set(state.in_flight)
        try:
            try:
                examples, single = parse_inputs(
                    body.inputs,
                    config.max_client_batch_size,
                    char_limit(model.max_input_length) if body.truncate else None,
                )
                ids, types = tokenize(
                    model.tokenizer, examples, model.max_input_length, body.truncate
                )
            except ServeError:
                metrics.requests.labels("client_error").inc()
                raise
            tokenized = time.perf_counter()
            job = Job(ids, types)
            batcher.submit(job)
            try:
                result = await _result_unless_disconnected(job, request)
            except Exception as error:  # the model call failed: a server fault
                metrics.requests.labels("error").inc()
                raise ServeError(500, "backend", f"inference failed: {error}") from error
        finally:
            state.in_flight -= 1
            metrics.in_flight.set(state.in_flight)
        if result is None:
            metrics.requests.labels("cancelled").inc()
            return Response(status_code=499)  # nobody reads it: the client is gone
        try:  # as Engine.predict: no answer from NaN or infinite logits
            check_finite(result.logits, result.exit_layer, range(len(result.logits)))
        except NonFiniteLogitsError as error:
            metrics.requests.labels("error").inc()
            raise ServeError(500, "backend", str(error)) from None
        answers = predictions(result.logits, result.exit_layer, model.label_names, body.raw_scores)
        metrics.requests.labels("ok").inc()
        total = time.perf_counter() - started
        metrics.request_duration.observe(total)
        headers = {
            "x-total-time": _ms(total),
            "x-tokenization-time": _ms(tokenized - started),
            "x-queue-time": _ms(result.queue_seconds),
            "x-inference-time": _ms(result.inference_seconds),
        }
        return JSONResponse(answers[0] if single else answers, headers=headers)

    @app.get(
        "/health",
        responses={503: {"model": ErrorResponse, "description": "warming up, or down"}},
    )
    async def health() -> Response:
        """200 once the model has answered a warm-up request and its worker runs, else 503."""
        if state.ready and batcher.alive:
            return Response(status_code=200)
        message = "warming up" if batcher.alive else "the model's worker thread stopped"
        return JSONResponse({"error": message, "error_type": "unhealthy"}, status_code=503)

    @app.get("/info")
    async def info() -> dict:
        """The served model (labels, policy, backend, executor, precision) and the limits;
        ``split_cost`` is the engine's, which the batcher cuts by (padded tokens, null: never
        cut)."""
        return {
            **model.info,
            "labels": model.label_names,
            "num_layers": model.num_layers,
            "max_input_length": model.max_input_length,
            **asdict(config),
            "split_cost": batcher.split_cost if math.isfinite(batcher.split_cost) else None,
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text format."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _result_unless_disconnected(job: Job, request: Request) -> JobResult | None:
    """The job's result, or None (the job cancelled) if the client disconnects first."""
    result = asyncio.wrap_future(job.future)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not result.done():
            job.cancelled = True
        gone.cancel()
    return result.result() if result.done() else None


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone (the ASGI server sends ``http.disconnect``)."""
    while True:
        message: Message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _ms(seconds: float) -> str:
    return str(round(seconds * 1000))


def engine_app(engine: Engine, config: ServeConfig) -> FastAPI:
    """The app serving ``engine``, with ``config.batching``'s batcher.

    Raises:
        ValueError: an unknown ``batching``, or bad limits (see :func:`create_app`).
    """
    if config.batching not in BATCHING:
        raise ValueError(f"unknown batching {config.batching!r}; use one of {BATCHING}")
    loop = engine.exit_loop()

    def make_batcher(**limits: object) -> Batcher:
        limits["host_ops"] = loop.executor.host_ops
        limits["split_cost"] = engine.split_cost
        if config.batching == "static":
            return StaticBatcher(
                lambda *batch: _logits_and_layers(loop.run(*batch)),
                device=engine.device,
                **limits,
            )
        return LayerwiseBatcher(
            loop, config.schedule, config.max_wait_ms, device=engine.device, **limits
        )

    model = ServedModel(
        tokenizer=engine.tokenizer,
        label_names=engine.label_names,
        num_layers=engine.num_layers,
        max_input_length=engine.max_length,
        info={
            "model_id": str(engine.path),
            "model_type": engine.manifest["task"]["type"],
            "backbone": engine.manifest["backbone"],
            "policy": repr(engine.policy),
            "backend": engine.backend,
            "executor": engine.executor,
            "precision": engine.precision,
            "device": str(engine.device),
            "token_pruning": None
            if engine.token_pruning is None
            else engine.token_pruning.to_json(),
            "row_graph": _row_graph_info(loop),
        },
    )
    return create_app(model, config, make_batcher)


def _row_graph_info(loop: ExitLoop) -> dict:
    """Whether a lone request runs the whole loop as one graph
    (:meth:`eeengine.runtime.ExitLoop.row_loop`), and if not, why."""
    reason = loop.row_loop_unavailable()
    return {"available": reason is None, "reason": reason}


def _logits_and_layers(out: object) -> tuple[torch.Tensor, torch.Tensor]:
    return out.logits, out.exit_layer


def run(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until SIGINT or SIGTERM; exit status 0 after a SIGTERM.

    uvicorn drains on the signal (no new connections, requests in flight answered, then the
    app's shutdown empties the model's queue), then raises the signal again; that raise exits
    with status 0 here: a requested, clean shutdown.
    """
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)
