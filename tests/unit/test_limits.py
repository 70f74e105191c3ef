"""gateway.limits: every limit accepted at its bound, refused past it with vLLM's envelope
naming the field, crash class refused in report mode too, cost class only reported there."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from PIL import Image

from gateway.config import Limits, OnExceed, PolicyMode
from gateway.limit_names import CRASH_CLASS, Limit
from gateway.limits import (
    Checked,
    Vocabulary,
    check_embeddings,
    check_generation,
    check_output_budget,
    check_tokenize,
)
from gateway.policy import Action, Admit, Reject, decide
from gateway.schemas import parse_chat, parse_completion
from tests.helpers import error_envelope

VOCAB = Vocabulary(100)
Json = dict[str, Any]


def chat(**fields: Any) -> Json:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def completion(**fields: Any) -> Json:
    return {"model": "m", "prompt": "hi", **fields}


def png(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def with_parts(*parts: Json) -> Json:
    return chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x"}, *parts]}])


def image(url: str) -> Json:
    return {"type": "image_url", "image_url": {"url": url}}


def nested(kind: str, depth: int) -> Json:
    schema: Json = {"type": "string"}
    for _ in range(depth - 1):
        schema = {kind: [schema]}
    return schema


def rf(schema: object) -> Json:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


LOOP = {
    "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
    "$ref": "#/$defs/a",
}

# (id, endpoint, limits, accepted at the bound, refused past it, limit, param)
ROWS: list[tuple[str, str, Json, Json, Json, Limit, str]] = [
    ("logit_bias vocab", "chat", {}, chat(logit_bias={"99": 1}), chat(logit_bias={"100": 1}),
     Limit.VOCABULARY, "logit_bias"),
    ("logit_bias negative", "chat", {}, chat(logit_bias={"0": 1}), chat(logit_bias={"-1": 1}),
     Limit.VOCABULARY, "logit_bias"),
    ("logit_bias count", "chat", {"max_token_ids": 3},
     chat(logit_bias={"1": 1, "2": 1, "3": 1}), chat(logit_bias={"1": 1, "2": 1, "3": 1, "4": 1}),
     Limit.MAX_TOKEN_IDS, "logit_bias"),
    ("allowed_token_ids vocab", "completion", {}, completion(allowed_token_ids=[0, 99]),
     completion(allowed_token_ids=[0, 100]), Limit.VOCABULARY, "allowed_token_ids"),
    ("allowed_token_ids count", "completion", {"max_token_ids": 2},
     completion(allowed_token_ids=[1, 2]), completion(allowed_token_ids=[1, 2, 3]),
     Limit.MAX_TOKEN_IDS, "allowed_token_ids"),
    ("stop_token_ids vocab", "chat", {}, chat(stop_token_ids=[99]), chat(stop_token_ids=[100]),
     Limit.VOCABULARY, "stop_token_ids"),
    ("stop_token_ids count", "chat", {"max_token_ids": 1}, chat(stop_token_ids=[5]),
     chat(stop_token_ids=[5, 6]), Limit.MAX_TOKEN_IDS, "stop_token_ids"),
    ("logprob_token_ids vocab", "chat", {}, chat(logprobs=True, logprob_token_ids=[99]),
     chat(logprobs=True, logprob_token_ids=[1000]), Limit.VOCABULARY, "logprob_token_ids"),
    ("bad_words count", "chat", {"max_bad_words": 2}, chat(bad_words=["a", "b"]),
     chat(bad_words=["a", "b", "c"]), Limit.MAX_BAD_WORDS, "bad_words"),
    ("token-id prompt", "completion", {}, completion(prompt=[0, 5, 99]),
     completion(prompt=[0, 5, 100]), Limit.VOCABULARY, "prompt"),
    ("token-id prompts", "completion", {}, completion(prompt=[[1], [99]]),
     completion(prompt=[[1], [99, 100]]), Limit.VOCABULARY, "prompt"),
    ("top_logprobs", "chat", {}, chat(logprobs=True, top_logprobs=20),
     chat(logprobs=True, top_logprobs=21), Limit.MAX_LOGPROBS, "top_logprobs"),
    ("top_logprobs -1", "chat", {}, chat(logprobs=True, top_logprobs=20),
     chat(logprobs=True, top_logprobs=-1), Limit.MAX_LOGPROBS, "top_logprobs"),
    ("logprobs", "completion", {"max_logprobs": 5}, completion(logprobs=5),
     completion(logprobs=6), Limit.MAX_LOGPROBS, "logprobs"),
    ("prompt_logprobs closed", "completion", {}, completion(prompt_logprobs=None),
     completion(prompt_logprobs=0), Limit.PROMPT_LOGPROBS, "prompt_logprobs"),
    ("echo implies prompt_logprobs", "completion", {}, completion(echo=True),
     completion(echo=True, logprobs=1), Limit.PROMPT_LOGPROBS, "echo"),
    ("chat echo implies prompt_logprobs", "chat", {}, chat(echo=False), chat(echo=True),
     Limit.PROMPT_LOGPROBS, "echo"),
    ("prompt_logprobs bounded", "completion", {"prompt_logprobs": True},
     completion(prompt_logprobs=5), completion(prompt_logprobs=6), Limit.MAX_PROMPT_LOGPROBS,
     "prompt_logprobs"),
    ("stop count", "chat", {"max_stop": 2}, chat(stop=["a", "b"]), chat(stop=["a", "b", "c"]),
     Limit.MAX_STOP, "stop"),
    ("stop length", "completion", {"max_stop_chars": 4}, completion(stop="abcd"),
     completion(stop=["abcde"]), Limit.MAX_STOP_CHARS, "stop"),
    ("kv_transfer_params", "chat", {}, chat(kv_transfer_params=None),
     chat(kv_transfer_params={"do_remote_prefill": True}), Limit.FORBIDDEN_FIELD,
     "kv_transfer_params"),
    ("vllm_xargs", "completion", {}, completion(), completion(vllm_xargs={"a": 1}),
     Limit.FORBIDDEN_FIELD, "vllm_xargs"),
    ("configured forbidden field", "chat", {"forbidden_fields": ["cache_salt"]},
     chat(kv_transfer_params={"x": 1}), chat(cache_salt="s"), Limit.FORBIDDEN_FIELD,
     "cache_salt"),
    ("priority", "chat", {}, chat(priority=0), chat(priority=-5), Limit.PRIORITY, "priority"),
    ("structured outputs off", "chat", {"structured_outputs": False},
     chat(response_format={"type": "text"}), chat(response_format={"type": "json_object"}),
     Limit.STRUCTURED_OUTPUTS, "response_format"),
    ("structured outputs off, guided", "completion", {"structured_outputs": False},
     completion(), completion(guided_regex="a+"), Limit.STRUCTURED_OUTPUTS, "guided_regex"),
    ("structured outputs off, tools", "chat", {"structured_outputs": False},
     chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="auto"),
     chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required"),
     Limit.STRUCTURED_OUTPUTS, "tool_choice"),
    ("schema $ref loop", "chat", {},
     chat(response_format=rf({"properties": {"next": {"$ref": "#"}}})),
     chat(response_format=rf(LOOP)), Limit.SCHEMA_REF_CYCLE, "response_format"),
    ("schema bad type", "chat", {},
     chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {
         "type": "object"}}}]),
     chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {
         "type": "objekt"}}}]), Limit.SCHEMA_INVALID, "tools"),
    ("schema depth", "completion", {"max_schema_depth": 4},
     completion(structured_outputs={"json": nested("anyOf", 4)}),
     completion(structured_outputs={"json": nested("anyOf", 5)}), Limit.MAX_SCHEMA_DEPTH,
     "structured_outputs"),
    ("schema enum", "chat", {"max_schema_enum": 3},
     chat(response_format=rf({"enum": [1, 2, 3]})),
     chat(response_format=rf({"enum": [1, 2, 3, 4]})), Limit.MAX_SCHEMA_ENUM, "response_format"),
    ("guided_choice", "completion", {"max_schema_enum": 2}, completion(guided_choice=["a", "b"]),
     completion(guided_choice=["a", "b", "c"]), Limit.MAX_SCHEMA_ENUM, "guided_choice"),
    ("schema oneOf", "chat", {"max_schema_alternatives": 2},
     chat(response_format=rf({"oneOf": [{"type": "string"}, {"type": "null"}]})),
     chat(response_format=rf({"oneOf": [{"type": "string"}, {"type": "null"}, True]})),
     Limit.MAX_SCHEMA_ALTERNATIVES, "response_format"),
    ("schema bytes", "chat", {"max_schema_bytes": 30},
     chat(response_format=rf({"type": "string", "x": "123456"})),  # 30 bytes as JSON
     chat(response_format=rf({"type": "string", "x": "1234567"})), Limit.MAX_SCHEMA_BYTES,
     "response_format"),
    ("schema as text", "completion", {}, completion(guided_json='{"type": "string"}'),
     completion(guided_json='{"type": '), Limit.SCHEMA_INVALID, "guided_json"),
    ("regex", "completion", {"max_regex_chars": 3}, completion(structured_outputs={"regex": "a+b"}),
     completion(structured_outputs={"regex": "a+bc"}), Limit.MAX_REGEX_CHARS,
     "structured_outputs"),
    ("grammar", "completion", {"max_grammar_chars": 8}, completion(guided_grammar="root ::= a"[:8]),
     completion(guided_grammar="root ::= a"), Limit.MAX_GRAMMAR_CHARS, "guided_grammar"),
    ("media parts", "chat", {"max_media_parts": 2}, with_parts(image(png(4, 4)), image(png(4, 4))),
     with_parts(image(png(4, 4)), image(png(4, 4)), image(png(4, 4))), Limit.MAX_MEDIA_PARTS,
     "messages"),
    ("media bytes", "chat", {"max_media_bytes": 3},
     with_parts({"type": "input_audio", "input_audio": {"data": "YWJj", "format": "wav"}}),
     with_parts({"type": "input_audio", "input_audio": {"data": "YWJjZA==", "format": "wav"}}),
     Limit.MAX_MEDIA_BYTES, "messages"),
    ("1x1 image", "chat", {}, with_parts(image(png(2, 2))), with_parts(image(png(1, 1))),
     Limit.MIN_IMAGE_SIDE, "messages"),
    ("image side", "chat", {"max_image_side": 64}, with_parts(image(png(64, 2))),
     with_parts(image(png(65, 2))), Limit.MAX_IMAGE_SIDE, "messages"),
    ("image pixels", "chat", {"max_image_pixels": 100}, with_parts(image(png(10, 10))),
     with_parts(image(png(10, 11))), Limit.MAX_IMAGE_PIXELS, "messages"),
    ("remote media", "chat", {}, with_parts(image(png(4, 4))),
     with_parts(image("https://example.com/cat.png")), Limit.REMOTE_MEDIA, "messages"),
    ("remote media allow-list", "chat",
     {"remote_media": "allow-list", "remote_media_hosts": ["Cdn.Example.com"]},
     with_parts({"type": "video_url", "video_url": {"url": "https://cdn.example.com/v.mp4"}}),
     with_parts({"type": "audio_url", "audio_url": {"url": "http://10.0.0.1/latest/meta"}}),
     Limit.REMOTE_MEDIA, "messages"),
    ("file: media", "chat", {"remote_media": "any"},
     with_parts(image("http://anything.example/x.png")), with_parts(image("file:///etc/passwd")),
     Limit.MEDIA_SCHEME, "messages"),
    ("tokenize tools", "tokenize", {}, chat(tools=[{"function": {"parameters": {"type": "null"}}}]),
     chat(tools=[{"function": {"parameters": {"$ref": "#"}}}]), Limit.SCHEMA_REF_CYCLE,
     "tools"),
    ("tokenize media", "tokenize", {}, with_parts(image(png(3, 3))),
     with_parts(image("http://169.254.169.254/")), Limit.REMOTE_MEDIA, "messages"),
    ("embeddings ids", "embeddings", {}, {"model": "m", "input": [1, 99]},
     {"model": "m", "input": [[1], [100]]}, Limit.VOCABULARY, "input"),
    ("embeddings forbidden", "embeddings", {}, {"model": "m", "input": "x"},
     {"model": "m", "input": "x", "kv_transfer_params": {}}, Limit.FORBIDDEN_FIELD,
     "kv_transfer_params"),
]  # fmt: skip


def run(endpoint: str, body: Json, limits: Limits, mode: PolicyMode) -> Checked:
    if endpoint == "tokenize":
        return check_tokenize(body, limits=limits, vocab=VOCAB, mode=mode)
    if endpoint == "embeddings":
        return check_embeddings(body, limits=limits, vocab=VOCAB, mode=mode)
    return check_generation(body, chat=endpoint == "chat", limits=limits, vocab=VOCAB, mode=mode)


@pytest.mark.parametrize(
    ("endpoint", "overrides", "at_bound", "past", "limit", "param"),
    [pytest.param(*row[1:], id=row[0]) for row in ROWS],
)
@pytest.mark.parametrize("mode", list(PolicyMode))
def test_limit_at_and_past_its_bound(
    endpoint: str,
    overrides: Json,
    at_bound: Json,
    past: Json,
    limit: Limit,
    param: str,
    mode: PolicyMode,
) -> None:
    """At the bound nothing is refused or reported; past it, the limit's 400 names the field:
    refused in enforce mode, and in report mode refused if crash class, else only reported."""
    limits = Limits(**overrides)
    accepted = run(endpoint, at_bound, limits, mode)
    assert (accepted.refusal, accepted.would_reject) == (None, None)
    checked = run(endpoint, past, limits, mode)
    crash = limit in CRASH_CLASS
    refused = checked.refusal if crash or mode is PolicyMode.ENFORCE else checked.would_reject
    other = checked.would_reject if refused is checked.refusal else checked.refusal
    assert refused is not None, checked
    assert other is None
    assert refused.reason is limit
    envelope = error_envelope(refused.error.body(), 400)
    assert envelope["param"] == param
    assert envelope["type"] == "BadRequestError"
    assert refused.error.message
    fields = checked.log_fields
    if checked.refusal is not None:
        assert fields["reason"] == limit.value
        assert fields["limit_class"] == ("crash" if crash else "cost")
    else:
        assert fields["would_reject"] == limit.value


def test_a_request_without_watched_fields_is_returned_as_it_came() -> None:
    """The fast path: an ordinary chat gets its own body back, untouched."""
    body = chat(max_tokens=5, temperature=0.2, stream=True)
    checked = check_generation(
        body, chat=True, limits=Limits(), vocab=VOCAB, mode=PolicyMode.ENFORCE
    )
    assert checked.body is body
    assert checked == Checked(body)


def test_unknown_vocabulary_checks_only_the_rest() -> None:
    """Without a vocabulary, ids are not range-checked, but list lengths still are."""
    limits = Limits(max_token_ids=1)
    ok = check_generation(
        chat(logit_bias={"999999": 1}), chat=True, limits=limits, vocab=None,
        mode=PolicyMode.ENFORCE,
    )  # fmt: skip
    assert ok.refusal is None
    long = check_generation(
        chat(stop_token_ids=[1, 2]), chat=True, limits=limits, vocab=None, mode=PolicyMode.ENFORCE
    )
    assert long.refusal is not None
    assert long.refusal.reason is Limit.MAX_TOKEN_IDS


def test_strip_removes_forbidden_fields_and_forwards_the_rest() -> None:
    """forbidden_action strip: a copy without the fields, the client's body left alone."""
    body = chat(kv_transfer_params={"x": 1}, priority=3, temperature=0)
    checked = check_generation(
        body,
        chat=True,
        limits=Limits(forbidden_action="strip"),
        vocab=VOCAB,
        mode=PolicyMode.ENFORCE,
    )
    assert checked.refusal is None
    assert checked.stripped == ("kv_transfer_params", "priority")
    assert "kv_transfer_params" not in checked.body
    assert "priority" not in checked.body
    assert checked.body["temperature"] == 0
    assert "kv_transfer_params" in body
    assert checked.log_fields["stripped_fields"] == ["kv_transfer_params", "priority"]


