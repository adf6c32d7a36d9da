"""A lean fake OpenAI images upstream for the benchmark.

Raw ASGI, no form parsing: it reads and drops the body (counting bytes) and answers a small fixed
OpenAI-like JSON, so that the upstream is never what the benchmark measures.
`GET /_stats` reports how many requests and body bytes it has taken, for sanity checks.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# A 1x1 RGB PNG: the answer's size does not matter, only that it looks like OpenAI's.
_PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGNgYGAAAAAEAAH2FzhVAAAAAElFTkSuQmCC"
_ANSWER = json.dumps({
    "created": int(time.time()),
    "data": [{"b64_json": _PIXEL}],
    "background": "opaque", "output_format": "png", "size": "1024x1024", "quality": "low",
    "usage": {"input_tokens": 50, "output_tokens": 200, "total_tokens": 250,
              "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}},
}).encode()
_HEADERS = [(b"content-type", b"application/json"),
            (b"content-length", str(len(_ANSWER)).encode()),
            (b"openai-processing-ms", b"1")]

stats = {"requests": 0, "bytes": 0}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Drain the body, then answer the fixed JSON with a fresh x-request-id."""
    if scope["type"] != "http":
        return
    if scope["method"] == "GET" and scope["path"] == "/_stats":
        body = json.dumps(stats).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
        return
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        stats["bytes"] += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    stats["requests"] += 1
    rid = b"req_up_%d" % stats["requests"]
    await send({"type": "http.response.start", "status": 200,
                "headers": [*_HEADERS, (b"x-request-id", rid)]})
    await send({"type": "http.response.body", "body": _ANSWER})


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools",
                lifespan="off", log_level="warning", access_log=False, server_header=False,
                date_header=False)


if __name__ == "__main__":
    main()
