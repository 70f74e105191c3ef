"""Plain helpers shared by the test modules, one per job: paths, ports and processes, polling,
the emulator as an engine process (its argv, its run-time control), gateway configs and the
gateways the `gateway_server` fixture starts, request bodies (`chat`), sending a request and
reading its answer or its SSE events (`send`, `post`), the error envelope, and a recorder of
the supervisor's state changes.

Fixtures live in tests/conftest.py; the real vLLM's process in tests/real_engine.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from engine.state import EngineState, StateChange
from engine.supervisor import EngineSupervisor
from gateway.config import Config, parse_config
from gateway.serve import Listening

CHAT_PATH = "/v1/chat/completions"
ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "tiny"
"""The tiny model (scripts/make_tiny_model.py): its tokenizer files count prompts."""

# Ports and processes.


def free_port() -> int:
    """A loopback port free at the time of asking."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    """Whether something accepts connections on the loopback `port`."""
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting to be reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except OSError:
        return False


def kill_leftovers(*pids: int | None) -> None:
    """SIGKILL each of `pids` (None skipped) still running: a test's clean-up, by pid."""
    for pid in pids:
        if pid is not None and pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# Polling.


async def until(condition: Callable[[], Any], timeout: float, interval: float = 0.02) -> bool:
    """Poll `condition()` until it is true or `timeout` passes; its last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() >= deadline:
            return bool(condition())
        await asyncio.sleep(interval)
    return True


def base_url(server: TestServer | Gateway) -> str:
    """The server's URL without a trailing slash, to put paths after."""
    return str(server.make_url("")).rstrip("/")


