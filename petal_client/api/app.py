"""The ASGI app of petal-api: OpenAI's /v1 endpoints, /health, the web chat at /, and the swarm monitor at /monitor/.

Every request is validated (schema.py) and checked against its model's context before it reaches the swarm;
each generation runs in its own inference session (completion.py). Errors answer in OpenAI's envelope."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from importlib.resources import files

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from petal_client.api.completion import Finish, Piece, Sampling, ServedModel
from petal_client.api.config import ApiConfig
from petal_client.api.schema import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
    ModelStatus,
    PetalInfo,
    SamplingRequest,
    Usage,
)
from petal_client.routing import MissingBlocksError
from petal_client.swarm import SwarmError
from petald.errors import PetalError
from petald.monitor import Monitor, monitor_app

log = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ApiError(Exception):
    """An error answered in OpenAI's envelope."""

    def __init__(self, status: int, message: str, type: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.body = (
            status,
            ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code)),
        )

    def response(self) -> JSONResponse:
        return JSONResponse(self.body.model_dump(), status_code=self.status)


def swarm_failure(error: Exception) -> ApiError:
    """What a failed generation or swarm read tells the HTTP client."""
    if isinstance(error, MissingBlocksError):
        return ApiError(503, str(error), "server_error", "blocks_unserved")
    if isinstance(error, SwarmError):
        return ApiError(503, f"the swarm cannot be reached: {error}", "server_error", "swarm_unreachable")
    if isinstance(error, PetalError):
        return ApiError(503, f"the swarm could not run the request: {error}", "server_error", "swarm_failure")
    log.error("a request failed", exc_info=error)
    return ApiError(500, f"petal-api failed: {error!r} (its log has the traceback)", "server_error")


class Slots:
    """At most `limit` generations at once; a request over it is refused at once (429), not queued."""

    def __init__(self, limit: int):
        self.limit, self.active = limit, 0

    def take(self) -> None:
        if self.active >= self.limit:
            raise ApiError(
                429,
                f"petal-api is running {self.active} generations, its limit (--max-concurrent {self.limit}): "
                "retry in a moment",
                "rate_limit_error",
                "too_many_requests",
            )
        self.active += 1

    def release(self) -> None:
        self.active -= 1


