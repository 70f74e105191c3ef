"""Reference prompt token ids from vLLM's own code, for the parity tests (not a test module).

Runs in the engine's virtual environment, which has vLLM, transformers and torch:

    .venv-engine/bin/python tests/engine_reference.py < request.json > answer.json

It reads {"runs": [{"model_dir": str, "server": {"chat_template": str, "chat_template_kwargs":
{...}} (optional: the server's --chat-template text and --default-chat-template-kwargs),
"cases": [{"kind": "chat"|"completion", "body": {...}}]}], "templates": [str, ...]}
and answers {"runs": [{"results": [{"ids": [[int, ...], ...] | null, "prompt": str | null,
"error": str | null}]}], "formats": [str, ...]}: one list of ids per prompt (one for a chat), the
rendered chat prompt, or the error vLLM raised; and the content format vLLM detects for each of
"templates" (`_detect_content_format`).

Each request goes through the path the OpenAI server takes, without an engine: the request's
pydantic model (ChatCompletionRequest / CompletionRequest), `build_chat_params(...)
.with_defaults(...)` and `build_tok_params(...)` as in `OnlineRenderer.preprocess_chat`, then the
HfRenderer (`render_messages`, which applies the chat template through transformers'
`AutoTokenizer.apply_chat_template`) and `tokenize_prompt`. The context-length limit is lifted
(`max_total_tokens=None`) so that long prompts are counted rather than rejected, except for
`truncate_prompt_tokens: -1`, which is resolved against the model's length.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

_OUT = sys.stdout
sys.stdout = sys.stderr  # vLLM's loggers write to stdout: keep the answer clean
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _renderer(model_dir: str) -> tuple[Any, Any]:
    from vllm.config import ModelConfig, VllmConfig
    from vllm.renderers.registry import renderer_from_config

    model_config = ModelConfig(model=model_dir, tokenizer=model_dir)
    return model_config, renderer_from_config(VllmConfig(model_config=model_config))


def _tok_params(request: Any, model_config: Any) -> Any:
    params = request.build_tok_params(model_config)
    if request.truncate_prompt_tokens == -1:
        return params
    return dataclasses.replace(params, max_total_tokens=None)


def _chat(
    renderer: Any, model_config: Any, body: dict[str, Any], server: dict[str, Any]
) -> dict[str, Any]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.renderers.params import merge_kwargs

    request = ChatCompletionRequest.model_validate(body)
    tool_dicts = None if request.tools is None else [t.model_dump() for t in request.tools]
    defaults = merge_kwargs(
        server.get("chat_template_kwargs"), {"tools": tool_dicts, "tokenize": False}
    )
    chat_params = request.build_chat_params(server.get("chat_template"), "auto").with_defaults(
        defaults
    )
    tok_params = _tok_params(request, model_config)
    _, prompt = renderer.render_messages(request.messages, chat_params)
    text = prompt.get("prompt")
    tokens = renderer.tokenize_prompt(prompt, tok_params)
    return {"ids": [list(tokens["prompt_token_ids"])], "prompt": text, "error": None}


def _completion(
    renderer: Any, model_config: Any, body: dict[str, Any], server: dict[str, Any]
) -> dict[str, Any]:
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.renderers.inputs.preprocess import parse_model_prompt, prompt_to_seq

    request = CompletionRequest.model_validate(body)
    prompts = prompt_to_seq(request.prompt) if request.prompt is not None else []
    if not prompts:
        raise ValueError("You must pass at least one prompt")
    tok_params = _tok_params(request, model_config)
    ids = []
    for prompt in prompts:
        tokens = renderer.tokenize_prompt(parse_model_prompt(model_config, prompt), tok_params)
        ids.append(list(tokens["prompt_token_ids"]))
    return {"ids": ids, "prompt": None, "error": None}


def main() -> int:
    request = json.load(sys.stdin)
    answer = []
    for run in request["runs"]:
        model_config, renderer = _renderer(run["model_dir"])
        results = []
        for case in run["cases"]:
            handler = _chat if case["kind"] == "chat" else _completion
            try:
                results.append(
                    handler(renderer, model_config, case["body"], run.get("server") or {})
                )
            except Exception as exc:  # every rejection is an answer here
                results.append(
                    {"ids": None, "prompt": None, "error": f"{type(exc).__name__}: {exc}"}
                )
        answer.append({"results": results})
    from vllm.renderers.hf import _detect_content_format

    formats = [_detect_content_format(t, default="string") for t in request.get("templates", [])]
    json.dump({"runs": answer, "formats": formats}, _OUT)
    _OUT.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