def test_priority_where_allowed() -> None:
    """allow_priority lets a priority through."""
    checked = check_generation(
        chat(priority=-5),
        chat=True,
        limits=Limits(allow_priority=True),
        vocab=VOCAB,
        mode=PolicyMode.ENFORCE,
    )
    assert checked.refusal is None


def test_report_mode_still_refuses_a_crash_behind_a_cost() -> None:
    """In report mode a cost finding does not hide a later crash finding."""
    body = chat(stop=["a"] * 100, logit_bias={"100": 1})
    checked = check_generation(
        body, chat=True, limits=Limits(), vocab=VOCAB, mode=PolicyMode.REPORT
    )
    assert checked.refusal is not None
    assert checked.refusal.reason is Limit.VOCABULARY


def test_bad_words_past_the_output_vocabulary() -> None:
    """With a tokenizer larger than the output vocabulary, a bad word is tokenized (with and
    without a leading space, as vLLM does) and refused when an id falls past it."""
    ids = {"ok": [5], " ok": [6], "new": [150], " new": [7]}
    vocab = Vocabulary(100, 160, lambda text: ids[text])
    limits = Limits()
    for words, refused in ((["ok"], False), (["ok", "new"], True)):
        checked = check_generation(
            chat(bad_words=words), chat=True, limits=limits, vocab=vocab, mode=PolicyMode.REPORT
        )
        assert (checked.refusal is not None) is refused
    checked = check_generation(
        chat(bad_words=[" new"]), chat=True, limits=limits, vocab=vocab, mode=PolicyMode.ENFORCE
    )
    assert checked.refusal is not None
    assert checked.refusal.error.param == "bad_words"
    assert "150" in checked.refusal.error.message


