"""Routes of the emulated vLLM OpenAI server, and `create_emulator_app`, where it is wired."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from engine.emulator.control import CONTROLS, Controls, add_control
from engine.emulator.core import Choice, EngineCore, marker_fault
from engine.emulator.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EngineDead,
    TokenizeRequest,
    bad_request,
    error_body,
    invalid_body,
    output_budget,
    parse_as,
    parse_json,
    resolve_model,
)
from engine.emulator.responses import (
    DONE,
    Header,
    full_response,
    role_chunk,
    sse,
    token_chunk,
    usage_chunk,
)
from engine.emulator.settings import EmulatorSettings
from engine.emulator.tokens import (
    Tokenizer,
    content_text,
    load_tokenizer,
    messages_text,
    prompt_seed,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CHOICE_STRIDE = 7
"""Choice j of a prompt starts its words 7*j after choice 0: the n choices differ."""


@dataclass(frozen=True)
class Emulator:
    settings: EmulatorSettings
    tokenizer: Tokenizer
    core: EngineCore
    registry: CollectorRegistry


EMULATOR: Final = web.AppKey("emulator", Emulator)
MAX_BODY_BYTES: Final = 256 << 20


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    from_text: bool
    texts: list[str]
    """What --die-on and --hang-on look into."""
    seed_ids: list[int] | None = None
    """What the answer's words derive from, when not `ids` (a continued message)."""
    offset: int = 0


def create_emulator_app(settings: EmulatorSettings) -> web.Application:
    """The emulated engine as an app. Serve it with handler_cancellation=True (the CLI and
    aiohttp's test server do) so that a client that goes away stops its generation."""
    registry = CollectorRegistry()
    emulator = Emulator(
        settings, load_tokenizer(settings.tokenizer), EngineCore(settings, registry), registry
    )
    # vLLM (uvicorn) takes bodies of any size; aiohttp would cap them at 1 MB.
    app = web.Application(middlewares=[_errors, _latency], client_max_size=MAX_BODY_BYTES)
    app[EMULATOR] = emulator
    app[CONTROLS] = Controls()
    if settings.control:
        add_control(app, emulator.core)
    if settings.log_requests:
        app.on_response_prepare.append(_access_log)
    app.router.add_get("/health", _health)
    app.router.add_get("/version", _version)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/tokenize", _tokenize)
    app.router.add_post("/detokenize", _detokenize)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    if settings.serve_completions:
        app.router.add_post("/v1/completions", _completions)
    return app


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body(), status=exc.status)
    except EngineDead:
        return web.Response(status=500)  # V1 answers a bare 500 once the engine is dead
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
        return web.json_response({"detail": exc.reason}, status=exc.status)  # FastAPI's shape


@web.middleware
async def _latency(request: web.Request, handler: Handler) -> web.StreamResponse:
    latency_ms = request.app[EMULATOR].settings.latency_ms
    if latency_ms > 0:
        await asyncio.sleep(latency_ms / 1000)
    return await handler(request)


