"""The sampling fields of a request, checked against the model's limits and vocabulary:
token-id lists, bad words, logprobs, stop strings, and token-id prompts (gateway.limits calls
these). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.config import Limits
from gateway.limit_names import Finding, Limit

TOKEN_ID_FIELDS = ("logit_bias", "allowed_token_ids", "stop_token_ids", "logprob_token_ids")

_SHOWN_IDS = 10


@dataclass(frozen=True, slots=True)
class Vocabulary:
    """What the engine's vocabulary allows: ids in [0, size)."""

    size: int
    """min(config.json vocab_size, the tokenizer's size): the output vocabulary."""
    tokenizer_size: int | None = None
    encode: Callable[[str], Sequence[int]] | None = None
    """The tokenizer, given only when it is larger than the output vocabulary: a bad word may
    then tokenize to an id past it."""


def sampling_findings(
    body: Mapping[str, Any], chat: bool, limits: Limits, vocab: Vocabulary | None
) -> Iterator[Finding]:
    for key in TOKEN_ID_FIELDS:
        value = body.get(key)
        if isinstance(value, dict | list) and value:
            yield from _id_list_findings(key, value, limits, vocab)
    bad_words = body.get("bad_words")
    if isinstance(bad_words, list) and bad_words:
        yield from _bad_word_findings(bad_words, limits, vocab)
    yield from _logprob_findings(body, chat, limits)
    stop = body.get("stop")
    if stop is not None:
        yield from _stop_findings(stop, limits)


def _id_list_findings(
    key: str, value: dict[str, Any] | list[Any], limits: Limits, vocab: Vocabulary | None
) -> Iterator[Finding]:
    if vocab is not None:
        ids = _keys_as_ids(value) if isinstance(value, dict) else value
        bad = [i for i in ids if type(i) is int and not 0 <= i < vocab.size]
        if bad:
            # vLLM 0.32's own words (SamplingParams._validate_logit_bias and siblings).
            yield Finding(
                Limit.VOCABULARY,
                key,
                f"token_id(s) {bad[:_SHOWN_IDS]} in {key} contain out-of-vocab token ids. "
                f"Vocabulary size: {vocab.size}",
            )
    if len(value) > limits.max_token_ids:
        yield Finding(
            Limit.MAX_TOKEN_IDS,
            key,
            f"{key} has {len(value)} entries; this server accepts at most "
            f"{limits.max_token_ids} for this model (its limits.max_token_ids policy).",
        )


def _keys_as_ids(bias: Mapping[str, Any]) -> list[int]:
    try:
        return [int(key) for key in bias]
    except (TypeError, ValueError):
        pass
    ids = []
    for key in bias:
        try:
            ids.append(int(key))
        except (TypeError, ValueError):
            continue  # not a token id: the engine's own 400
    return ids


def _bad_word_findings(
    words: list[Any], limits: Limits, vocab: Vocabulary | None
) -> Iterator[Finding]:
    encode = vocab.encode if vocab is not None else None
    if vocab is not None and encode is not None:
        for word in words[: limits.max_bad_words]:
            if not isinstance(word, str):
                continue
            for text in (word.lstrip(), " " + word.lstrip()):  # as vLLM tokenizes them
                past = [i for i in encode(text) if i >= vocab.size]
                if past:
                    yield Finding(
                        Limit.VOCABULARY,
                        "bad_words",
                        f"bad_words entry {word[:40]!r} tokenizes to token id(s) "
                        f"{past[:_SHOWN_IDS]}, past the model's output vocabulary of "
                        f"{vocab.size} (its tokenizer knows {vocab.tokenizer_size}).",
                    )
                    break
    if len(words) > limits.max_bad_words:
        yield Finding(
            Limit.MAX_BAD_WORDS,
            "bad_words",
            f"bad_words has {len(words)} entries; this server accepts at most "
            f"{limits.max_bad_words} for this model (its limits.max_bad_words policy).",
        )


def number(value: object) -> int | None:
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    return None


def _logprob_findings(body: Mapping[str, Any], chat: bool, limits: Limits) -> Iterator[Finding]:
    param = "top_logprobs" if chat else "logprobs"
    k = number(body.get(param))
    if k is not None and (k == -1 or k > limits.max_logprobs):
        # vLLM 0.32's words (SamplingParams._validate_logprobs), -1 meaning the vocabulary.
        yield Finding(
            Limit.MAX_LOGPROBS,
            param,
            f"Requested sample logprobs of {'all the vocabulary' if k == -1 else k}, which is "
            f"greater than max allowed: {limits.max_logprobs}",
        )
    prompt_param, prompt_k = "prompt_logprobs", body.get("prompt_logprobs")
    if prompt_k is None and body.get("echo"):
        # vLLM: echo asks for the prompt's logprobs (chat: top_logprobs, default 0; completions:
        # logprobs).
        prompt_param = "echo"
        prompt_k = body.get("top_logprobs", 0) if chat else body.get("logprobs")
    p = number(prompt_k)
    if p is None:
        return
    if not limits.prompt_logprobs:
        yield Finding(
            Limit.PROMPT_LOGPROBS,
            prompt_param,
            f"{prompt_param} asks for the logprobs of every prompt token, which this server "
            "does not serve for this model (its limits.prompt_logprobs policy): on long "
            "prompts they exhaust the engine's memory.",
        )
    elif p == -1 or p > limits.max_prompt_logprobs:
        yield Finding(
            Limit.MAX_PROMPT_LOGPROBS,
            prompt_param,
            f"Requested prompt logprobs of {'all the vocabulary' if p == -1 else p}, which is "
            f"greater than max allowed: {limits.max_prompt_logprobs} (this server's "
            "limits.max_prompt_logprobs policy)",
        )


def _stop_findings(stop: object, limits: Limits) -> Iterator[Finding]:
    strings = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if len(strings) > limits.max_stop:
        yield Finding(
            Limit.MAX_STOP,
            "stop",
            f"stop has {len(strings)} entries; this server accepts at most {limits.max_stop} "
            "for this model (its limits.max_stop policy).",
        )
    longest = max((len(s) for s in strings if isinstance(s, str)), default=0)
    if longest > limits.max_stop_chars:
        yield Finding(
            Limit.MAX_STOP_CHARS,
            "stop",
            f"a stop string has {longest} characters; this server accepts at most "
            f"{limits.max_stop_chars} for this model (its limits.max_stop_chars policy).",
        )


def id_prompts(prompt: object) -> list[list[Any]] | None:
    """The token-id prompts of a `prompt` (or embeddings `input`), or None for text."""
    if not isinstance(prompt, list) or not prompt:
        return None
    first = prompt[0]
    if type(first) is int:
        return [prompt]
    if isinstance(first, list):
        return [p for p in prompt if isinstance(p, list) and p]
    return None


def prompt_id_findings(
    prompts: list[list[Any]], param: str, vocab: Vocabulary | None
) -> Iterator[Finding]:
    if vocab is None:
        return
    for index, ids in enumerate(prompts):
        try:
            low, high = min(ids), max(ids)
        except TypeError:
            continue  # not all numbers: the engine's own 400
        if low < 0 or high >= vocab.size:
            bad = [i for i in ids if not 0 <= i < vocab.size]
            where = param if len(prompts) == 1 else f"{param}[{index}]"
            yield Finding(
                Limit.VOCABULARY,
                param,
                f"{where} has token id(s) {bad[:_SHOWN_IDS]} outside the model's vocabulary "
                f"(0 <= id < {vocab.size}).",
            )
            return
