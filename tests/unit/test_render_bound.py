"""engine.render_bound: the rendered length bound computed without rendering is never below the
rendered prompt's UTF-8 length, and its token bound never below the exact count, for every chat
of the token corpus under the tiny model's template and every template the parity tests use
(ours and vLLM's, system-prompt and tool templates included), and for random conversations;
templates outside the family it can prove things about get no bound (they are rendered)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.chat_template import compile_template
from engine.tokenization import InvalidChat, PromptTokenizer, UnsupportedLocally
from tests.token_corpus import cases, template_paths

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "tiny"


@pytest.fixture(scope="module")
def tok() -> PromptTokenizer:
    return PromptTokenizer.from_dir(MODEL_DIR)


def _templates() -> dict[str, str | None]:
    found: dict[str, str | None] = {"model": None}
    found.update({p.stem: p.read_text(encoding="utf-8") for p in template_paths()})
    return found


TEMPLATES = _templates()
CHATS = [c for c in cases() if c["kind"] == "chat"]


def _check(tok: PromptTokenizer, body: dict[str, Any], template: str | None) -> bool:
    """Asserts the bound where there is one; True when there was one."""
    fields = {
        k: body[k]
        for k in ("tools", "chat_template_kwargs", "documents", "reasoning_effort")
        if k in body
    }
    try:
        prepared = tok.prepare_chat(
            body["messages"],
            add_generation_prompt=body.get("add_generation_prompt", True),
            continue_final_message=body.get("continue_final_message", False),
            chat_template=template if template is not None else body.get("chat_template"),
            **fields,
        )
    except (InvalidChat, UnsupportedLocally):
        return False
    nbytes = prepared.length_bound()
    try:
        text = prepared.render()
    except InvalidChat:
        # A template that raises for this request keeps raising: the bound is only used when
        # rendering could not fail, so this request must have had no bound.
        assert nbytes is None
        return False
    if nbytes is None:
        return False
    assert nbytes >= len(text.encode("utf-8"))
    bound = tok.tokens_bound(nbytes)
    assert bound is not None
    exact = len(tok.encode_completion(text, body.get("add_special_tokens", False)))
    assert bound >= exact
    assert bound >= tok.upper_bound(text)
    return True


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_corpus_under_every_template(tok: PromptTokenizer, name: str) -> None:
    """Every corpus chat, under this template: bound >= rendered bytes >= exact tokens."""
    for case in CHATS:
        body = case["body"]
        template = TEMPLATES[name] if "chat_template" not in body else None
        _check(tok, body, template)


def test_the_tiny_template_is_proven(tok: PromptTokenizer) -> None:
    """The tiny model's own template (openai content format, tools and tool calls in dead
    branches) has a bound, so plain chats are admitted without rendering."""
    used = [
        c["id"] for c in CHATS if "chat_template" not in c["body"] and _check(tok, c["body"], None)
    ]
    assert len(used) >= 5, used


OUT_OF_FAMILY = [
    "{{ raise_exception('no') }}",
    "{% set x = messages[0]['content'] %}{{ x }}",
    "{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}",
    "{% for m in messages %}{{ m }}{% endfor %}",
    "{% for m in messages %}{{ m['name'] }}{% endfor %}",
    "{% for m in messages %}{% for n in messages %}{{ n['content'] }}{% endfor %}{% endfor %}",
    "{{ messages[0]['content'] }}",
    "{% for m in messages %}{% if m['content'] | length > 3 %}x{% endif %}{% endfor %}",
    "{% macro f(x) %}{{ x }}{% endmacro %}{% for m in messages %}{{ f(m['role']) }}{% endfor %}",
    "{{ strftime_now('%Y') }}",
    "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}",
    "{% for m in messages %}{{ loop.index }}{% endfor %}",
]


@pytest.mark.parametrize("source", OUT_OF_FAMILY)
def test_out_of_family(source: str) -> None:
    """Templates that call, assign, serialise, write other fields or nest message loops get no
    bound in either content format (the caller renders them)."""
    bounds = compile_template(source).length_bounds
    assert bounds == {"string": None, "openai": None}


IN_FAMILY = [
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
    "{% if messages[0]['role'] != 'system' %}You are a helpful assistant.\n{% endif %}"
    "{% for m in messages %}{{ m.role + ': ' + m.content }}{% endfor %}",
    "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}[{{ p['text'] }}]{% endfor %}{% endif %}{% endfor %}",
    "{% for m in messages if m.role == 'user' %}{{ m.content ~ '|' ~ m.content }}{% endfor %}",
]


@pytest.mark.parametrize("source", IN_FAMILY)
def test_in_family(tok: PromptTokenizer, source: str) -> None:
    """Small templates of the family (a system prompt injected, trim, `+` and `~`, content
    parts written twice) get a bound, and it holds for the corpus."""
    assert any(compile_template(source).length_bounds.values())
    for case in CHATS:
        if "chat_template" not in case["body"]:
            _check(tok, case["body"], source)


texts = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40
) | st.sampled_from(["", " ", "<|im_end|>", "<|im_start|>", "\n\n", "é😀", "  x  "])
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "x"]),
            "content": texts
            | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}), max_size=3),
        }
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=150, deadline=None)
@given(messages, st.booleans(), st.sampled_from(sorted(TEMPLATES)))
def test_random_conversations(
    tok: PromptTokenizer, convo: list[dict[str, Any]], generation: bool, name: str
) -> None:
    """Random conversations (any text, special-token strings, content parts, any role) under
    every template: the bound, where there is one, holds."""
    _check(tok, {"messages": convo, "add_generation_prompt": generation}, TEMPLATES[name])


@pytest.fixture(scope="module")
def server_toks() -> dict[tuple[str, str], PromptTokenizer]:
    """The tiny tokenizer under each template (the small family's too) as the server's own
    (`--chat-template`), in each content format: a chat without a template of its own is then
    a plain chat."""
    return {
        (name, fmt): PromptTokenizer.from_dir(MODEL_DIR, chat_template=source, content_format=fmt)
        for name, source in PLAIN_TEMPLATES.items()
        for fmt in ("string", "openai")
    }


PLAIN_TEMPLATES = TEMPLATES | {f"in_family_{i}": source for i, source in enumerate(IN_FAMILY)}


plain_texts = texts | st.sampled_from(
    ["x-anthropic-billing-header: a\nb", "x-anthropic-billing-header"]
)
maybe_plain = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "x"]),
            "content": plain_texts
            | st.none()
            | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}), max_size=2),
        },
        optional={"name": st.just("n")},
    ),
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(maybe_plain, st.booleans(), st.sampled_from(sorted(PLAIN_TEMPLATES)), st.booleans())
def test_a_plain_chats_bound_is_the_prepared_ones(
    server_toks: dict[tuple[str, str], PromptTokenizer],
    convo: list[dict[str, Any]],
    generation: bool,
    name: str,
    openai: bool,
) -> None:
    """plain_chat_bound, made without vLLM's conversation, is the bound prepare_chat's
    conversation gives, for every conversation it answers; it answers None for any other
    (developer and billing-header system messages, content parts, a null content, extra keys,
    no message), and nothing until a plain chat made the setup."""
    tok = server_toks[(name, "openai" if openai else "string")]
    try:
        prepared = tok.prepare_chat(convo, add_generation_prompt=generation)
    except (InvalidChat, UnsupportedLocally):
        prepared = None
    fast = tok.plain_chat_bound(convo, generation)
    plain = bool(convo) and all(
        set(m) == {"role", "content"}
        and isinstance(m["content"], str)
        and m["role"] != "developer"
        and not (m["role"] == "system" and m["content"].startswith("x-anthropic-billing-header"))
        for m in convo
    )
    if not plain:
        assert fast is None
        return
    assert prepared is not None  # a plain chat passes every check
    assert fast == prepared.length_bound()


@pytest.mark.parametrize("fmt", ["string", "openai"])
def test_a_plain_chat_is_bounded_without_preparing(fmt: str) -> None:
    """Under the tiny model's own template, in either content format, a plain chat gets its
    bound from plain_chat_bound once the first plain chat made the setup (not before), and it
    is the prepared conversation's bound."""
    tok = PromptTokenizer.from_dir(MODEL_DIR, content_format=fmt)  # type: ignore[arg-type]
    convo = [
        {"role": "system", "content": "Be brief. é"},
        {"role": "user", "content": "Hello there 😀"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "And again"},
    ]
    assert tok.plain_chat_bound(convo, True) is None  # no setup yet
    expected = tok.prepare_chat(convo).length_bound()
    assert expected is not None
    assert tok.plain_chat_bound(convo, True) == expected
    assert tok.plain_chat_bound(convo, False) is None  # that setup is not made yet