async def status_of(session: aiohttp.ClientSession, url: str) -> int | None:
    """The status of a GET, or None when nothing answered."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError):
        return None


async def wait_status(
    session: aiohttp.ClientSession, url: str, status: int, timeout: float
) -> bool:
    """Poll a GET until it answers `status`, for at most `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await status_of(session, url) == status:
            return True
        await asyncio.sleep(0.05)
    return False


# The emulator (engine/emulator) as the engine a gateway supervises.


def emulator_argv(port: int, *flags: str) -> list[str]:
    """`python -m engine.emulator` serving "tiny" (512 tokens of context) on `port`."""
    return [
        sys.executable,
        "-m",
        "engine.emulator",
        "--port",
        str(port),
        "--served-model-name",
        "tiny",
        "--max-model-len",
        "512",
        *flags,
    ]


async def control_emulator(session: aiohttp.ClientSession, port: int, **changes: Any) -> None:
    """Change an emulator run with `--control` at run time (engine/emulator/control.py)."""
    async with session.post(f"http://127.0.0.1:{port}/_emulator/control", json=changes) as resp:
        assert resp.status == 200, await resp.text()


async def emulator_info(
    session: aiohttp.ClientSession, port: int, timeout: float = 10.0
) -> dict[str, Any]:
    """Wait until an emulator run with `--control` answers; its pid and its child's."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            url = f"http://127.0.0.1:{port}/_emulator/info"
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                info: dict[str, Any] = await resp.json()
                return info
        except aiohttp.ClientError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)


def emulator_section(
    port: int, *flags: str, timings: Mapping[str, Any], supervised: bool = True, **overrides: Any
) -> dict[str, Any]:
    """A gateway config's `engine` section for the emulator on `port`: started by the gateway
    with `flags` when `supervised`, else someone else's to run (the sidecar shape)."""
    section: dict[str, Any] = {**timings, "url": f"http://127.0.0.1:{port}", **overrides}
    if supervised:
        section["command"] = emulator_argv(port, *flags)
    return section


# Gateways.


def gateway_config(engine_url: str, **sections: Any) -> Config:
    """A gateway config for tests: the given engine, quick probes, loopback only."""
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "admin": {"enabled": False},
        "engine": {
            "url": engine_url,
            "probe_interval_s": 0.5,
            "startup_probe_interval_s": 0.2,
            "probe_timeout_s": 30,
        },
        "logging": {"format": "json"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data)


async def run_fake_upstream(app: web.Application) -> TestServer:
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    return server


class Gateway:
    """A gateway the `gateway_server` fixture started: its app and where it listens."""

    def __init__(self, listening: Listening, config: Config) -> None:
        self.listening = listening
        self.app = listening.app
        self.url = f"http://{config.server.host}:{listening.port}"
        admin = listening.admin_port
        self.admin_url = None if admin is None else f"http://{config.admin.host}:{admin}"
        """The operator's listener, when the config enables it."""

    def make_url(self, path: str) -> URL:
        return URL(self.url + path)

    async def close(self) -> None:
        await self.listening.close()


StartGateway = Callable[..., Awaitable[Gateway]]
"""The `gateway_server` fixture: `await gateway_server(config, wait_ready=True, timeout=120)`."""


# A raw HTTP/1.1 engine whose every byte the test writes (for the engine wire's shapes).

RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawEngine:
    """An asyncio server on a free loopback port: each accepted connection goes to
    `handler(reader, writer)`, which reads requests (`read_request`) and writes answers as
    bytes. Counts the connections it accepted."""

    def __init__(self, handler: RawHandler) -> None:
        self._handler = handler
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> RawEngine:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            await self._handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


StartRawEngine = Callable[[RawHandler], Awaitable[RawEngine]]
"""The `raw_engine` fixture: start a RawEngine with its handler."""


async def read_request(reader: asyncio.StreamReader) -> tuple[list[str], bytes]:
    """One request off a raw connection: its head's lines (request line first) and its body
    (by Content-Length). Raises IncompleteReadError at EOF."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")[:-2]
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return lines, await reader.readexactly(length)


def chunked(*pieces: bytes) -> bytes:
    """`pieces` in HTTP/1.1 chunked framing, with the last (empty) chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


# Requests and answers.


def chat(
    content: str, *, max_tokens: int | None = 8, stream: bool = False, **fields: Any
) -> dict[str, Any]:
    """A greedy chat body for "tiny" with one user message, then `fields` (which may override
    the temperature); `max_tokens=None` leaves the field out, `stream` is sent only when
    true."""
    body: dict[str, Any] = {
        "model": "tiny",
        "temperature": 0,
        "messages": [{"role": "user", "content": content}],
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stream:
        body["stream"] = True
    return {**body, **fields}


async def send(
    session: aiohttp.ClientSession,
    url: str,
    body: object = None,
    timeout: float | None = 60.0,
    *,
    data: bytes | str | None = None,
    headers: Mapping[str, str] | None = None,
    content_type: str | None = "application/json",
) -> dict[str, Any]:
    """POST `body` as JSON (or `data` as it is, with `headers`) within `timeout` (None: no bound
    of its own): the answer's status, headers and content type, and its JSON body (expected as
    `content_type`; None: any; an empty body is None), or for a stream its events."""
    sent: dict[str, Any] = {"data": data} if data is not None else {"json": body}
    async with asyncio.timeout(timeout), session.post(url, headers=headers, **sent) as resp:
        out: dict[str, Any] = {
            "status": resp.status,
            "headers": resp.headers,
            "content_type": resp.content_type,
        }
        if resp.content_type != "text/event-stream":
            out["json"] = await resp.json(content_type=content_type)
            return out
        out["events"] = [event async for event in sse_events(resp)]
        return out


async def post(
    url: str, body: object = None, timeout: float | None = None, **options: Any
) -> dict[str, Any]:
    """`send` in a client session of its own (same options, same answer)."""
    async with aiohttp.ClientSession() as session:
        return await send(session, url, body, timeout, **options)


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[Any]:
    """The `data:` events of a stream, JSON-decoded ("[DONE]" as the string)."""
    async for line in resp.content:
        text = line.decode().strip()
        if text.startswith("data: "):
            data = text[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


def content_of(events: list[Any]) -> str:
    """The text the choices of a chat stream's events carry."""
    return "".join(
        choice["delta"].get("content") or ""
        for event in events
        if isinstance(event, dict)
        for choice in event.get("choices", [])
    )


def stream_summary(events: list[Any]) -> dict[str, Any]:
    """What a chat stream assembled: its text, its (last) error event, whether it ended with
    [DONE], the ids and the number of role chunks of its other events, and their last usage."""
    out: dict[str, Any] = {"error": None, "done": False, "ids": set(), "roles": 0}
    chunks = []
    for event in events:
        if event == "[DONE]":
            out["done"] = True
        elif "error" in event:
            out["error"] = event["error"]
        else:
            chunks.append(event)
            out["ids"].add(event["id"])
            out["roles"] += sum("role" in c.get("delta", {}) for c in event.get("choices", []))
            if event.get("usage"):
                out["usage"] = event["usage"]
    out["text"] = content_of(chunks)
    return out


def error_envelope(body: Any, status: int | None = None) -> dict[str, Any]:
    """The error of a body in vLLM's (OpenAI's) error envelope, checked; its code is `status`
    when one is given."""
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str)
    assert error["message"]
    if status is not None:
        assert error["code"] == status
    return error


# The supervisor.


class Recorder:
    """Every state change of a supervisor as it happens, with what the gateway would read at
    that moment (Retry-After, liveness)."""

    def __init__(self, supervisor: EngineSupervisor) -> None:
        self.supervisor = supervisor
        self.changes: list[StateChange] = []
        self.retry_after: list[float] = []
        self.live: list[bool] = []
        supervisor.subscribe(self)

    def __call__(self, change: StateChange) -> None:
        self.changes.append(change)
        self.retry_after.append(self.supervisor.retry_after_s())
        self.live.append(self.supervisor.live())

    def reasons(self, state: EngineState) -> list[str]:
        return [c.reason for c in self.changes if c.new is state]


# Config files as Kubernetes updates them.


def configmap_swap(folder: Path, text: str, version: str) -> Path:
    """Lay out (or update) `folder` as the kubelet does a ConfigMap volume: the data in a new
    timestamped folder, the `..data` symlink pointed at it by an atomic rename, config.yaml a
    symlink through `..data` (made once, never changed). The path of config.yaml."""
    data = folder / f"..{version}"
    data.mkdir(parents=True)
    (data / "config.yaml").write_text(text, encoding="utf-8")
    tmp = folder / "..data_tmp"
    tmp.symlink_to(data.name)
    os.replace(tmp, folder / "..data")
    link = folder / "config.yaml"
    if not link.is_symlink():
        link.symlink_to("..data/config.yaml")
    return link