def create_app(models: dict[str, ServedModel], config: ApiConfig) -> FastAPI:
    """The app serving `models` (by their swarm names) as `config` says."""
    app = FastAPI(title="petal-api", docs_url=None, redoc_url=None, openapi_url=None)
    slots = Slots(config.max_concurrent)
    started = int(time.time())
    chat_page = files("petal_client.api").joinpath("static/chat.html").read_text()
    # petald monitor's pages, through petal-api's own swarm connection; it reads the swarm from the first visit on
    app.state.monitor = Monitor(next(iter(models.values())).swarm)
    app.mount("/monitor", monitor_app(app.state.monitor))

    def authorized(request: Request) -> None:
        if not config.api_keys:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in config.api_keys:
            shown = f" ({key[:3]}…)" if key else ""
            raise ApiError(
                401,
                f"missing or wrong API key{shown}: send the header 'Authorization: Bearer KEY' with a key that "
                "petal-api was started with (--api-key)",
                "invalid_request_error",
                "invalid_api_key",
            )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = [str(part) for part in first["loc"] if part != "body"]
        param = ".".join(where) or None
        message = first["msg"].removeprefix("Value error, ")
        if param is None or first["type"] == "json_invalid":
            param, message = None, f"the request body: {message}; send a JSON object (Content-Type: application/json)"
        else:
            message = f"{param}: {message}"
        return ApiError(400, message, "invalid_request_error", None, param).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        return ApiError(500, f"petal-api failed: {error!r} (its log has the traceback)", "server_error").response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {error.detail}"
        return ApiError(error.status_code, message, "invalid_request_error").response()

    def served(name: str) -> ServedModel:
        if name not in models:
            raise ApiError(
                404,
                f"the model {name!r} is not served by this petal-api (it serves {', '.join(models)}; "
                "GET /v1/models lists the swarm's models)",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
        return models[name]

    def sampling_of(request: SamplingRequest, model: ServedModel, prompt_ids: list[int], param: str) -> Sampling:
        """The generation `request` asks for, if it fits the model's context."""
        room = model.context_length - len(prompt_ids)
        wanted = request.new_tokens()
        if room < 1 or (wanted is not None and wanted > room):
            asked = f" and {wanted} new tokens" if wanted is not None else ""
            raise ApiError(
                400,
                f"{model.name} takes at most {model.context_length} tokens; the {param} has {len(prompt_ids)}{asked}: "
                f"shorten the {param}" + (" or ask for fewer tokens (max_tokens)" if wanted is not None else ""),
                "invalid_request_error",
                "context_length_exceeded",
                param,
            )
        return Sampling(
            max_new_tokens=wanted if wanted is not None else min(config.max_tokens, room),
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=tuple(request.stop_sequences()),
        )

    async def start(model: ServedModel, prompt_ids: list[int], sampling: Sampling):
        """A running generation and its first event; a swarm failure before the first token raises ApiError."""
        slots.take()
        events = model.generate(prompt_ids, sampling, on_done=slots.release)
        try:
            return events, await anext(events)
        except Exception as e:
            raise swarm_failure(e) from e

    async def answer(events: AsyncIterator, first) -> tuple[str, Finish]:
        text, event = [], first
        try:
            while isinstance(event, Piece):
                text.append(event.text)
                event = await anext(events)
        except Exception as e:
            raise swarm_failure(e) from e
        return "".join(text), event

    def stream(events: AsyncIterator, first, chunk, include_usage: bool) -> StreamingResponse:
        """Server-sent events: `chunk(text, finish)` for every piece and for the end, then `data: [DONE]`."""

        async def body():
            event = first
            try:
                while True:
                    if isinstance(event, Finish):
                        yield _sse(chunk("", event))
                        if include_usage:
                            yield _sse(chunk(None, event))
                        break
                    yield _sse(chunk(event.text, None))
                    event = await anext(events)
            except Exception as e:  # the status went out with the first chunk: report in the stream
                yield _sse(swarm_failure(e).body)
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            body(), media_type="text/event-stream", headers=SSE_HEADERS, background=BackgroundTask(events.aclose)
        )

    @app.get("/", include_in_schema=False)
    async def chat() -> HTMLResponse:
        return HTMLResponse(chat_page)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 with the usable models when at least one is fully served; 503 with the missing blocks otherwise."""
        report = {}
        for name, model in models.items():
            try:
                missing = await model.missing_blocks()
                report[name] = {"usable": not missing, "missing_blocks": missing}
            except PetalError as e:
                report[name] = {"usable": False, "error": str(e)}
        ok = any(entry["usable"] for entry in report.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "models": report}, status_code=200 if ok else 503)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def list_models() -> dict:
        first = next(iter(models.values()))
        try:
            announced = await first.list_swarm_models()
        except PetalError as e:
            raise swarm_failure(e) from e
        cards = []
        for name in sorted(set(announced) | set(models)):
            if name in models:
                missing = await models[name].missing_blocks()
                status = ModelStatus(
                    num_blocks=models[name].num_blocks, loaded=True, usable=not missing, missing_blocks=missing
                )
            else:
                status = ModelStatus(num_blocks=announced[name], loaded=False, usable=False, missing_blocks=None)
            cards.append(ModelCard(id=name, created=started, petal=status))
        return ModelList(data=cards).model_dump()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: ChatCompletionRequest):
        model = served(request.model)
        if not model.has_chat_template:
            raise ApiError(
                400,
                f"{model.name} has no chat template: use POST /v1/completions with a prompt",
                "invalid_request_error",
                "no_chat_template",
                "messages",
            )
        try:
            prompt_ids = model.chat_prompt([m.as_template_input() for m in request.messages])
        except TemplateError as e:  # e.g. a template that wants user and assistant turns to alternate
            raise ApiError(
                400,
                f"{model.name}'s chat template refused the messages: {e}",
                "invalid_request_error",
                None,
                "messages",
            ) from e
        sampling = sampling_of(request, model, prompt_ids, "messages")
        events, first = await start(model, prompt_ids, sampling)
        reply = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model.name)
        if request.stream:

            def chunk(text: str | None, finish: Finish | None) -> ChatCompletionChunk:
                if text is None:  # the usage chunk, after the last one
                    return ChatCompletionChunk(**reply, choices=[], usage=_usage(finish))
                end = finish is not None
                return ChatCompletionChunk(
                    **reply,
                    choices=[
                        ChunkChoice(
                            delta=Delta(role="assistant", content=text) if not end else Delta(),
                            finish_reason=finish.reason if end else None,
                        )
                    ],
                    petal=_petal(finish) if end else None,
                )

            return stream(events, first, chunk, request.include_usage)
        text, finish = await answer(events, first)
        return ChatCompletion(
            **reply,
            choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=finish.reason)],
            usage=_usage(finish),
            petal=_petal(finish),
        ).model_dump()

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(request: CompletionRequest):
        model = served(request.model)
        prompt_ids = model.text_prompt(request.text())
        sampling = sampling_of(request, model, prompt_ids, "prompt")
        events, first = await start(model, prompt_ids, sampling)
        reply = dict(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model.name)
        if request.stream:

            def chunk(text: str | None, finish: Finish | None) -> Completion:
                if text is None:
                    return Completion(**reply, choices=[], usage=_usage(finish))
                end = finish is not None
                return Completion(
                    **reply,
                    choices=[CompletionChoice(text=text, finish_reason=finish.reason if end else None)],
                    petal=_petal(finish) if end else None,
                )

            return stream(events, first, chunk, request.include_usage)
        text, finish = await answer(events, first)
        return Completion(
            **reply,
            choices=[CompletionChoice(text=text, finish_reason=finish.reason)],
            usage=_usage(finish),
            petal=_petal(finish),
        ).model_dump()

    return app


def _sse(message) -> str:
    return f"data: {json.dumps(message.model_dump(), separators=(',', ':'))}\n\n"


def _usage(finish: Finish) -> Usage:
    return Usage(
        prompt_tokens=finish.prompt_tokens,
        completion_tokens=finish.completion_tokens,
        total_tokens=finish.prompt_tokens + finish.completion_tokens,
    )


def _petal(finish: Finish) -> PetalInfo:
    return PetalInfo(servers=finish.servers, failovers=finish.failovers)
