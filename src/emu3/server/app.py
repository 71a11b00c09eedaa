"""The app: the gate middleware in front of FastAPI's routes, the batcher they submit to, and `serve`, which runs
it all with uvicorn and drains on SIGTERM (what is unusual about it: the package's docstring, `emu3.server`)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import io
import json
import math
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from ..batching import Batcher, Closed, QueueFull, Ticket
from ..errors import InputError
from ..format import MAX_INTERLEAVED_IMAGES, Image, Text
from ..generate import Request, Sampling, image_template
from ..pipeline import Emu3
from .errors import APIError, error_response, param_of
from .metrics import Metrics
from .schemas import Body, ChatBody, ImagesBody, TokensBody, VideosBody
from .uploads import VIDEO_TYPES, data_url_bytes, encode_video, read_image_data_url, read_video_bytes

PAGE = Path(__file__).parent.parent / "web" / "index.html"


@dataclass
class ServeConfig:
    model_name: str = "emu3"
    api_key: str | None = None  # when set, every route but /health needs "Authorization: Bearer KEY"
    max_rows: int = 16  # KV-cache rows of the running batch (a CFG request takes 2)
    max_queue: int = 64  # waiting requests; more get 429
    max_len: int | None = None  # cache columns per row (default: the model's context)
    max_body_bytes: int = 16 * 2**20
    max_image_pixels: int = 4096 * 4096  # declared size of an uploaded image
    max_images: int = 8  # n per image request
    max_new_tokens: int = 4096
    timeout: float = 600.0  # default (and largest) per-request deadline, seconds
    drain_timeout: float = 120.0  # how long SIGTERM waits for running requests


# --------------------------------------------------------------------------------------------
# The app


class _State:
    def __init__(self, pipe: Emu3, config: ServeConfig):
        self.pipe, self.config = pipe, config
        self.draining = False
        self.metrics = Metrics(self)
        self.batcher = Batcher(pipe.engine, max_rows=config.max_rows, max_len=config.max_len,
                               max_queue=config.max_queue, on_end=self.metrics.ended, on_step=self.metrics.rows.observe,
                               decoding="plain" if pipe.defaults.decoding == "rows" else pipe.defaults.decoding,
                               window=pipe.defaults.jacobi_window)  # parallel rows: not in continuous batching
        self.started = time.time()


class _Gate:
    """Pure ASGI middleware in front of the app: draining (503), API key (401), body size (413)."""

    OPEN = {"/health"}
    ROUTES = {"/", "/health", "/v1/models", "/v1/images/generations", "/v1/videos/generations",
              "/v1/chat/completions", "/v1/tokens/generations", "/docs", "/openapi.json"}

    def __init__(self, app, state: _State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, cfg = scope["path"], self.state.config
        status, t0 = [500], time.monotonic()

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if path not in self.OPEN:
                if self.state.draining:
                    return await error_response(503, "the server is shutting down; retry on another instance",
                                        kind="server_shutting_down")(scope, receive, send_counted)
                if cfg.api_key is not None and not self._authorized(scope):
                    return await error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                        kind="authentication_error")(scope, receive, send_counted)
            headers = dict(scope["headers"])
            declared = headers.get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > cfg.max_body_bytes):
                return await error_response(413, f"the request body is larger than the limit of {cfg.max_body_bytes} "
                                         "bytes", kind="request_too_large")(scope, receive, send_counted)
            if scope["method"] in ("POST", "PUT", "PATCH"):  # buffer (and count) the body before the app sees it
                body, more = bytearray(), True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > cfg.max_body_bytes:
                        return await error_response(413, f"the request body is larger than the limit of "
                                                 f"{cfg.max_body_bytes} bytes",
                                            kind="request_too_large")(scope, receive, send_counted)
                sent = False

                async def replay():
                    nonlocal sent
                    if not sent:
                        sent = True
                        return {"type": "http.request", "body": bytes(body), "more_body": False}
                    return await receive()

                return await self.app(scope, replay, send_counted)
            return await self.app(scope, receive, send_counted)
        finally:
            if path != "/metrics":  # known routes only: a scan of random paths must not grow the label set
                self.state.metrics.http(path if path in self.ROUTES else "other", status[0], time.monotonic() - t0)

    def _authorized(self, scope) -> bool:
        key = self.state.config.api_key.encode()
        auth = dict(scope["headers"]).get(b"authorization", b"")
        if auth[:7].lower() == b"bearer " and hmac.compare_digest(auth[7:].strip(), key):
            return True
        if scope["path"] == "/":  # a browser opening the page: /?api_key=KEY
            from urllib.parse import parse_qs

            given = parse_qs(scope.get("query_string", b"").decode()).get("api_key", [""])[0].encode()
            return hmac.compare_digest(given, key)
        return False


def create_app(pipe: Emu3, config: ServeConfig | None = None, worker_thread: bool = True) -> _Gate:
    """The ASGI app for a loaded pipeline: the FastAPI routes behind the gate middleware (whose `state`
    holds the batcher). With worker_thread, the app's lifespan runs the batcher on a thread of its own;
    `serve` runs it on the main thread instead."""
    config = config or ServeConfig()
    state = _State(pipe, config)
    v = pipe.vocab
    ctx = pipe.model.config.max_position_embeddings
    factor = pipe.vision.model.config.spatial_factor if pipe.vision is not None else 8

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        if worker_thread:
            state.batcher.start()
        yield
        if worker_thread:
            state.batcher.stop(5)

    app = FastAPI(title="emu3", version="0.1.0", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.emu3 = state

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        err = max(errors, key=lambda e: len(e.get("loc", ())))  # the most specific (unions report every branch)
        if err.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})")
        loc = tuple(err.get("loc", ()))
        param = param_of(loc)
        if err.get("type") == "missing":
            return error_response(400, f"missing required parameter '{param}'", param)
        got = err.get("input")
        shown = json.dumps(got)[:80] if isinstance(got, (int, float, str, bool, type(None))) else type(got).__name__
        return error_response(400, f"invalid '{param}': {err['msg']} (got {shown})", param)

    @app.exception_handler(APIError)
    async def _apierror_response(request, exc: APIError):
        return exc.response()

    # ---- helpers ----

    def timeout_of(body: Body) -> float:
        return min(body.timeout or config.timeout, config.timeout)

    def seed_of(body) -> int:
        return body.seed if body.seed is not None else secrets.randbelow(2**31)

    def grid_of(body, param_size="size") -> tuple[int, int]:
        if body.size is not None and body.aspect_ratio is not None:
            raise APIError(400, "give size or aspect_ratio, not both", param_size)
        if body.size is not None:
            m = re.fullmatch(r"(\d+)x(\d+)", body.size)
            if not m or int(m.group(1)) % factor or int(m.group(2)) % factor or not int(m.group(1)) \
                    or not int(m.group(2)):
                raise APIError(400, f"size must be 'WxH' in pixels, both positive multiples of {factor}, "
                                    f"got {body.size!r}", "size")
            return int(m.group(2)) // factor, int(m.group(1)) // factor
        try:
            return pipe.grid(body.aspect_ratio)
        except InputError as e:
            raise APIError(400, str(e), "aspect_ratio") from None

    def submit_all(requests: list[Request], body: Body, param: str, on_token=None, on_done=None,
                   route: str = "") -> list[Ticket]:
        tickets = []
        try:
            for r in requests:
                tickets.append(state.batcher.submit(r, on_token, timeout_of(body), on_done, tag=route))
        except QueueFull as e:
            for t in tickets:
                state.batcher.cancel(t)
            raise APIError(429, str(e), kind="rate_limit_error", code="queue_full") from None
        except Closed as e:
            for t in tickets:
                state.batcher.cancel(t)
            raise APIError(503, str(e), kind="server_shutting_down") from None
        except InputError as e:
            for t in tickets:
                state.batcher.cancel(t)
            raise APIError(400, str(e), param) from None
        return tickets

    def endederror_response(t: Ticket) -> APIError | None:
        if t.status == "timeout":
            return APIError(504, f"the request passed its deadline of {timeout_of_ticket(t):.0f} s",
                            kind="timeout", code="deadline_exceeded")
        if t.status == "failed":
            return APIError(500, f"generation failed: {t.error}", kind="server_error")
        if t.status == "cancelled":
            return APIError(499, "the request was cancelled", kind="cancelled")
        return None

    def timeout_of_ticket(t: Ticket) -> float:
        return (t.deadline - t.submitted) if t.deadline is not None else config.timeout

    class Watch:
        """Ticket events delivered on the event loop (callbacks run on the batcher thread)."""

        def __init__(self, every_token: bool = False):
            self.loop = asyncio.get_running_loop()
            self.queue: asyncio.Queue = asyncio.Queue()
            self.every_token = every_token
            self.disconnected = False

        def on_token(self, t: Ticket, tok: int) -> None:
            if self.every_token or tok == v.eol:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, ("token", t, tok))

        def on_done(self, t: Ticket) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ("done", t, None))

        async def events(self, tickets: list[Ticket], request: HTTPRequest | None):
            """Yield events until every ticket ended; a disconnected client cancels them all."""
            open_ = len(tickets)
            checked = self.loop.time()
            try:
                while open_:
                    try:
                        ev = await asyncio.wait_for(self.queue.get(), 0.25)
                    except asyncio.TimeoutError:
                        ev = None
                    if request is not None and self.loop.time() - checked >= 0.25:  # even while events flow
                        checked = self.loop.time()
                        if await request.is_disconnected():
                            self.disconnected = True
                            break
                    if ev is None:
                        continue
                    if ev[0] == "done":
                        open_ -= 1
                    yield ev
            finally:
                cancel(tickets)

        async def wait(self, tickets: list[Ticket], request: HTTPRequest) -> None:
            """Until every ticket ended; 499 when the client went away first."""
            async for _ in self.events(tickets, request):
                pass
            if self.disconnected:
                raise APIError(499, "the client disconnected", kind="cancelled")

    def cancel(tickets: list[Ticket]) -> None:
        for t in tickets:
            if not t.done:
                state.batcher.cancel(t)

    def event_stream(tickets: list[Ticket], chunks) -> StreamingResponse:
        """SSE response of `chunks` (an async generator); tickets still running when it ends are cancelled."""
        async def body():
            try:
                async for c in chunks:
                    yield c
            finally:
                cancel(tickets)

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def on_worker(fn, *args):
        """PyTorch work (the vision tokenizer) runs on the batcher's thread, between steps."""
        return await asyncio.wrap_future(state.batcher.call(fn, *args))

    def sse(obj) -> bytes:
        return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()

    def png_b64(pixels: np.ndarray) -> str:
        buf = io.BytesIO()
        from PIL import Image

        Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    def preview(t: Ticket, w: int) -> str | None:
        """PNG of the complete rows of an image ticket so far."""
        codes = [x - v.visual_offset for x in t.tokens if x >= v.visual_offset]
        rows = len(codes) // w
        if not rows:
            return None
        return png_b64(pipe.vision.decode_image(np.asarray(codes[:rows * w]).reshape(rows, w)))

    # ---- routes ----

    @app.get("/health")
    async def health():
        b = state.batcher
        body = {"status": "draining" if state.draining else "ok", "queue": len(b.queue), "running": len(b.running)}
        return JSONResponse(body, 503 if state.draining else 200)

    @app.get("/v1/models")
    async def models():
        c = pipe.model.config
        card = {"id": config.model_name, "object": "model", "created": int(state.started), "owned_by": "emu3",
                "context_length": c.max_position_embeddings, "vocab_size": v.size, "text_size": v.text_size,
                "visual_offset": v.visual_offset, "codebook_size": v.codebook_size,
                "special_ids": {k: int(getattr(v, k)) for k in ("bos", "eos", "pad", "boi", "eoi", "img", "eol",
                                                                  "eof", "bov", "eov")
                                if hasattr(v, k)},
                "image_grid": list(pipe.grid()) if pipe.vision is not None else None,
                "spatial_factor": pipe.vision.model.config.spatial_factor if pipe.vision is not None else None}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics():
        data, content_type = state.metrics.exposition()
        return Response(data, media_type=content_type)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8").replace("{{MODEL}}", config.model_name))

    def check_media_request(prompt: str) -> None:
        """What every image and video route needs first: a vision tokenizer, and a prompt."""
        if pipe.vision is None:
            raise APIError(400, "this model has no vision tokenizer", "model")
        if not prompt.strip():
            raise APIError(400, "prompt must not be empty", "prompt")

    @app.post("/v1/images/generations")
    async def images(body: ImagesBody, request: HTTPRequest):
        check_media_request(body.prompt)
        if body.n > config.max_images:
            raise APIError(400, f"n must be at most {config.max_images}, got {body.n}", "n")
        h, w = grid_of(body)
        seed = seed_of(body)
        try:
            reqs = [pipe.image_request(body.prompt, seed + j, (h, w), cfg_scale=body.cfg_scale,
                                       temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                                       negative_prompt=body.negative_prompt) for j in range(body.n)]
        except InputError as e:
            raise APIError(400, str(e), "prompt") from None
        for r in reqs:
            need = max(len(r.prompt), len(r.negative)) + r.steps()
            if need > min(ctx, state.batcher.max_len):
                raise APIError(400, f"a {w * factor}x{h * factor} image needs {need} "
                                    f"tokens with its prompt, more than the model's context of "
                                    f"{min(ctx, state.batcher.max_len)}", "size")
        watch = Watch()
        tickets = submit_all(reqs, body, "prompt", watch.on_token, watch.on_done, route="/v1/images/generations")
        created = int(time.time())

        async def finish(t: Ticket, j: int) -> dict:
            err = endederror_response(t)
            if err is not None:
                raise err
            codes, pixels = await on_worker(pipe.image_result, reqs[j], t.result().tokens)
            return {"b64_json": await asyncio.to_thread(png_b64, pixels), "seed": seed + j,
                    "revised_prompt": body.prompt}

        if not body.stream:
            await watch.wait(tickets, request)
            data = [await finish(t, j) for j, t in enumerate(tickets)]
            return {"created": created, "data": data}

        async def stream():
            index = {id(t): j for j, t in enumerate(tickets)}
            rows = [0] * len(tickets)
            yield sse({"type": "started", "created": created, "rows_total": h * len(tickets), "seed": seed,
                       "size": f"{w * factor}x{h * factor}"})
            async for kind, t, _ in watch.events(tickets, request):
                j = index[id(t)]
                if kind == "token":
                    rows[j] += 1
                    ev = {"type": "progress", "index": j, "rows_done": sum(rows), "rows_total": h * len(tickets)}
                    if body.preview and watch.queue.qsize() < 2:  # skip previews when behind
                        ev["preview"] = await on_worker(preview, t, w)
                    yield sse(ev)
                else:
                    try:
                        yield sse({"type": "image", "index": j, **(await finish(t, j))})
                    except APIError as e:
                        yield sse({"type": "error", "index": j, "error": {"message": e.message, "type": e.kind,
                                                                         "code": e.code}})
            yield sse("[DONE]")

        return event_stream(tickets, stream())

    @app.post("/v1/videos/generations")
    async def videos(body: VideosBody, request: HTTPRequest):
        check_media_request(body.prompt)
        seed = seed_of(body)
        context, fps_in = None, None
        if body.video is not None:
            if body.size is not None or body.aspect_ratio is not None:
                raise APIError(400, "a continued video keeps its own size: leave out size and aspect_ratio", "size")
            data, suffix = data_url_bytes(body.video, "video", VIDEO_TYPES)
            clip = await on_worker(read_video_bytes, pipe, data, suffix, body.fps, config.max_image_pixels)
            context = await on_worker(lambda: pipe.vision.encode_video(clip.frames, "causal").numpy())
            fps_in = clip.fps
        h, w = grid_of(body) if context is None else context.shape[1:]
        known = 0 if context is None else len(context)
        try:
            req = pipe.video_request(body.prompt, known + body.frames, context=context, grid=(h, w),
                                     cfg_scale=body.cfg_scale, seed=seed, temperature=body.temperature,
                                     top_k=body.top_k, top_p=body.top_p, negative_prompt=body.negative_prompt,
                                     fps=body.fps or fps_in)
        except InputError as e:
            raise APIError(400, str(e), "frames") from None
        need = max(len(req.prompt), len(req.negative)) + req.steps()
        if need > min(ctx, state.batcher.max_len):
            raise APIError(400, f"{body.frames} latent frames of {h}x{w} codes need {need} tokens with the prompt, "
                                f"more than the model's context of {min(ctx, state.batcher.max_len)}", "frames")
        watch = Watch()
        (ticket,) = submit_all([req], body, "prompt", watch.on_token, watch.on_done, route="/v1/videos/generations")
        created = int(time.time())
        fps = body.fps or fps_in or pipe.defaults.video_fps or 8.0

        async def finish() -> dict:
            err = endederror_response(ticket)
            if err is not None:
                raise err
            codes, frames = await on_worker(pipe.video_result, req, ticket.result().tokens)
            data = await asyncio.to_thread(encode_video, frames, fps, body.format)
            return {"b64_json": base64.b64encode(data).decode(), "format": body.format, "seed": seed,
                    "frames": int(len(frames)), "fps": fps}

        if not body.stream:
            await watch.wait([ticket], request)
            return {"created": created, "data": [await finish()]}

        async def stream():
            done, total = 0, h * body.frames
            async for kind, _t, _ in watch.events([ticket], request):
                if kind == "token":
                    done += 1
                    yield sse({"type": "progress", "rows_done": done, "rows_total": total})
                else:
                    try:
                        yield sse({"type": "video", **(await finish())})
                    except APIError as e:
                        yield sse({"type": "error", "error": {"message": e.message, "type": e.kind}})
            yield sse("[DONE]")

        return event_stream([ticket], stream())

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: HTTPRequest):
        if pipe.vision is None:
            raise APIError(400, "this model has no vision tokenizer", "model")
        users = [i for i, m in enumerate(body.messages) if m.role == "user"]
        if not users:
            raise APIError(400, "messages must contain a user message", "messages")
        last = body.messages[users[-1]]
        parts = [last.content] if isinstance(last.content, str) else last.content
        question = " ".join(p if isinstance(p, str) else p.text for p in parts
                            if isinstance(p, str) or p.type == "text").strip()
        if not question:
            raise APIError(400, "the last user message has no text (the question)", f"messages[{users[-1]}].content")
        images = [(i, j, p) for i, m in enumerate(body.messages) if not isinstance(m.content, str)
                  for j, p in enumerate(m.content) if p.type == "image_url"]
        pictures = "image" in (body.modalities or [])
        if len(images) != 1 and not (pictures and not images):
            raise APIError(400, f"this model answers questions about exactly one image; the messages hold "
                                f"{len(images)} image_url parts", "messages")
        if body.max_images is not None and not pictures:
            raise APIError(400, 'max_images needs "image" in modalities', "max_images")
        max_images = body.max_images or MAX_INTERLEAVED_IMAGES
        max_new = body.max_completion_tokens or body.max_tokens
        if max_new is not None and max_new > config.max_new_tokens:
            raise APIError(400, f"max_tokens must be at most {config.max_new_tokens}, got {max_new}", "max_tokens")
        param = "messages"
        try:
            if images:
                i, j, part = images[0]
                param = f"messages[{i}].content[{j}].image_url.url"
                image = await asyncio.to_thread(read_image_data_url, part.image_url.url, param, config.max_image_pixels)
                req = await on_worker(pipe.chat_request, image, question, max_new or pipe.defaults.max_new_tokens,
                                      None, body.temperature, body.top_k, body.top_p, body.seed or 0)
                if pictures:  # the answer may open images of the model's size
                    h, w = pipe.grid()
                    req = dataclasses.replace(req, max_images=max_images, image_header=pipe.formatter().image_header(
                        h, w)[1:], image_grid=(h, w))
            else:
                req = await on_worker(pipe.interleaved_request, question, max_images, max_new, None, None,
                                      body.seed or 0, None, None, None, body.temperature)
                if max_new is None:  # the default length, within this server's limits
                    room = min(ctx, state.batcher.max_len) - len(req.prompt)
                    req = dataclasses.replace(req, max_new_tokens=max(1, min(req.max_new_tokens,
                                                                             config.max_new_tokens, room)))
        except InputError as e:
            raise APIError(400, str(e), param) from None
        limit = min(ctx, state.batcher.max_len)
        if len(req.prompt) >= limit:
            raise APIError(400, f"the prompt (image and question) takes {len(req.prompt)} tokens, more than the "
                                f"context of {limit}", f"messages[{users[-1]}].content")
        if len(req.prompt) + req.steps() > limit:
            room = limit - len(req.prompt)
            raise APIError(400, f"the prompt takes {len(req.prompt)} tokens: max_tokens can be at most {room} in "
                                f"a context of {min(ctx, state.batcher.max_len)}", "max_tokens")
        watch = Watch(every_token=body.stream)
        (ticket,) = submit_all([req], body, "messages", watch.on_token, watch.on_done, route="/v1/chat/completions")
        cid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        usage = lambda: {"prompt_tokens": int(len(req.prompt)), "completion_tokens": len(ticket.tokens),
                         "total_tokens": int(len(req.prompt)) + len(ticket.tokens)}
        finish_reason = lambda: "stop" if ticket.status == "finished" else "length"

        def parts(tokens) -> list:
            """An interleaved answer's text and complete images, in order."""
            out = []
            for s in pipe.formatter().parse(np.asarray(tokens, dtype=np.int64), strict=False):
                if isinstance(s, Image) and s.complete:
                    out.append(s.codes)
                elif isinstance(s, Text) and s.text.strip():
                    out.append(s.text.strip())
            return out

        async def image_part(codes) -> dict:
            pixels = await on_worker(pipe.vision.decode_image, codes)
            return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64(pixels)}}

        if not body.stream:
            await watch.wait([ticket], request)
            err = endederror_response(ticket)
            if err is not None:
                raise err
            if pictures:
                content = [{"type": "text", "text": p} if isinstance(p, str) else await image_part(p)
                           for p in parts(ticket.result().tokens)]
            else:
                content = pipe.answer(ticket.result().tokens)
            return {"id": cid, "object": "chat.completion", "created": created, "model": config.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": finish_reason(), "logprobs": None}],
                    "usage": usage()}

        def chunk(delta: dict, reason: str | None = None) -> bytes:
            return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": config.model_name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]})

        async def stream():
            sent, shown = "", 0  # text sent so far; images sent so far (interleaved)
            yield chunk({"role": "assistant", "content": ""})
            async for kind, t, _ in watch.events([ticket], request):
                if kind == "token" and pictures:  # text deltas, and each image once it is complete
                    segs = parts(t.tokens[:])
                    text = " ".join(p for p in segs if isinstance(p, str))
                    if text.startswith(sent) and len(text) > len(sent) and not text.endswith("\ufffd"):
                        yield chunk({"content": text[len(sent):]})
                        sent = text
                    done = [p for p in segs if not isinstance(p, str)]
                    for codes in done[shown:]:
                        yield chunk({"content": [await image_part(codes)]})
                    shown = len(done)
                elif kind == "token":
                    text = pipe.tokenizer.decode(np.asarray(t.tokens[:]), skip_special_tokens=True).lstrip()
                    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
                        continue
                    if text.startswith(sent) and len(text) > len(sent):
                        yield chunk({"content": text[len(sent):]})
                        sent = text
                else:
                    err = endederror_response(ticket)
                    if err is not None:
                        yield sse({"error": {"message": err.message, "type": err.kind, "code": err.code}})
                    else:
                        yield chunk({}, finish_reason())
                        if (body.stream_options or {}).get("include_usage"):
                            yield sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                       "model": config.model_name, "choices": [], "usage": usage()})
            yield sse("[DONE]")

        return event_stream([ticket], stream())

    @app.post("/v1/tokens/generations")
    async def tokens(body: TokensBody, request: HTTPRequest):
        for name in ("prompt", "negative_prompt", "stop", "allowed"):
            ids = getattr(body, name)
            if ids is not None:
                bad = [k for k, x in enumerate(ids) if not 0 <= x < v.size]
                if bad:
                    raise APIError(400, f"{name}[{bad[0]}] = {ids[bad[0]]} is not a token id in [0, {v.size})", name)
        if body.cfg_scale != 1 and body.negative_prompt is None:
            raise APIError(400, f"cfg_scale {body.cfg_scale} needs a negative_prompt", "negative_prompt")
        if body.image is not None:
            h, w = body.image
            if h < 1 or w < 1:
                raise APIError(400, f"image must be a positive grid [h, w], got {list(body.image)}", "image")
            template, steps = image_template(v, h, w), None
        else:
            template, steps = None, body.max_new_tokens
            if steps > config.max_new_tokens:
                raise APIError(400, f"max_new_tokens must be at most {config.max_new_tokens}", "max_new_tokens")
        try:
            req = Request(np.asarray(body.prompt, np.int64), template, max_new_tokens=steps or 1,
                          negative=None if body.negative_prompt is None else np.asarray(body.negative_prompt, np.int64),
                          cfg_scale=body.cfg_scale, visual=Sampling(body.temperature, body.top_k, body.top_p),
                          text=Sampling(body.text_temperature, body.top_k, body.top_p), seed=body.seed,
                          allowed=None if body.allowed is None else np.asarray(body.allowed, np.int64),
                          stop=None if body.stop is None else tuple(body.stop))
        except InputError as e:
            raise APIError(400, str(e)) from None
        longest = max(len(req.prompt), len(req.negative) if req.negative is not None else 0)
        if longest + req.steps() > min(ctx, state.batcher.max_len):
            raise APIError(400, f"prompt ({longest} tokens) + {req.steps()} generated tokens is more than the "
                                f"context of {min(ctx, state.batcher.max_len)}",
                           "image" if body.image is not None else "max_new_tokens")
        watch = Watch()
        (ticket,) = submit_all([req], body, "prompt", None, watch.on_done, route="/v1/tokens/generations")
        await watch.wait([ticket], request)
        err = endederror_response(ticket)
        if err is not None:
            raise err
        return {"ids": ticket.tokens, "finished": ticket.status == "finished",
                "usage": {"prompt_tokens": int(len(req.prompt)), "completion_tokens": len(ticket.tokens)}}

    return _Gate(app, state)


