"""Requests whose prompt token counts the gateway must get exactly as vLLM does.

`from tests.token_corpus import cases`: a list of {"id": str, "kind": "chat" | "completion",
"body": {...}}. Each body is a request body for `/v1/chat/completions` or `/v1/completions`
without "model" (add the served name). Ids say what to expect:

- "bad-...": vLLM answers 400; "unsupported-...": only the engine can count it (an image part);
- "long-...": the prompt is longer than the tiny model's 512-token window: count it with
  /tokenize (a generation request is rejected);
- bodies with "chat_template" need the engine started with `--trust-request-chat-template`.

/tokenize has no `documents`, `reasoning_effort` or `truncate_prompt_tokens`: to count such a
body there, move the first two into `chat_template_kwargs` (as `gateway.tokens` does, see
`_Chat.tokenize_payload`) and apply the truncation yourself (min(count, k)); or compare with
`usage.prompt_tokens` of a generation.

tests/engine/test_tokenization.py checks every case against vLLM's renderer, offline.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from engine.tokenization import PromptTokenizer, completion_prompts

TEMPLATES_DIR = Path(__file__).parent / "data" / "templates"
"""Templates written for these tests."""
VLLM_TEMPLATES_GLOB = (
    ".venv-engine/lib/python3*/site-packages/vllm/transformers_utils/chat_templates"
)
"""The example templates that ship inside the vLLM package (read from the engine's venv, not
copied into this repository); `vllm_<name>` names `template_<name>.jinja` there."""

Case = dict[str, Any]


def vllm_templates_dir() -> Path:
    found = sorted(Path(__file__).resolve().parent.parent.glob(VLLM_TEMPLATES_GLOB))
    if not found:
        raise RuntimeError("the engine's venv is missing: run `make engine` (make test does)")
    return found[-1]


def template_paths() -> list[Path]:
    """Every template the tests render: ours and vLLM's."""
    return sorted(TEMPLATES_DIR.glob("*.jinja")) + sorted(vllm_templates_dir().glob("*.jinja"))


@cache
def template(name: str) -> str:
    if name.startswith("vllm_"):
        path = vllm_templates_dir() / f"template_{name.removeprefix('vllm_')}.jinja"
    else:
        path = TEMPLATES_DIR / f"{name}.jinja"
    return path.read_text(encoding="utf-8")


def _long_text(words: int) -> str:
    vocab = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "épsilon",
        "zeta",
        "η",
        "θήτα",
        "iota",
        "🙂",
        "def",
        "return",
        "self",
        "None",
        "  ",
        "\n",
        "12345",
        "x_y",
        "Ünïcödé",
        "end.",
    ]
    return " ".join(vocab[(i * 7 + i // 3) % len(vocab)] for i in range(words))


LONG = _long_text(1600)  # several thousand tokens with the tiny tokenizer
MEDIUM = _long_text(120)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo actuelle d'une ville ☀",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "Nom de la ville"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "function": {
            "name": "noop",
            "parameters": {"type": "object", "properties": {}},
            "strict": True,
            "extra_field": "dropped by vLLM",
        }
    },
]
TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Köln", "unit": "celsius"}'},
}
TOOL_HISTORY = [
    {"role": "user", "content": "Wie ist das Wetter in Köln?"},
    {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21, "sky": "klar"}'},
]


def _chat(case_id: str, messages: list[Any], **fields: Any) -> Case:
    return {"id": case_id, "kind": "chat", "body": {"messages": messages, **fields}}


def _completion(case_id: str, prompt: Any, **fields: Any) -> Case:
    return {"id": case_id, "kind": "completion", "body": {"prompt": prompt, **fields}}


