"""The names of the request limits (gateway.limits), their class, and what a check finds.

Kept apart from the checks so that the structured-output and media checkers, which the main
module calls, can name their findings without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Limit(StrEnum):
    """What a refused request broke; named for the `limits` field (or the failure) it is about.
    Bounded: usable as a metric label and as the `X-Vllm-Guard-Would-Reject` value."""

    VOCABULARY = "vocabulary"
    MAX_TOKEN_IDS = "max_token_ids"  # noqa: S105 - a limit's name, not a secret
    MAX_BAD_WORDS = "max_bad_words"
    MAX_LOGPROBS = "max_logprobs"
    PROMPT_LOGPROBS = "prompt_logprobs"
    MAX_PROMPT_LOGPROBS = "max_prompt_logprobs"
    STRUCTURED_OUTPUTS = "structured_outputs"
    SCHEMA_INVALID = "schema_invalid"
    SCHEMA_REF_CYCLE = "schema_ref_cycle"
    MAX_SCHEMA_BYTES = "max_schema_bytes"
    MAX_SCHEMA_DEPTH = "max_schema_depth"
    MAX_SCHEMA_ALTERNATIVES = "max_schema_alternatives"
    MAX_SCHEMA_ENUM = "max_schema_enum"
    MAX_REGEX_CHARS = "max_regex_chars"
    MAX_GRAMMAR_CHARS = "max_grammar_chars"
    FORBIDDEN_FIELD = "forbidden_field"
    PRIORITY = "priority"
    MAX_OUTPUT_TOKENS_TOTAL = "max_output_tokens_total"
    MIN_TOKENS = "min_tokens"
    MAX_STOP = "max_stop"
    MAX_STOP_CHARS = "max_stop_chars"
    MAX_MEDIA_PARTS = "max_media_parts"
    MAX_MEDIA_BYTES = "max_media_bytes"
    MIN_IMAGE_SIDE = "min_image_side"
    MAX_IMAGE_SIDE = "max_image_side"
    MAX_IMAGE_PIXELS = "max_image_pixels"
    REMOTE_MEDIA = "remote_media"
    MEDIA_SCHEME = "media_scheme"


CRASH_CLASS: frozenset[Limit] = frozenset(
    {
        Limit.VOCABULARY,
        Limit.PROMPT_LOGPROBS,
        Limit.STRUCTURED_OUTPUTS,
        Limit.SCHEMA_INVALID,
        Limit.SCHEMA_REF_CYCLE,
        Limit.FORBIDDEN_FIELD,
        Limit.PRIORITY,
        Limit.MIN_TOKENS,
        Limit.MIN_IMAGE_SIDE,
        Limit.REMOTE_MEDIA,
        Limit.MEDIA_SCHEME,
    }
)
"""Shapes known to kill or wedge the engine, or to reach where a client must not: refused in
every mode, report mode included. Every other limit is cost class: it follows the policy's
mode (report mode forwards the request and marks it `would-reject`)."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One broken limit: which, the request parameter it is in, and the client's message."""

    limit: Limit
    param: str
    message: str

    @property
    def crash(self) -> bool:
        return self.limit in CRASH_CLASS
