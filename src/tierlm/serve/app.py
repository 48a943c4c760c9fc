"""The FastAPI application: `create_app(llm, ...)`.

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream`), GET /v1/models,
GET /health, GET /metrics, POST /v1/plan, GET /v1/plan/{models,hardware,options}, and the planner
page at GET / (static files under /static). With `llm=None` (`tierlm serve --planner-only`) only
the planner, health and metrics routes serve; nothing imports torch then.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from ..errors import TierlmError
from . import errors
from .engine_loop import Busy, EngineLoop, Stopping, Ticket
from .errors import APIError
from .metrics import CONTENT_TYPE, Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, PlanRequest

log = logging.getLogger("tierlm.serve")

DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
DISCONNECT_POLL_S = 0.5
STATIC_DIR = Path(__file__).with_name("static")


class BodyLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes (declared or streamed)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks, size = [], 0
        while not too_big:
            msg = await receive()
            if msg["type"] != "http.request":
                chunks.append(msg)
                break
            size += len(msg.get("body", b""))
            if size > self.limit:
                too_big = True
                break
            chunks.append(msg)
            if not msg.get("more_body", False):
                break
        if too_big:
            resp = errors.response(413, f"request body is larger than the server's limit of {self.limit} bytes",
                                   None, "request_too_large")
            return await resp(scope, receive, send)
        body = b"".join(m.get("body", b"") for m in chunks if m["type"] == "http.request")
        replay = [{"type": "http.request", "body": body, "more_body": False}]
        replay += [m for m in chunks if m["type"] != "http.request"]

        async def replayed():
            return replay.pop(0) if replay else await receive()
        return await self.app(scope, replayed, send)


class SSEResponse(StreamingResponse):
    """A stream of server-sent events that runs `on_close` however it ends (done, client gone, cancelled)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _stream_safe(text: str, stops: list[str] | None, finished: bool) -> str:
    """The part of a running completion's text that can be sent: not a trailing partial UTF-8
    character, nor a tail that may be the start of a stop string (it would be cut later)."""
    if finished:
        return text
    text = text.rstrip("\ufffd")
    keep = len(text)
    for s in stops or ():
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = min(keep, len(text) - k)
                break
    return text[:keep]


def _usage(outs: list) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "prompt_cache_hit_tokens": cached, "prompt_cache_miss_tokens": prompt - cached}


