"""A minimal fake OpenAI server: the fast upstream that every relay in bench/relay_matrix.py
talks to, so that what differs between rows is the relay alone.

    .venv/bin/python bench/fake_upstream.py PORT [--chunks 64] [--chunk-interval-ms 1]

Plain asyncio (a Protocol, no HTTP framework) so that it costs a small fraction of what the
relays cost and is never the bottleneck of a row. It speaks HTTP/1.1 with keep-alive, reads
request bodies by Content-Length or chunked transfer encoding (the gateway streams large bodies
to its engine), and answers:

- GET /health, GET /version, GET /metrics: 200;
- GET /v1/models: one model, `tiny`, with a max_model_len of 65,536;
- POST /v1/chat/completions and /v1/completions: a fixed answer of the right shape. When the
  body asks for `"stream": true`, an SSE stream of `--chunks` content events, one write every
  `--chunk-interval-ms` (so that each one reaches the relay as its own read, as an engine's
  tokens do), a usage event and `data: [DONE]`.

It does not parse the JSON of a body (a byte search for the stream flag): parsing 30,000-token
bodies would make the upstream the slowest part of the bench.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import time

MODEL = "tiny"
MAX_MODEL_LEN = 65_536
STREAM_FLAG = re.compile(rb'"stream"\s*:\s*true')


def _head(status: int, content_type: str, length: int | None) -> bytes:
    reason = {200: "OK", 404: "Not Found", 400: "Bad Request"}.get(status, "OK")
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n"
    ).encode()


def _json_answer(status: int, payload: object) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return _head(status, "application/json", len(body)) + body


class Answers:
    """The fixed answers, rendered once."""

    def __init__(self, chunks: int) -> None:
        now = int(time.time())
        usage = {"prompt_tokens": 100, "completion_tokens": chunks, "total_tokens": 100 + chunks}
        self.models = _json_answer(
            200,
            {
                "object": "list",
                "data": [
                    {
                        "id": MODEL,
                        "object": "model",
                        "created": now,
                        "owned_by": "vllm",
                        "root": MODEL,
                        "max_model_len": MAX_MODEL_LEN,
                    }
                ],
            },
        )
        self.health = _head(200, "application/json", 0)
        self.version = _json_answer(200, {"version": "0.32.0"})
        self.not_found = _json_answer(
            404, {"error": {"message": "not found", "type": "NotFoundError", "code": 404}}
        )
        text = " word" * chunks
        self.chat = _json_answer(
            200,
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "created": now,
                "model": MODEL,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "length",
                    }
                ],
                "usage": usage,
            },
        )
        self.completion = _json_answer(
            200,
            {
                "id": "cmpl-bench",
                "object": "text_completion",
                "created": now,
                "model": MODEL,
                "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
                "usage": usage,
            },
        )
        self.stream_head = _head(200, "text/event-stream", None)
        self.chat_events = self._events("chat", now, chunks, usage)
        self.completion_events = self._events("completion", now, chunks, usage)

    @staticmethod
    def _events(kind: str, now: int, chunks: int, usage: dict[str, int]) -> list[bytes]:
        def chunk(payload: dict[str, object]) -> bytes:
            data = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
            return f"{len(data):x}\r\n".encode() + data + b"\r\n"

        if kind == "chat":
            base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": now}
            first = {
                **base,
                "model": MODEL,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
            }
            body = {
                **base,
                "model": MODEL,
                "choices": [{"index": 0, "delta": {"content": " word"}, "finish_reason": None}],
            }
            events = [chunk(first)] + [chunk(body)] * chunks
        else:
            base = {"id": "cmpl-bench", "object": "text_completion", "created": now}
            body = {
                **base,
                "model": MODEL,
                "choices": [{"index": 0, "text": " word", "finish_reason": None}],
            }
            events = [chunk(body)] * chunks
        events.append(chunk({**base, "model": MODEL, "choices": [], "usage": usage}))
        done = b"data: [DONE]\n\n"
        events.append(f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n")
        return events


class Connection(asyncio.Protocol):
    """One keep-alive connection: parse requests as bytes arrive, answer each in turn."""

    def __init__(self, answers: Answers, interval: float) -> None:
        self.answers = answers
        self.interval = interval
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.streaming:
            self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def _process(self) -> None:
        while self.transport is not None and not self.streaming:
            parsed = self._parse()
            if parsed is None:
                return
            method, path, body = parsed
            self._answer(method, path, body)

    def _parse(self) -> tuple[str, str, bytes] | None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        method, path, _ = head[0].split(" ", 2)
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        start = end + 4
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            pos = start
            while True:
                line_end = self.buffer.find(b"\r\n", pos)
                if line_end < 0:
                    return None
                size = int(bytes(self.buffer[pos:line_end]).split(b";")[0], 16)
                if len(self.buffer) < line_end + 2 + size + 2:
                    return None
                body += self.buffer[line_end + 2 : line_end + 2 + size]
                pos = line_end + 2 + size + 2
                if size == 0:
                    break
            del self.buffer[:pos]
            return method, path, bytes(body)
        length = int(headers.get("content-length", "0"))
        if len(self.buffer) < start + length:
            return None
        body_bytes = bytes(self.buffer[start : start + length])
        del self.buffer[: start + length]
        return method, path, body_bytes

    def _answer(self, method: str, path: str, body: bytes) -> None:
        assert self.transport is not None
        a = self.answers
        if method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            chat = path == "/v1/chat/completions"
            if STREAM_FLAG.search(body):
                self.streaming = True
                events = a.chat_events if chat else a.completion_events
                self.transport.write(a.stream_head)
                asyncio.get_running_loop().call_soon(self._stream, events, 0)
                return
            self.transport.write(a.chat if chat else a.completion)
        elif path in ("/health", "/metrics"):
            self.transport.write(a.health)
        elif path == "/v1/models":
            self.transport.write(a.models)
        elif path == "/version":
            self.transport.write(a.version)
        else:
            self.transport.write(a.not_found)

    def _stream(self, events: list[bytes], index: int) -> None:
        if self.transport is None:
            return
        self.transport.write(events[index])
        if index + 1 < len(events):
            asyncio.get_running_loop().call_later(self.interval, self._stream, events, index + 1)
            return
        self.streaming = False
        self._process()


async def serve(port: int, chunks: int, interval_ms: float) -> None:
    answers = Answers(chunks)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Connection(answers, interval_ms / 1000), "127.0.0.1", port, backlog=1024
    )
    print(f"fake upstream listening on http://127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--chunks", type=int, default=64, help="content events per stream")
    parser.add_argument("--chunk-interval-ms", type=float, default=1.0)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.chunks, args.chunk_interval_ms))


if __name__ == "__main__":
    main()