def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def _model_template_cases() -> list[Case]:
    """The tiny model's own template (ChatML-like, list content, tools, tool calls)."""
    sys_user = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello!"},
    ]
    return [
        _chat("default-user", _user("Hello, world")),
        _chat("default-system-user", sys_user),
        _chat(
            "default-multi-turn",
            [
                *sys_user,
                {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": "And again?"},
            ],
        ),
        _chat("default-no-generation-prompt", sys_user, add_generation_prompt=False),
        _chat(
            "default-continue-final",
            [*sys_user, {"role": "assistant", "content": "Sure, here is "}],
            add_generation_prompt=False,
            continue_final_message=True,
        ),
        _chat(
            "default-continue-final-parts",
            [
                *sys_user,
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "First part. "},
                        {"type": "text", "text": "Second  "},
                    ],
                },
            ],
            add_generation_prompt=False,
            continue_final_message=True,
        ),
        _chat(
            "default-list-parts",
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Part one."},
                        {"type": "text", "text": "Part two."},
                        "a bare string part",
                    ],
                }
            ],
        ),
        _chat(
            "default-unicode-emoji",
            _user("Grüße 👋🏽 — 你好, мир! naïve café ﬁ ½ \U0001d518\U0001d52b"),
        ),
        _chat("default-whitespace", _user("  leading\t\ttabs\n\n\nand    runs   \u00a0nbsp  ")),
        _chat("default-empty-content", _user("")),
        _chat("default-special-token-text", _user("fake <|im_end|>\n<|im_start|>system\nhi")),
        _chat("default-add-special-tokens", sys_user, add_special_tokens=True),
        _chat("default-tools", sys_user, tools=TOOLS),
        _chat("default-tool-history", TOOL_HISTORY, tools=TOOLS),
        _chat(
            "default-tool-bad-arguments",
            [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{oops"},
                        },
                        {
                            "id": "d",
                            "type": "function",
                            "function": {"name": "g", "arguments": "[1]"},
                        },
                        {"id": "e", "type": "function", "function": {"name": "h", "arguments": ""}},
                    ],
                },
            ],
        ),
        _chat(
            "default-empty-tool-calls",
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "y", "tool_calls": []},
            ],
        ),
        _chat(
            "default-tool-list-content",
            [
                *TOOL_HISTORY[:2],
                {
                    "role": "tool",
                    "tool_call_id": "call_1",
                    "content": [
                        {"type": "text", "text": "line 1"},
                        {"type": "text", "text": "line 2"},
                    ],
                },
            ],
        ),
        _chat(
            "default-developer-first",
            [{"role": "developer", "content": "Rules."}, {"role": "user", "content": "Go"}],
        ),
        _chat(
            "default-developer-merged",
            [
                {"role": "system", "content": "Sys."},
                {"role": "user", "content": "Go"},
                {"role": "developer", "content": [{"type": "text", "text": "Dev rule"}]},
            ],
        ),
        _chat(
            "default-text-like-parts",
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "input text"},
                        {"type": "refusal", "refusal": "I refuse"},
                        {"type": "thinking", "thinking": "hmm", "closed": True},
                    ],
                }
            ],
        ),
        _chat(
            "default-name-and-extras",
            [{"role": "user", "content": "hey", "name": "bob", "unknown": 1}],
        ),
        _chat(
            "default-reasoning",
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a", "reasoning": "r"},
                {"role": "user", "content": "q2"},
            ],
        ),
        _chat(
            "default-billing-header",
            [
                {"role": "system", "content": "x-anthropic-billing-header: cch=123\nReal system."},
                {"role": "user", "content": "u"},
            ],
        ),
        _chat(
            "default-billing-header-parts",
            [
                {
                    "role": "system",
                    "content": [
                        {"type": "text", "text": "x-anthropic-billing-header: a\nkept"},
                        {
                            "type": "input_text",
                            "text": "x-anthropic-billing-header: b\nnot stripped",
                        },
                        "x-anthropic-billing-header: c",
                    ],
                },
                {"role": "user", "content": "u"},
            ],
        ),
        _chat(
            "default-kwargs-documents-effort",
            _user("u"),
            chat_template_kwargs={"unused": True},
            documents=[{"title": "t", "text": "x"}],
            reasoning_effort="low",
        ),
        _chat("default-truncate", _user(MEDIUM), truncate_prompt_tokens=7),
        _chat(
            "default-truncate-left", _user(MEDIUM), truncate_prompt_tokens=9, truncation_side="left"
        ),
        _chat("default-truncate-minus-one", _user(MEDIUM), truncate_prompt_tokens=-1),
        _chat("default-medium", _user(MEDIUM)),
        _chat("long-default", _user(LONG)),
        _chat("long-truncate-minus-one", _user(LONG), truncate_prompt_tokens=-1),
        _chat(
            "long-truncate-minus-one-max-tokens",
            _user(LONG),
            truncate_prompt_tokens=-1,
            max_tokens=10,
        ),
        _chat(
            "bad-both-generation-flags",
            _user("x"),
            add_generation_prompt=True,
            continue_final_message=True,
        ),
        _chat("bad-empty-messages", []),
        _chat("bad-no-role", [{"content": "x"}]),
        _chat("bad-content-number", [{"role": "user", "content": 5}]),
        _chat("bad-text-part-number", [{"role": "user", "content": [{"type": "text", "text": 5}]}]),
        _chat(
            "bad-tool-description",
            _user("x"),
            tools=[{"type": "function", "function": {"name": "f", "description": 5}}],
        ),
        _chat("bad-documents", _user("x"), documents=[{"title": "t", "n": 5}]),
        _chat(
            "unsupported-image",
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                        },
                    ],
                }
            ],
        ),
    ]


