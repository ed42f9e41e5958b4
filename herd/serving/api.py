"""The OpenAI chat-completions API, as vLLM accepts it, over a `ServedModel` and a `Batcher`.

    POST /v1/chat/completions   messages[].content: a string, or parts `text`, `image_url` (data: URLs),
                                `input_audio` ({"data": base64, "format": "wav"|"mp3"}), `video_url`
                                (vLLM's extension, data: URLs); max_tokens, temperature, top_p, seed, stop,
                                stream (server-sent events); vLLM's return_token_ids and ignore_eos
    GET  /v1/models             the one served model
    GET  /health                200 while the server runs
    GET  /                      the page: pick or drop a file, ask, read the streamed answer (herd.serving.page)

Every error is `{"error": {"message", "type", "code"}}` with a 4xx status naming the problem, or a 500
whose message says nothing of the code; tracebacks go to the server's log only. The request body is read
up to `max_upload_bytes` (413 beyond), parsed here (400 on bad JSON) and validated by pydantic (422).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from herd.serving.batcher import Batcher, Event, Job, QueueFull
from herd.serving.engine import Part, ServedModel, Turn
from herd.serving.media import AUDIO_FORMATS, IMAGE_TYPES, VIDEO_TYPES, RequestError, b64decode, data_url
from herd.serving.page import page_config, render_page

log = logging.getLogger("herd.serve")


# --- request schema ------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields are ignored, as vLLM and OpenAI do


class URLRef(_Strict):
    url: str = Field(max_length=1 << 31)


class AudioRef(_Strict):
    data: str
    format: str


class ContentPart(_Strict):
    type: Literal["text", "image_url", "input_audio", "video_url"]
    text: str | None = None
    image_url: URLRef | None = None
    input_audio: AudioRef | None = None
    video_url: URLRef | None = None


def guard_view(messages: list[Any]) -> list[dict[str, str]]:
    """What Llama Guard 3 (text-only) reads of a request: the user and assistant turns with their text
    parts joined; media parts are not text and are left out, system and tool turns too (the guard's
    template has user and assistant turns only)."""
    out = []
    for m in messages:
        if m.role not in ("user", "assistant"):
            continue
        if isinstance(m.content, list):
            text = " ".join(p.text for p in m.content if getattr(p, "type", None) == "text" and p.text)
        else:
            text = m.content or ""
        out.append({"role": m.role, "content": text})
    return out


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # OpenAI's and vLLM's default
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=1)
    return_token_ids: bool = False
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model samples


@dataclass
class ServerConfig:
    max_upload_bytes: int = 20 << 20
    max_tokens: int = 512  # the cap on any request's max_tokens
    api_key: str | None = None
    guard: Any = None  # herd.guard.Guard or None
    guard_every_chars: int = 160  # a streamed reply is screened each time this much new text is pending


def guard_refusal(verdict: Any) -> str:
    from herd.guard import refusal

    return refusal(verdict)


def guard_report(verdict: Any, screened: str) -> dict[str, Any]:
    """The verdict as the API reports it: which side was flagged and the categories (codes, titles)."""
    return {"flagged": screened, "categories": list(verdict.categories), "titles": list(verdict.titles)}


def error(
    status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


# --- request → turns --------------------------------------------------------------------------------
def to_turns(req: ChatRequest) -> list[Turn]:
    """Validated messages → engine turns; media stay base64-decoded bytes (decoded by the engine)."""
    turns = []
    for i, msg in enumerate(req.messages):
        where = f"messages[{i}]"
        content = msg.content if msg.content is not None else ""
        if isinstance(content, str):
            turns.append(Turn(msg.role, [Part("text", f"{where}.content", text=content)]))
            continue
        parts = []
        for j, p in enumerate(content):
            at = f"{where}.content[{j}]"
            ref = getattr(p, p.type)
            if ref is None:
                raise RequestError(400, f"{at}: a part of type {p.type!r} needs a {p.type!r} field")
            if p.type == "text":
                parts.append(Part("text", at, text=ref))
            elif p.type == "image_url":
                parts.append(
                    Part("image", f"{at}.image_url", data=data_url(ref.url, f"{at}.image_url", IMAGE_TYPES))
                )
            elif p.type == "video_url":
                parts.append(
                    Part("video", f"{at}.video_url", data=data_url(ref.url, f"{at}.video_url", VIDEO_TYPES))
                )
            else:
                fmt = ref.format.lower()
                if fmt not in AUDIO_FORMATS:
                    raise RequestError(
                        400, f"{at}.input_audio.format: {ref.format[:20]!r} is not one of wav, mp3"
                    )
                parts.append(
                    Part(
                        "audio",
                        f"{at}.input_audio",
                        data=b64decode(ref.data, f"{at}.input_audio.data"),
                        fmt=fmt,
                    )
                )
        turns.append(Turn(msg.role, parts))
    return turns


async def read_json(request: Request, cap: int) -> Any:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise RequestError(415, f"Content-Type must be application/json, not {ctype[:60]!r}")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > cap):
        raise RequestError(413, f"the request body exceeds the {cap >> 20} MB upload limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise RequestError(413, f"the request body exceeds the {cap >> 20} MB upload limit")
    try:
        return json.loads(body)
    except RecursionError:
        raise RequestError(400, "the JSON body is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(400, f"the body is not valid JSON ({str(e)[:100]})") from None


def validation_message(e: ValidationError) -> str:
    first = e.errors()[:3]
    return "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in first)


# --- the app ---------------------------------------------------------------------------------------------
def build_app(served: ServedModel, batcher: Batcher, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="herd serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.middleware("http")
    async def guard_errors(request: Request, call_next: Any) -> Response:
        """API key on /v1/*; any unexpected exception becomes a 500 without a traceback."""
        if config.api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
                return error(
                    401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error"
                )
        try:
            return await call_next(request)
        except Exception:
            log.exception("unhandled error on %s", request.url.path)
            return error(500, "internal server error (logged on the server)", "server_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error(exc.status, exc.message, exc.kind)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        described = served.describe()
        html, headers = render_page(
            page_config(
                served.name,
                described["modalities"],
                config.max_upload_bytes,
                config.max_tokens,
                config.api_key is not None,
            )  # fmt: skip
        )
        return HTMLResponse(html, headers=headers)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **batcher.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": served.name,
            "object": "model",
            "created": created,
            "owned_by": "herd",
            **served.describe(),
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        raw = await read_json(request, config.max_upload_bytes)
        try:
            req = ChatRequest.model_validate(raw)
        except ValidationError as e:
            return error(422, validation_message(e))
        if req.model not in (None, served.name):
            return error(
                404,
                f"the model {req.model[:100]!r} does not exist; this server serves {served.name!r}",
                "not_found_error",
            )
        turns = to_turns(req)
        if config.guard is not None:
            verdict = await run_in_threadpool(config.guard.check_user, guard_view(req.messages))
            if not verdict.safe:  # as Azure OpenAI answers a filtered prompt: 400 `content_filter`
                body = {"message": guard_refusal(verdict), "type": "content_filter", "code": 400,
                        "guard": guard_report(verdict, "user")}  # fmt: skip
                return JSONResponse({"error": body}, status_code=400)
        requested = req.max_completion_tokens or req.max_tokens or config.max_tokens
        from herd.text.generation import SamplingParams

        params = SamplingParams(min(requested, config.max_tokens), req.temperature, req.top_p, req.seed)
        job = await run_in_threadpool(served.job, turns, params)
        job.ignore_stop = req.ignore_eos
        job.params.max_new_tokens = max(1, min(params.max_new_tokens, served.max_seq_len - len(job.prompt)))
        events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job.emit = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
        try:
            batcher.submit(job)
        except QueueFull as e:
            return error(503, str(e), "server_busy", headers={"Retry-After": "1"})
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        reply = Reply(served, job, events, [s for s in stops if s])
        rid, model = f"chatcmpl-{uuid.uuid4().hex}", served.name
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            screen = None
            if config.guard is not None:
                view = guard_view(req.messages)
                screen = lambda text: run_in_threadpool(config.guard.check_response, view, text)
            events_out = sse(reply, rid, model, usage, screen, config.guard_every_chars)
            return StreamingResponse(events_out, media_type="text/event-stream")
        try:
            async for _ in reply.deltas():
                pass
        finally:
            job.cancelled.set()  # a client that went away frees its row at the next step
        if reply.failed:
            return error(500, reply.failed, "server_error")
        message: dict[str, Any] = {"role": "assistant", "content": reply.text}
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": reply.finish}
        if config.guard is not None:
            verdict = await run_in_threadpool(
                config.guard.check_response, guard_view(req.messages), reply.text
            )
            if not verdict.safe:  # OpenAI's shape for a refusal: no content, the refusal text beside it
                message.update(content=None, refusal=guard_refusal(verdict))
                choice.update(finish_reason="content_filter", guard=guard_report(verdict, "assistant"))
        body: dict[str, Any] = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                                "choices": [choice], "usage": reply.usage()}  # fmt: skip
        if req.return_token_ids:
            choice["token_ids"] = reply.tokens
            body["prompt_token_ids"] = job.prompt
        return JSONResponse(body)

    return app


class Reply:
    """Collects a job's events into text: incremental detokenisation and `stop` strings."""

    def __init__(self, served: ServedModel, job: Job, events: asyncio.Queue[Event], stops: list[str]) -> None:
        self.served, self.job, self.events, self.stops = served, job, events, stops
        self.tokens: list[int] = []
        self.text, self.sent, self.finish, self.failed = "", 0, "stop", ""
        self.hold = max((len(s) for s in stops), default=1) - 1  # chars that might start a stop string

    async def deltas(self) -> AsyncIterator[str]:
        """Text pieces as they become final; after the loop `finish` / `failed` are set."""
        while True:
            ev = await self.events.get()
            if ev.error is not None:
                self.failed = ev.error
                return
            if ev.finish is not None:
                self.finish = "length" if ev.finish == "length" else "stop"
                if self.sent < len(self.text):
                    yield self.text[self.sent :]
                    self.sent = len(self.text)
                return
            self.tokens.append(ev.token)  # type: ignore[arg-type]
            text = self.served.tokenizer.decode(self.tokens)
            if self.served.prompt_format == "plain":  # plain targets are " answer": the space is the prompt's
                text = text.lstrip()
            cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:  # a stop string: the reply ends before it, the row is freed at the next step
                self.text, self.finish = text[:cut], "stop"
                self.job.cancelled.set()
                if self.sent < len(self.text):
                    yield self.text[self.sent :]
                    self.sent = len(self.text)
                return
            self.text = text
            ready = len(text) - self.hold
            while ready > self.sent and text[ready - 1] == "\ufffd":  # half a UTF-8 character: wait
                ready -= 1
            if ready > self.sent:
                yield text[self.sent : ready]
                self.sent = ready

    def usage(self) -> dict[str, int]:
        n, m = len(self.job.prompt), len(self.tokens)
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


async def screened(
    reply: Reply, screen: Callable[[str], Awaitable[Any]], every_chars: int
) -> AsyncIterator[str | Any]:
    """`reply.deltas()` with nothing released before the guard has cleared it: text is held until
    `every_chars` are pending (and at the end), then the whole reply so far is screened; cleared text is
    yielded, and an unsafe verdict is yielded instead of the rest (the row is stopped). A client thus
    never sees a character the guard has not passed, at the cost of text arriving in chunks."""
    released, pending = "", ""
    async for piece in reply.deltas():
        pending += piece
        if len(pending) < every_chars:
            continue
        verdict = await screen(released + pending)
        if not verdict.safe:
            reply.job.cancelled.set()
            yield verdict
            return
        yield pending
        released, pending = released + pending, ""
    if pending and not reply.failed:
        verdict = await screen(released + pending)
        yield pending if verdict.safe else verdict


async def sse(
    reply: Reply, rid: str, model: str, include_usage: bool,
    screen: Callable[[str], Awaitable[Any]] | None = None, every_chars: int = 160,
) -> AsyncIterator[str]:  # fmt: skip
    """`data: {chat.completion.chunk}` lines, then `data: [DONE]`. With a guard's `screen`, text goes out
    only once screened (`screened`); an unsafe reply ends with a `refusal` delta and `content_filter`."""
    created = int(time.time())

    def chunk(
        delta: dict[str, Any], finish: str | None = None, usage: dict | None = None, **extra: Any
    ) -> str:
        body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **extra}]}  # fmt: skip
        if usage is not None:
            body["choices"], body["usage"] = [], usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        pieces = reply.deltas() if screen is None else screened(reply, screen, every_chars)
        async for piece in pieces:
            if not isinstance(piece, str):  # the guard's unsafe verdict
                yield chunk(
                    {"refusal": guard_refusal(piece)},
                    "content_filter",
                    guard=guard_report(piece, "assistant"),
                )
                yield "data: [DONE]\n\n"
                return
            yield chunk({"content": piece})
        if reply.failed:  # headers are gone already: the error travels as an event, as vLLM does
            yield f"data: {json.dumps({'error': {'message': reply.failed, 'type': 'server_error', 'code': 500}})}\n\n"
        else:
            yield chunk({}, reply.finish)
            if include_usage:
                yield chunk({}, usage=reply.usage())
        yield "data: [DONE]\n\n"
    finally:
        reply.job.cancelled.set()


__all__ = ["ChatRequest", "ServerConfig", "build_app"]
