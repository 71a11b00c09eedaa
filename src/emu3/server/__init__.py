"""HTTP serving: an OpenAI-style API over continuous batching, a web page, bounded behaviour under load.

`create_app(Emu3, ServeConfig)` builds the FastAPI app; `serve` runs it with uvicorn. What is unusual:
- one batcher thread owns the language model (`emu3.batching`); endpoints submit requests and await
  their tickets, so /health and /metrics never wait on the model. Vision-tokenizer work (encoding an
  uploaded image, decoding codes to pixels) also runs on the batcher's thread, between steps, off the
  event loop (one thread for all PyTorch work: see emu3.batching); `serve` makes it the main thread.
- every error is an OpenAI-style object {"error": {"message", "type", "param", "code"}}; FastAPI's 422
  validation errors become 400s that name the parameter. Bodies are capped before parsing (413);
  uploaded images are checked from their header (format, declared size) before any pixel is decoded.
- a client that disconnects cancels its requests (their rows are freed at the next step); every request
  has a deadline; a full queue answers 429 at once.
- SIGTERM or Ctrl-C drains: new requests get 503 (and /health 503, so a load balancer stops sending),
  running ones finish, then the process exits; a second signal exits at once.
- streamed responses are server-sent events: chat deltas as OpenAI's chat.completion.chunk, image and
  video progress as {"type": "progress", "rows_done", "rows_total"} events (with a PNG of the rows
  done so far when "preview" is set), then the result, then [DONE].
"""

try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as e:  # pragma: no cover - the error names the extra to install
    raise ImportError('emu3 serve needs FastAPI, uvicorn and prometheus_client: pip install "emu3[serve]"') from e

from .app import ServeConfig, create_app, serve  # noqa: E402
from .errors import APIError  # noqa: E402

__all__ = ["APIError", "ServeConfig", "create_app", "serve"]