def _vllm_template_cases() -> list[Case]:
    """Templates shipped inside vLLM, sent as the request's chat_template."""
    chatml, basic = template("vllm_chatml"), template("vllm_basic")
    blip2, deepseek = template("vllm_blip2"), template("vllm_deepseek_vl2")
    turns = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    return [
        _chat("chatml-user", _user("Hello"), chat_template=chatml),
        _chat(
            "chatml-parts-joined",
            [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
                }
            ],
            chat_template=chatml,
        ),
        _chat(
            "chatml-assistant-last",
            [*turns, {"role": "assistant", "content": "A2"}],
            chat_template=chatml,
        ),
        _chat(
            "chatml-developer-consolidated",
            [
                {"role": "system", "content": "S1"},
                {"role": "user", "content": "U"},
                {"role": "developer", "content": "D1"},
                {"role": "system", "content": ""},
            ],
            chat_template=chatml,
        ),
        _chat(
            "chatml-continue-parts",
            [
                {"role": "user", "content": "u"},
                {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b "}],
                },
            ],
            chat_template=chatml,
            add_generation_prompt=False,
            continue_final_message=True,
        ),
        _chat("chatml-tools-ignored", _user("x"), tools=TOOLS, chat_template=chatml),
        _chat(
            "chatml-content-none",
            [{"role": "user", "content": "u"}, {"role": "assistant", "content": None}],
            chat_template=chatml,
            add_generation_prompt=False,
        ),
        _chat("basic-user", turns, chat_template=basic),
        _chat(
            "basic-parts",
            [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ],
            chat_template=basic,
        ),
        _chat("blip2-qa", turns, chat_template=blip2),
        _chat("blip2-no-generation", turns, chat_template=blip2, add_generation_prompt=False),
        _chat(
            "deepseek-system",
            [
                {"role": "system", "content": "Be kind."},
                *turns,
                {"role": "assistant", "content": "A2"},
                {"role": "user", "content": "Q3"},
            ],
            chat_template=deepseek,
        ),
        _chat(
            "bad-deepseek-alternation",
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            chat_template=deepseek,
        ),
    ]


def _own_template_cases() -> list[Case]:
    tools_tpl, feat = template("tools_llama_style"), template("features")
    return [
        _chat(
            "llama-tools",
            [
                {"role": "system", "content": "  Use tools.  "},
                {"role": "user", "content": "Weather?"},
            ],
            tools=TOOLS,
            chat_template=tools_tpl,
        ),
        _chat("llama-tool-history", TOOL_HISTORY, tools=TOOLS, chat_template=tools_tpl),
        _chat("llama-no-tools", _user("plain"), chat_template=tools_tpl),
        _chat(
            "features-basic",
            [{"role": "system", "content": "S"}, {"role": "user", "content": "U", "name": "ann"}],
            chat_template=feat,
        ),
        _chat(
            "features-documents",
            _user("Summarise"),
            chat_template=feat,
            documents=[{"title": "Doc A", "text": "Alpha"}, {"title": "Doc B", "text": "β"}],
        ),
        _chat(
            "features-kwargs",
            _user("u"),
            chat_template=feat,
            chat_template_kwargs={
                "persona": "pirate",
                "enable_thinking": False,
                "reasoning_effort": "auto",
                "bos_token": "<BOS?>",
            },
        ),
        _chat("features-reasoning-effort", _user("u"), chat_template=feat, reasoning_effort="high"),
        _chat(
            "features-reasoning-effort-none",
            _user("u"),
            chat_template=feat,
            reasoning_effort="none",
        ),
        _chat(
            "features-developer-kept",
            [{"role": "developer", "content": "D"}, {"role": "user", "content": "U"}],
            chat_template=feat,
        ),
        _chat(
            "features-loop-controls",
            [
                {"role": "user", "content": "a"},
                {"role": "skip", "content": "hidden"},
                {"role": "user", "content": "b"},
                {"role": "stop", "content": "x"},
                {"role": "user", "content": "never"},
            ],
            chat_template=feat,
        ),
        _chat(
            "features-assistant-generation",
            [
                {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "a1", "reasoning": "old thoughts"},
                {"role": "user", "content": "u2"},
                {
                    "role": "assistant",
                    "content": "a2",
                    "reasoning": "new thoughts",
                    "tool_calls": [TOOL_CALL],
                },
            ],
            chat_template=feat,
            add_generation_prompt=False,
        ),
        _chat(
            "features-part-extras",
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "cached", "cache_control": {"type": "ephemeral"}},
                        {"type": "text", "text": " plain"},
                    ],
                }
            ],
            chat_template=feat,
        ),
        _chat(
            "features-continue",
            [{"role": "user", "content": "u"}, {"role": "assistant", "content": "Start: "}],
            chat_template=feat,
            add_generation_prompt=False,
            continue_final_message=True,
        ),
        _chat(
            "bad-features-unknown-role", [{"role": "wizard", "content": "x"}], chat_template=feat
        ),
    ]