def serve(pipe: Emu3, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
          log_level: str = "info") -> None:
    """Serve until SIGTERM/SIGINT, then drain: 503 for new requests, running ones finish, exit.

    The batcher runs on the main thread, which loaded the model, and uvicorn's event loop on another:
    all PyTorch work then happens on one live thread (see emu3.batching: a second thread that has run
    PyTorch kernels slowed the first one's 1.8x here). Signals are handled here, not by uvicorn (which
    only installs handlers on the main thread)."""
    import signal

    import uvicorn

    config = config or ServeConfig()
    gate = create_app(pipe, config, worker_thread=False)
    state = gate.state
    server = uvicorn.Server(uvicorn.Config(gate, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=max(1, int(math.ceil(config.drain_timeout)))))
    failed: list[BaseException] = []

    def run_http():
        try:
            server.run()
            if not server.started:
                failed.append(InputError(f"could not serve on {host}:{port} (see the log above)"))
        except BaseException as e:  # uvicorn exits with SystemExit when it cannot bind
            failed.append(InputError(f"could not serve on {host}:{port} ({type(e).__name__}: {e})"))
        finally:
            state.batcher.stop()

    def drain():
        end = time.monotonic() + config.drain_timeout
        while not state.batcher.idle and time.monotonic() < end:
            time.sleep(0.05)
        time.sleep(0.2)  # the last responses leave the event loop
        server.should_exit = True

    def on_signal(sig, frame):
        if state.draining:  # a second signal: stop now
            server.force_exit = server.should_exit = True
            return
        state.draining = True
        state.batcher.close()
        threading.Thread(target=drain, daemon=True).start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    http = threading.Thread(target=run_http, name="emu3-http", daemon=True)
    try:
        http.start()
        state.batcher.run()  # until run_http stops it
        http.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        raise failed[0]
