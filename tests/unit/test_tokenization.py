"""PromptTokenizer on its own: the tiny model's metadata, upper bounds that never undercount,
decoding, and what it refuses or leaves to the engine. Its agreement with vLLM's renderer is
tests/engine/test_tokenization.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.tokenization import (
    InvalidChat,
    PromptTokenizer,
    UnsupportedLocally,
    completion_prompts,
    local_chat_supported,
)
from tests.helpers import MODEL_DIR
from tests.token_corpus import Case, cases, local_ids

CORPUS = cases()


def test_corpus_is_broad() -> None:
    """The corpus holds at least 50 requests of both kinds, with rejections and long prompts."""
    kinds = {c["kind"] for c in CORPUS}
    assert len(CORPUS) >= 50
    assert kinds == {"chat", "completion"}
    assert sum(c["id"].startswith("bad-") for c in CORPUS) >= 5
    assert any(c["id"].startswith("long-") for c in CORPUS)
    assert len({c["id"] for c in CORPUS}) == len(CORPUS)


def test_model_metadata(tok: PromptTokenizer) -> None:
    """The tiny model's tokenizer is read as exact, with its named special tokens."""
    assert tok.exact
    assert tok.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    assert tok.encode_completion("hi")[0] == tok.encode_completion("<s>", False)[0]


def test_model_specific_class_is_not_exact(tmp_path: Path) -> None:
    """A tokenizer class that transformers rebuilds in code is flagged, so `auto` asks the
    engine."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODEL_DIR / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["tokenizer_class"] = "LlamaTokenizer"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = PromptTokenizer.from_dir(tmp_path)
    assert not tok.exact
    assert tok.inexact_reason is not None
    assert "LlamaTokenizer" in tok.inexact_reason


@pytest.mark.parametrize("case", CORPUS, ids=[c["id"] for c in CORPUS])
def test_upper_bound_is_never_below_the_count(tok: PromptTokenizer, case: Case) -> None:
    """upper_bound of a prompt text is at least its exact token count."""
    try:
        _, text = local_ids(tok, case)
    except (InvalidChat, UnsupportedLocally):
        return
    texts = (
        [text]
        if text is not None
        else [p for p in completion_prompts(case["body"]["prompt"]) if isinstance(p, str)]
    )
    for t in texts:
        assert tok.upper_bound(t) >= len(tok.encode_completion(t, True))


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300))
def test_upper_bound_holds_for_any_text(tok: PromptTokenizer, text: str) -> None:
    """The bound holds for arbitrary Unicode, special-token look-alikes included."""
    for sample in (text, f"<s>{text}<|im_end|>", text * 3):
        assert tok.upper_bound(sample) >= len(tok.encode_completion(sample, True))


def test_decode_inverts_encode(tok: PromptTokenizer) -> None:
    """decode gives back the text of a plain prompt, special tokens included."""
    for text in ("Hello, wörld 🙂\n\tx", "<s>a</s>", ""):
        assert tok.decode(tok.encode_completion(text, False)) == text


def test_local_chat_supported_flags_what_needs_the_engine() -> None:
    """Text-only requests are local; images and kwargs that change the call are not."""
    text = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}
    image = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
            }
        ]
    }
    kwargs = {
        "messages": [{"role": "user", "content": "x"}],
        "chat_template_kwargs": {"tokenize": True},
    }
    invalid = {"messages": "not a list"}
    assert local_chat_supported(text)
    assert not local_chat_supported(image)
    assert not local_chat_supported(kwargs)
    assert local_chat_supported(invalid)  # the local path can say what is wrong


def test_invalid_chat_names_the_parameter(tok: PromptTokenizer) -> None:
    """Malformed structures raise InvalidChat with the offending parameter."""
    with pytest.raises(InvalidChat) as err:
        tok.render_chat([{"role": "user", "content": 7}])
    assert err.value.param == "messages"
    with pytest.raises(InvalidChat) as err:
        tok.render_chat([{"role": "user", "content": "x"}], tools=[{"function": {}}])
    assert err.value.param == "tools"
    with pytest.raises(InvalidChat) as err:
        tok.render_chat([{"role": "user", "content": "x"}], reasoning_effort="extreme")
    assert err.value.param == "reasoning_effort"


def test_unparsable_template_is_left_to_the_engine(tok: PromptTokenizer) -> None:
    """A template with a syntax error is the engine's to answer (vLLM fails it outside its
    template error handling)."""
    with pytest.raises(UnsupportedLocally):
        tok.render_chat([{"role": "user", "content": "x"}], chat_template="{% for %}")


GREETING_TEMPLATE = (
    "{{ greeting | default('none') }}|{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}"
    "{% endfor %}{% if add_generation_prompt %}|assistant:{% endif %}"
)


def test_a_plain_chats_setup_is_made_once_and_never_leaks() -> None:
    """Chats without tools, documents or template arguments of their own share one setup per
    flag combination, yet every chat renders as on a fresh tokenizer: arguments of one
    request (a greeting, add_generation_prompt off) never reach the next plain one."""
    shared = PromptTokenizer.from_dir(MODEL_DIR, chat_template=GREETING_TEMPLATE)
    hello = [{"role": "user", "content": "hello"}]
    calls: list[dict[str, object]] = [
        {},
        {"chat_template_kwargs": {"greeting": "hi"}},
        {},
        {"add_generation_prompt": False},
        {},
        {"chat_template_kwargs": {}},
        {"add_generation_prompt": False},
    ]
    rendered = []
    for kwargs in calls:
        fresh = PromptTokenizer.from_dir(MODEL_DIR, chat_template=GREETING_TEMPLATE)
        expected = fresh.prepare_chat(hello, **kwargs).render()  # type: ignore[arg-type]
        assert shared.prepare_chat(hello, **kwargs).render() == expected  # type: ignore[arg-type]
        rendered.append(expected)
    assert rendered[0] == "none|user:hello|assistant:"
    assert rendered[1] == "hi|user:hello|assistant:"
    assert rendered[3] == "none|user:hello"
    assert rendered[2] == rendered[5] == rendered[0]
    assert rendered[6] == rendered[3]