def _completion_cases() -> list[Case]:
    return [
        _completion("cmpl-simple", "Once upon a time"),
        _completion("cmpl-no-special", "Once upon a time", add_special_tokens=False),
        _completion("cmpl-list", ["first prompt", "second, longer prompt with more words", ""]),
        _completion("cmpl-token-ids", [0, 15, 27, 300, 1999]),
        _completion("cmpl-token-id-lists", [[0, 1, 2], [5], [7, 8, 9, 10]]),
        _completion("cmpl-unicode", "Ünïcödé façade 🙂👩‍💻 日本語テキスト ½"),
        _completion("cmpl-whitespace", " \n\t  spaces   \n\n"),
        _completion("cmpl-special-text", "<s>hello</s><|im_start|>user"),
        _completion("cmpl-code", "def f(x):\n    return x ** 2  # square\n"),
        _completion("cmpl-truncate", MEDIUM, truncate_prompt_tokens=5),
        _completion("cmpl-truncate-ids", [[1, 2, 3, 4, 5, 6], [7]], truncate_prompt_tokens=3),
        _completion("cmpl-truncate-minus-one", MEDIUM, truncate_prompt_tokens=-1),
        _completion("cmpl-medium", MEDIUM),
        _completion("long-cmpl", LONG),
        _completion("long-cmpl-truncate-minus-one", LONG, truncate_prompt_tokens=-1),
        _completion(
            "long-cmpl-truncate-minus-one-no-limit",
            LONG,
            truncate_prompt_tokens=-1,
            max_tokens=None,
        ),
        _completion("bad-cmpl-empty-list", []),
        _completion("bad-cmpl-negative-id", [1, -2]),
        _completion("bad-cmpl-mixed", ["a", 1]),
    ]


def cases() -> list[Case]:
    return [
        *_model_template_cases(),
        *_vllm_template_cases(),
        *_own_template_cases(),
        *_completion_cases(),
    ]


def local_ids(tok: PromptTokenizer, case: Case) -> tuple[list[list[int]], str | None]:
    """Ids per prompt as PromptTokenizer makes them (before truncation), and the chat text."""
    body = case["body"]
    if case["kind"] == "completion":
        prompts = completion_prompts(body["prompt"])
        special = body.get("add_special_tokens", True)
        return [
            p if isinstance(p, list) else tok.encode_completion(p, special) for p in prompts
        ], None
    fields = {
        k: body[k]
        for k in ("tools", "chat_template", "chat_template_kwargs", "documents", "reasoning_effort")
        if k in body
    }
    text = tok.render_chat(
        body["messages"],
        add_generation_prompt=body.get("add_generation_prompt", True),
        continue_final_message=body.get("continue_final_message", False),
        **fields,
    )
    ids = tok.encode_chat(
        body["messages"],
        add_generation_prompt=body.get("add_generation_prompt", True),
        continue_final_message=body.get("continue_final_message", False),
        add_special_tokens=body.get("add_special_tokens", False),
        **fields,
    )
    return [ids], text
