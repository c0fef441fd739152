"""The same-run HTTP baseline: a minimal ASGI "hello" app on uvicorn with its standard extras.

``python -m bench.hello PORT`` serves ``GET /anything`` -> ``200 hello`` on 127.0.0.1:PORT
with uvicorn's fastest stack (``httptools`` parser, ``uvloop`` event loop: what
``uvicorn[standard]`` installs), prints ``{"ready": true, "http": ..., "loop": ...}`` once it
listens, and serves until stdin closes or it is signalled.

Every API figure of ``python -m bench`` is printed beside this one, measured by the same load
generator right before it in the same run (:func:`bench.reads.measure_hello`): what the
machine, the load generator and an ASGI server can do at best, so that a ratio says how much
of it iotvault keeps, whatever else is running on the machine.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import threading
from typing import Any

import uvicorn

BODY = b"hello"
HEADERS = [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def stack() -> tuple[str, str]:
    """``(http, loop)``: httptools and uvloop when installed, else uvicorn's pure-Python ones."""
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return http, loop


def main() -> None:
    port = int(sys.argv[1])
    http, loop = stack()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=http,  # type: ignore[arg-type]
        loop=loop,  # type: ignore[arg-type]
        log_level="warning",
        access_log=False,
        server_header=False,
        lifespan="off",
    )
    server = uvicorn.Server(config)

    def watch_stdin() -> None:
        sys.stdin.read()  # EOF: the harness is gone or done
        server.should_exit = True

    async def serve() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():  # noqa: ASYNC110 - uvicorn has no event
            await asyncio.sleep(0.01)
        print(json.dumps({"ready": True, "http": http, "loop": loop}), flush=True)
        await task

    threading.Thread(target=watch_stdin, daemon=True).start()
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(serve())


if __name__ == "__main__":
    main()