def create_app(llm=None, *, model_name: str | None = None, api_key: str | None = None,
               max_queue: int = DEFAULT_MAX_QUEUE, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               max_tokens_limit: int | None = None, shutdown_grace_s: float = 30.0, close_llm: bool = True) -> FastAPI:
    """An OpenAI-compatible app over `llm` (a `tierlm.LLM`, owned by the app from now on: one
    background thread steps it), or the planner alone when `llm` is None.

    At most `max_num_seqs + max_queue` requests (prompts) are queued or running; more get 429.
    `max_tokens_limit` (default: the engine's max_model_len) caps `max_tokens`; bodies over
    `max_request_bytes` get 413. On shutdown the engine finishes running requests for up to
    `shutdown_grace_s` seconds, fails the rest, and `llm.close()` runs (when `close_llm`)."""
    for name, v in (("max_queue", max_queue), ("max_request_bytes", max_request_bytes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "max_queue" else 1):
            raise TierlmError(f"{name} must be a non-negative integer, got {v!r}")
    metrics = Metrics()
    engine = None
    chat_template = None
    if llm is not None:
        from .chat import ChatTemplate
        model_name = model_name or str(llm.path)
        chat_template = ChatTemplate.load(llm.path)
        max_tokens_limit = max_tokens_limit or llm.max_model_len
        engine = EngineLoop(llm, llm.scheduler.max_num_seqs + max_queue,
                            on_finish=lambda out, t: metrics.request_finished(
                                out, t.created, t.snapshot()[out.request_id].first_token_at))
    served = {model_name: Path(llm.path)} if llm is not None else {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if engine is not None:
            engine.start()
        try:
            yield
        finally:
            if engine is not None:
                await asyncio.to_thread(engine.stop, 0.0, 60.0)
                if close_llm:
                    await asyncio.to_thread(llm.close)

    app = FastAPI(title="tierlm serve", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine = engine
    app.state.llm = llm
    app.state.metrics = metrics
    app.state.model_name = model_name
    app.state.shutdown_grace_s = shutdown_grace_s
    errors.install(app)
    app.add_middleware(BodyLimit, limit=max_request_bytes)

    async def auth(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            metrics.rejected_request("auth")
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    secured = [Depends(auth)]

    # ------------------------------------------------------------------ info routes
    @app.get("/health")
    async def health():
        if engine is not None and engine.stopping:
            return JSONResponse({"status": "stopping", "model": model_name}, status_code=503)
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models", dependencies=secured)
    async def models():
        data = []
        if llm is not None:
            data.append({"id": model_name, "object": "model", "created": int(_STARTED), "owned_by": "tierlm",
                         "root": str(llm.path), "max_model_len": llm.max_model_len})
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def metrics_route():
        stats, pending, step_errors = None, None, 0
        if engine is not None:
            pending, step_errors = engine.pending, engine.step_errors
            stats = engine.stats
            if not engine.stopping:
                try:
                    stats = await asyncio.wait_for(asyncio.wrap_future(engine.call(lambda e: e.stats())), 5.0)
                except (asyncio.TimeoutError, Stopping):
                    pass
        return Response(metrics.render(stats, pending, step_errors), media_type=CONTENT_TYPE)

    @app.post("/v1/plan", dependencies=secured)
    async def plan_route(req: PlanRequest):
        from .plan_api import plan_json
        try:
            return await run_in_threadpool(plan_json, req, served)
        except TierlmError as e:
            raise APIError(400, str(e), None, "invalid_plan") from None

    @app.get("/v1/plan/models", dependencies=secured)
    async def plan_models():
        from .plan_api import models_json
        return models_json(served)

    @app.get("/v1/plan/hardware", dependencies=secured)
    async def plan_hardware():
        from .plan_api import hardware_json
        return hardware_json()

    @app.get("/v1/plan/options", dependencies=secured)
    async def plan_options():
        from .plan_api import options_json
        return options_json()

    # ------------------------------------------------------------------ the planner page
    @app.get("/", include_in_schema=False)
    async def planner_page():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # ------------------------------------------------------------------ generation
    def need_model(name: str) -> None:
        if llm is None:
            raise APIError(404, "this server runs the planner only (--planner-only): no model is loaded", "model",
                           "model_not_found")
        if name != model_name:
            raise APIError(404, f"model {name!r} is not served here; this server serves {model_name!r}", "model",
                           "model_not_found")

    def check_supported(req) -> None:
        bad = req.unsupported()
        if bad:
            raise APIError(400, bad[1], bad[0], "unsupported_parameter")

    def tokenize(text: str) -> list[int]:
        if llm.tokenizer is None:
            raise APIError(400, f"model {model_name!r} has no tokenizer.json: send prompts as token ids", "prompt",
                           "no_tokenizer")
        return llm.tokenizer.encode(text, add_special_tokens=False).ids

    def sampling(req, max_tokens: int):
        from ..runtime.sequence import SamplingParams
        if max_tokens > max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} is over this server's limit of {max_tokens_limit}",
                           "max_tokens", "max_tokens_too_large")
        try:
            return SamplingParams(temperature=1.0 if req.temperature is None else req.temperature,
                                  top_p=1.0 if req.top_p is None else req.top_p,
                                  top_k=0 if req.top_k is None else req.top_k,
                                  min_p=0.0 if req.min_p is None else req.min_p,
                                  max_tokens=max_tokens, stop=req.stop, stop_token_ids=req.stop_token_ids,
                                  seed=req.seed, ignore_eos=req.ignore_eos, n=req.n)
        except TierlmError as e:
            msg = str(e)
            param = msg.split(" ", 1)[0].removeprefix("SamplingParams.") if msg.startswith("SamplingParams.") else None
            raise APIError(400, msg.removeprefix("SamplingParams."), param, "invalid_value") from None

    @app.post("/v1/completions", dependencies=secured)
    async def completions(req: CompletionRequest, request: Request):
        need_model(req.model)
        check_supported(req)
        p = req.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)):
            p = [p]
        if not p:
            raise APIError(400, "prompt: empty list", "prompt", "invalid_value")
        prompts = [tokenize(x) if isinstance(x, str) else list(x) for x in p]
        params = sampling(req, req.max_tokens if req.max_tokens is not None else 16)
        return await run(request, req, prompts, params, chat=False)

    @app.post("/v1/chat/completions", dependencies=secured)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        need_model(req.model)
        check_supported(req)
        if chat_template is None:
            raise APIError(400, f"model {model_name!r} has no chat template (no chat_template in its "
                           "tokenizer_config.json, no chat_template.jinja): use /v1/completions", "messages",
                           "no_chat_template")
        if llm.tokenizer is None:
            raise APIError(400, f"model {model_name!r} has no tokenizer.json", "messages", "no_tokenizer")
        try:
            text = chat_template.render([m.for_template() for m in req.messages], req.add_generation_prompt,
                                        **(req.chat_template_kwargs or {}))
        except TierlmError as e:
            raise APIError(400, str(e), "messages", "chat_template_error") from None
        ids = tokenize(text)
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(max_tokens_limit, llm.max_model_len - len(ids)))
        return await run(request, req, [ids], sampling(req, max_tokens), chat=True)

    async def run(request: Request, req, prompts: list[list[int]], params, chat: bool):
        if len(prompts) > engine.capacity:
            raise APIError(400, f"{len(prompts)} prompts in one request; this server takes at most {engine.capacity}",
                           "prompt", "too_many_prompts")
        base = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        rids = [f"{base}-{i}" for i in range(len(prompts))]
        try:
            ticket = engine.submit(prompts, params, rids)
        except Busy as e:
            metrics.rejected_request("queue_full")
            raise APIError(429, str(e), None, "queue_full", {"Retry-After": "1"}) from None
        except Stopping as e:
            metrics.rejected_request("shutting_down")
            raise APIError(503, str(e), None, "shutting_down") from None
        ok = False
        try:
            while True:                                  # every prompt accepted, or the first refusal
                snap = await wait(ticket, request)
                if snap is None:
                    return Response(status_code=499)     # the client went away
                refused = [s.error for s in snap.values() if s.error]
                if refused:
                    status, msg = refused[0]
                    raise APIError(status, msg, "prompt" if status == 400 else None,
                                   "invalid_prompt" if status == 400 else "engine_error")
                if all(s.added for s in snap.values()):
                    break
            created = int(time.time())
            if req.stream:
                ok = True
                return SSEResponse(stream(ticket, req, params, base, created, chat, snap),
                                   on_close=lambda: engine.abort(ticket))
            while not all(s.done for s in snap.values()):
                snap = await wait(ticket, request)
                if snap is None:
                    return Response(status_code=499)
            failed = [s.error for s in snap.values() if s.error]
            if failed:
                raise APIError(failed[0][0], failed[0][1], None, "engine_error")
            ok = True
            return complete_body(snap, rids, req, base, created, chat)
        finally:
            if not ok:
                engine.abort(ticket)

    async def wait(ticket: Ticket, request: Request):
        """Next snapshot of the ticket; None when the client disconnected meanwhile (checked every
        DISCONNECT_POLL_S, whether or not the engine made progress)."""
        while True:
            try:
                snap = await asyncio.wait_for(ticket.changed(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                snap = None
            now = time.monotonic()
            if now - ticket.checked >= DISCONNECT_POLL_S:
                ticket.checked = now
                if await request.is_disconnected():
                    return None
            if snap is not None:
                return snap

    def choice_extra(req, out, c) -> dict:
        return {"token_ids": list(c.token_ids), "prompt_token_ids": list(out.prompt_token_ids)} \
            if req.return_token_ids else {}

    def complete_body(snap, rids, req, base, created, chat) -> dict:
        outs = [snap[r].output for r in rids]
        choices = []
        for p, out in enumerate(outs):
            for c in out.outputs:
                choice = {"index": p * req.n + c.index, "finish_reason": c.finish_reason, "logprobs": None}
                if chat:
                    choice["message"] = {"role": "assistant", "content": c.text}
                else:
                    choice["text"] = c.text
                choices.append({**choice, **choice_extra(req, out, c)})
        return {"id": base, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name, "choices": choices, "usage": _usage(outs)}

    async def stream(ticket: Ticket, req, params, base, created, chat, snap):
        obj = "chat.completion.chunk" if chat else "text_completion"
        n, rids = req.n, ticket.rids
        sent_text: dict[tuple[int, int], str] = {}
        sent_ids: dict[tuple[int, int], int] = {}
        done: set[tuple[int, int]] = set()
        total = len(rids) * n

        def chunk(choices, usage=None):
            out = {"id": base, "object": obj, "created": created, "model": model_name, "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return _sse(out)

        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(total)])
        try:
            while True:
                for p, rid in enumerate(rids):
                    slot = snap[rid]
                    if slot.error:
                        status, msg = slot.error
                        yield _sse(errors.body(status, msg, None, "engine_error"))
                        yield "data: [DONE]\n\n"
                        return
                    out = slot.output
                    if out is None:
                        continue
                    for c in out.outputs:
                        key = (p, c.index)
                        if key in done:
                            continue
                        if c.finish_reason == "error":
                            yield _sse(errors.body(500, c.error or "engine error", None, "engine_error"))
                            yield "data: [DONE]\n\n"
                            return
                        finished = c.finish_reason is not None
                        prev = sent_text.get(key, "")
                        text = _stream_safe(c.text, params.stop, finished)
                        if text.startswith(prev):
                            delta = text[len(prev):]
                        else:                   # the decoded text changed behind us; send nothing more of it
                            log.warning("streamed text of %s diverged from the final text", rid)
                            delta, text = "", prev
                        new_ids = c.token_ids[sent_ids.get(key, 0):]
                        if not (delta or finished or (req.return_token_ids and new_ids)):
                            continue
                        sent_text[key], sent_ids[key] = text, len(c.token_ids)
                        if finished:
                            done.add(key)
                        ch = {"index": p * n + c.index, "logprobs": None,
                              "finish_reason": c.finish_reason if finished else None}
                        if chat:
                            ch["delta"] = {"content": delta} if delta or not finished else {}
                        else:
                            ch["text"] = delta
                        if req.return_token_ids:
                            ch["token_ids"] = list(new_ids)
                        last = len(done) == total
                        yield chunk([ch], _usage([snap[r].output for r in rids]) if last else None)
                if len(done) == total:
                    break
                snap = await ticket.changed()
            if req.stream_options is not None and req.stream_options.include_usage:
                yield chunk([], _usage([snap[r].output for r in rids]))
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:                  # noqa: BLE001 - end the stream with an error event, not a reset
            log.exception("stream failed")
            yield _sse(errors.body(500, f"internal server error ({type(e).__name__}); see the server log", None,
                                   "internal_error"))
            yield "data: [DONE]\n\n"

    return app


_STARTED = time.time()


def _version() -> str:
    from .. import __version__
    return __version__