def test_wrong_types_are_left_to_the_engine() -> None:
    """Fields of the wrong type are not this module's to judge: no refusal, no exception."""
    body = chat(
        logit_bias={"x": 1},
        stop_token_ids=["a"],
        top_logprobs="5",
        stop=5,
        response_format={"type": "json_schema", "json_schema": "x"},
        tools="x",
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": 5}, 7]}],
    )
    checked = check_generation(
        body, chat=True, limits=Limits(), vocab=VOCAB, mode=PolicyMode.ENFORCE
    )
    assert checked.refusal is None
    prompt = check_generation(
        completion(prompt=[1, "a"]), chat=False, limits=Limits(), vocab=VOCAB,
        mode=PolicyMode.ENFORCE,
    )  # fmt: skip
    assert prompt.refusal is None


# -- the output budget ---------------------------------------------------------------------


def admitted(body: Json, mode: PolicyMode = PolicyMode.ENFORCE, **policy: Any) -> Admit:
    from gateway.config import Policy

    view = parse_chat(body)
    decision = decide(view, Policy(mode=mode, **policy), [10], 100_000)
    assert isinstance(decision, Admit)
    return decision


BUDGET_ROWS = [
    # (id, body, on_exceed, total, expected max_tokens or refused param, action)
    ("fits", chat(n=4, max_tokens=100), "clamp", 400, 100, Action.KEPT),
    ("clamped per choice", chat(n=4, max_tokens=101), "clamp", 400, 100, Action.CLAMPED),
    ("rejected", chat(n=4, max_tokens=101), "reject", 400, "max_tokens", None),
    ("defaulted is lowered", chat(n=4), "reject", 400, 100, Action.DEFAULTED),
    ("n alone too many", chat(n=8, max_tokens=1), "clamp", 7, "n", None),
    ("best_of counts", completion(n=1, best_of=4, max_tokens=101), "clamp", 400, 100,
     Action.CLAMPED),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "on_exceed", "total", "expected", "action"),
    [pytest.param(*row[1:], id=row[0]) for row in BUDGET_ROWS],
)
def test_output_budget(
    body: Json, on_exceed: str, total: int, expected: int | str, action: Action | None
) -> None:
    """n x max_tokens over max_output_tokens_total: lowered per choice under clamp (or when the
    gateway chose the limit), else a 400 naming max_tokens (n when even 1 each is too many)."""
    from gateway.config import Policy

    policy = Policy(on_exceed=on_exceed, max_tokens_limit=4096, default_max_tokens=256)
    view = parse_chat(body) if "messages" in body else parse_completion(body)
    decision = decide(view, policy, [10], 4096)
    assert isinstance(decision, Admit)
    limits = Limits(max_output_tokens_total=total)
    out = check_output_budget(decision, view, body, limits, OnExceed(on_exceed))
    if isinstance(expected, str):
        assert isinstance(out, Reject)
        assert out.reason is Limit.MAX_OUTPUT_TOKENS_TOTAL
        assert out.error.param == expected
        return
    assert isinstance(out, Admit)
    assert (out.max_tokens, out.action) == (expected, action)
    assert out.rewrite(body)["max_tokens"] == expected


