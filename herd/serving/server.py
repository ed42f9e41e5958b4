"""`herd serve`: load a checkpoint, start the batcher, run the API on uvicorn.

    serve("runs/quickstart/vision_model", port=8000)                 # blocks, like the command
    with running(ServedModel.load(dir), ServeOptions(port=0)) as url:  # a server in a thread (tests,
        ...                                                            # benchmarks), on loopback

It binds 127.0.0.1 unless told otherwise. `--guard DIR` loads `herd.guard.Guard` (Llama Guard 3:
`check_user(messages)`, `check_response(messages, reply)`, each a verdict with `safe` and
`categories`); it is imported only when asked for. `GET /` serves the
page (herd/serving/static/index.html, `herd.serving.page`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from herd.serving.engine import ServedModel

log = logging.getLogger("herd.serve")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (`running` reports it)
    max_upload_mb: float = 20.0
    api_key: str | None = None
    guard: str | None = None  # a Llama Guard checkpoint directory for herd.guard
    max_batch: int = 8  # rows that share a decode step
    max_queue: int = 64  # waiting requests before 503
    max_tokens: int = 512  # cap on any request's max_tokens
    guard_every_chars: int = 160  # a streamed reply is screened by the guard per this many new characters
    guard_categories: str | None = None  # the categories the guard enforces, e.g. "S1,S14" (default: all)
    prompt_format: str = "auto"  # chat | plain | auto (chat for text checkpoints, plain for adapters)


def load_guard(path: str, categories: str | None = None) -> Any:
    """`herd.guard.Guard.load(path, categories)`."""
    from herd.guard import Guard

    return Guard.load(path, categories)


def make_app(served: ServedModel, options: ServeOptions, guard: Any = None) -> tuple[Any, Any]:
    """(FastAPI app, started Batcher). `guard`: an already loaded guard (else `options.guard` is loaded)."""
    from herd.serving.api import ServerConfig, build_app
    from herd.serving.batcher import Batcher

    if guard is None and options.guard:
        guard = load_guard(options.guard, options.guard_categories)
    batcher = Batcher(
        served.llm,
        served.stop_ids,
        options.max_batch,
        options.max_queue,
        served.max_seq_len,
        served.vocab_limit,
    ).start()
    config = ServerConfig(
        int(options.max_upload_mb * (1 << 20)),
        options.max_tokens,
        options.api_key,
        guard,
        options.guard_every_chars,
    )
    return build_app(served, batcher, config), batcher


def _uvicorn(app: Any, options: ServeOptions) -> Any:
    import uvicorn

    # h11's limit on the request line + headers: a larger head is refused with 4xx before the app sees it
    config = uvicorn.Config(app, log_level="warning", access_log=False, h11_max_incomplete_event_size=64 << 10,
                            timeout_keep_alive=5)  # fmt: skip
    return uvicorn.Server(config)


def serve(model: str, options: ServeOptions, device: str = "cpu", fp8: bool = False) -> int:
    """Load `model` and serve it until interrupted; `fp8`: row-wise FP8 FFN layers (`herd.quantize`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    served = ServedModel.load(model, device, prompt_format=options.prompt_format)
    if fp8:
        from herd.quantize import apply_fp8

        apply_fp8(served.llm)  # the base Llama every decode step runs on
    app, batcher = make_app(served, options)
    log.info("serving %s (%s) on http://%s:%d", served.name, served.kind, options.host, options.port)
    sock = socket.socket(socket.AF_INET6 if ":" in options.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((options.host, options.port))
    try:
        _uvicorn(app, options).run(sockets=[sock])
    finally:
        batcher.close()
    return 0


@contextlib.contextmanager
def running(served: ServedModel, options: ServeOptions, guard: Any = None) -> Iterator[str]:
    """A server in a background thread on `options.host`; yields its base URL (http://host:port)."""
    app, batcher = make_app(served, options, guard)
    sock = socket.socket(socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((options.host, options.port))
    port = sock.getsockname()[1]
    server = _uvicorn(app, options)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{options.host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        batcher.close()
        sock.close()


__all__ = ["ServeOptions", "load_guard", "make_app", "running", "serve"]