async def _access_log(request: web.Request, response: web.StreamResponse) -> None:
    """uvicorn's access line as vLLM prints it, at the start of each response."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else f"{request.remote}:0"
    line = (
        f"{request.method} {request.path_qs} HTTP/{request.version.major}.{request.version.minor}"
    )
    print(
        f'(APIServer pid={os.getpid()}) INFO:     {client} - "{line}" '
        f"{response.status} {response.reason}",
        flush=True,
    )


async def _health(request: web.Request) -> web.Response:
    return web.Response(
        status=503 if request.app[EMULATOR].core.dead else request.app[CONTROLS].health
    )


async def _version(request: web.Request) -> web.Response:
    return web.json_response({"version": request.app[EMULATOR].settings.version})


async def _models(request: web.Request) -> web.Response:
    settings = request.app[EMULATOR].settings
    created = int(time.time())
    root = str(settings.tokenizer) if settings.tokenizer else settings.served_model_names[0]
    permission = {
        "id": f"modelperm-{uuid.uuid4().hex}",
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    data = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": root,
            "parent": None,
            "max_model_len": settings.max_model_len,
            "permission": [permission],
        }
        for name in settings.served_model_names
    ]
    data += [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": path,
            "parent": settings.served_model_names[0],
            "max_model_len": None,
            "permission": [permission],
        }
        for name, path in settings.lora_modules.items()
    ]
    return web.json_response({"object": "list", "data": data})


async def _metrics(request: web.Request) -> web.Response:
    if not request.app[CONTROLS].metrics:
        raise web.HTTPNotFound
    body = generate_latest(request.app[EMULATOR].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _encode(encode: Callable[[], list[int]]) -> list[int]:
    try:
        return encode()
    except Exception as exc:
        # A chat template or tokenizer that fails on a request is that request's 400 in vLLM.
        # (PromptTokenizer's InvalidChat names the parameter; its UnsupportedLocally, for what
        # it cannot render exactly, is a 400 here too: the emulator has no engine to ask.)
        param = getattr(exc, "param", None)
        raise bad_request(str(exc), param if isinstance(param, str) else None) from exc


def _encode_text(tokenizer: Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return _encode(lambda: tokenizer.encode_completion(text, add_special_tokens=add_special_tokens))


def _encode_chat(tokenizer: Tokenizer, req: ChatRequest | TokenizeRequest) -> list[int]:
    messages = req.messages or []
    return _encode(
        lambda: tokenizer.encode_chat(
            messages,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            tools=req.tools,
            chat_template=req.chat_template,
            chat_template_kwargs=req.chat_template_kwargs,
        )
    )


async def _tokenize(request: web.Request) -> web.Response:
    failing = request.app[CONTROLS].tokenize
    if failing != 200:
        return web.Response(status=failing)  # `--control`'s failure on demand, bare
    emulator = request.app[EMULATOR]
    req = parse_as(TokenizeRequest, parse_json(await request.read()))
    resolve_model(req.model, emulator.settings.model_names)
    await _hold_if_marked(emulator.settings, req)
    tokenizer = emulator.tokenizer
    if req.messages is not None:
        ids = _encode_chat(tokenizer, req)
    elif req.prompt is not None:
        ids = _encode_text(tokenizer, req.prompt, req.add_special_tokens is not False)
    else:
        raise invalid_body(
            [{"type": "missing", "loc": ("body", "prompt"), "msg": "Field required"}]
        )
    strs = [tokenizer.decode([i]) for i in ids] if req.return_token_strs else None
    return web.json_response(
        {
            "count": len(ids),
            "max_model_len": emulator.settings.max_model_len,
            "tokens": ids,
            "token_strs": strs,
        }
    )


async def _hold_if_marked(settings: EmulatorSettings, req: TokenizeRequest) -> None:
    """`hold_tokenize_on`: never answer a marked /tokenize (until the process dies)."""
    marker = settings.hold_tokenize_on
    if marker is None:
        return
    text = messages_text(req.messages) if req.messages is not None else [req.prompt or ""]
    if not any(marker in t for t in text):
        return
    once = settings.hold_tokenize_once
    if once is not None:
        try:
            once.touch(exist_ok=False)
        except FileExistsError:
            return  # held once already, by an earlier process
    print("emulator holding /tokenize until the process dies", flush=True)
    await asyncio.Event().wait()


async def _detokenize(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR]
    req = parse_as(DetokenizeRequest, parse_json(await request.read()))
    resolve_model(req.model, emulator.settings.model_names)
    try:
        text = emulator.tokenizer.decode(req.tokens)
    except Exception as exc:
        raise bad_request(str(exc)) from exc
    return web.json_response({"prompt": text})


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR]
    req = parse_as(ChatRequest, parse_json(await request.read()))
    model = resolve_model(req.model, emulator.settings.model_names)
    emulator.core.check_alive()
    prompt = Prompt(_encode_chat(emulator.tokenizer, req), True, messages_text(req.messages))
    last = req.messages[-1] if req.messages else None
    if req.continue_final_message and last is not None and last.get("role") == "assistant":
        # Greedy decoding continues the message it is given: derive the words from the
        # conversation before it and start after the words it already holds.
        before = req.model_copy(
            update={
                "messages": req.messages[:-1],
                "add_generation_prompt": True,
                "continue_final_message": False,
            }
        )
        prompt = replace(
            prompt,
            seed_ids=_encode_chat(emulator.tokenizer, before),
            offset=len(content_text(last.get("content")).split()),
        )
    header = Header.new("chat", model)
    return await _generate(request, header, req, [prompt], req.requested_max_tokens)


async def _completions(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR]
    req = parse_as(CompletionRequest, parse_json(await request.read()))
    model = resolve_model(req.model, emulator.settings.model_names)
    emulator.core.check_alive()
    prompts = _completion_prompts(emulator.tokenizer, req)
    header = Header.new("completion", model)
    return await _generate(request, header, req, prompts, req.max_tokens)


def _completion_prompts(tokenizer: Tokenizer, req: CompletionRequest) -> list[Prompt]:
    """A prompt is a string, token ids, or a list of either: one engine request each."""
    items: list[str | list[int]] = []
    ids: list[int] = []
    for item in [req.prompt] if isinstance(req.prompt, str) else req.prompt or []:
        if isinstance(item, int):
            ids.append(item)  # the prompt is one list of token ids
        else:
            items.append(item)
    if ids:
        items = [ids]
    prompts: list[Prompt] = []
    for item in items:
        if isinstance(item, str):
            ids = _encode_text(tokenizer, item, req.add_special_tokens)
            prompts.append(Prompt(ids, True, [item]))
        else:
            prompts.append(Prompt(list(item), False, []))
    if not prompts:
        raise bad_request("Either prompt or prompt_embeds must be provided and non-empty.")
    if any(not p.ids for p in prompts):
        raise bad_request("The decoder prompt cannot be empty")
    return prompts


async def _generate(
    request: web.Request,
    header: Header,
    req: ChatRequest | CompletionRequest,
    prompts: list[Prompt],
    max_tokens: int | None,
) -> web.StreamResponse:
    settings, core = request.app[EMULATOR].settings, request.app[EMULATOR].core
    budgets = [
        output_budget(
            prompt_tokens=len(p.ids),
            from_text=p.from_text,
            max_tokens=max_tokens,
            n=req.n,
            max_model_len=settings.max_model_len,
            multi_step_bug=settings.multi_step_bug,
        )
        for p in prompts
    ]
    # The request is valid: it reaches the engine, with whatever it does to it.
    texts = [t for p in prompts for t in p.texts]
    core.trigger(marker_fault(texts, die_on=settings.die_on, hang_on=settings.hang_on))
    choices: list[Choice] = []
    for i, (prompt, budget) in enumerate(zip(prompts, budgets, strict=True)):
        if budget is None:
            core.kill()
        seed_ids = prompt.ids if prompt.seed_ids is None else prompt.seed_ids
        start = req.seed if req.seed is not None else prompt_seed(seed_ids)
        choices += [
            Choice(i * req.n + j, start + CHOICE_STRIDE * j, budget, prompt.offset)
            for j in range(req.n)
        ]
    prompt_tokens = sum(len(p.ids) for p in prompts)
    if req.stream:
        return await _stream(request, core, header, choices, prompt_tokens, req.include_usage)
    outputs: list[list[str]] = [[] for _ in choices]
    async with aclosing(core.generate(choices, prompt_tokens)) as steps:
        async for step in steps:
            for token in step:
                outputs[token.index].append(token.text)
    texts = ["".join(parts) for parts in outputs]
    completion_tokens = sum(len(parts) for parts in outputs)
    return web.json_response(full_response(header, texts, prompt_tokens, completion_tokens))


async def _stream(
    request: web.Request,
    core: EngineCore,
    header: Header,
    choices: list[Choice],
    prompt_tokens: int,
    include_usage: bool,
) -> web.StreamResponse:
    """SSE as vLLM sends it: headers at once, a role chunk first per chat choice, one chunk
    per token, the usage chunk if asked for, then [DONE]. An engine that dies mid-stream
    shows as an error chunk. A client that goes away ends the generation."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    started: set[int] = set()
    completion_tokens = 0
    try:
        async with aclosing(core.generate(choices, prompt_tokens)) as steps:
            async for step in steps:
                out = bytearray()
                for token in step:
                    if header.kind == "chat" and token.index not in started:
                        started.add(token.index)
                        out += sse(role_chunk(header, token.index))
                    out += sse(token_chunk(header, token.index, token.text, token.last))
                completion_tokens += len(step)
                await response.write(bytes(out))
        if include_usage:
            await response.write(sse(usage_chunk(header, prompt_tokens, completion_tokens)))
    except EngineDead as exc:
        await response.write(sse(error_body(str(exc), "InternalServerError", None, 500)))
    except ConnectionResetError:
        return response  # the client went away; leaving the loop stopped its generation
    await response.write(DONE)
    return response