def test_output_budget_in_report_mode_only_reports() -> None:
    """Report mode forwards the request as sent and marks it would-reject."""
    body = chat(n=4, max_tokens=101)
    decision = admitted(body, PolicyMode.REPORT)
    out = check_output_budget(
        decision, parse_chat(body), body, Limits(max_output_tokens_total=400), OnExceed.REJECT
    )
    assert isinstance(out, Admit)
    assert out.max_tokens == 101
    assert out.headers["X-Vllm-Guard-Would-Reject"] == "max_output_tokens_total"


@pytest.mark.parametrize(
    ("body", "refused"),
    [
        (chat(max_tokens=50, min_tokens=50), False),
        (chat(max_tokens=5000, min_tokens=4096), False),  # clamped to 4096: still fits
        (chat(max_tokens=5000, min_tokens=4097), True),  # clamped under min_tokens
        (chat(min_tokens=257), True),  # defaulted to 256
        (chat(max_tokens=10, min_tokens=20), False),  # the client's own mistake: vLLM's 400
    ],
)
def test_min_tokens_checked_after_a_clamp(body: Json, refused: bool) -> None:
    """min_tokens over the max_tokens the gateway chose is a 400 naming min_tokens."""
    decision = admitted(body, max_tokens_limit=4096, default_max_tokens=256)
    out = check_output_budget(decision, parse_chat(body), body, Limits(), OnExceed.CLAMP)
    assert isinstance(out, Reject) is refused
    if isinstance(out, Reject):
        assert out.error.param == "min_tokens"
        assert out.reason is Limit.MIN_TOKENS
