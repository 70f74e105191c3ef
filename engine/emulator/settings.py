"""What one emulated engine serves and how it misbehaves: the knobs behind the CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

NonNegativeFloat = Annotated[float, Field(ge=0)]


class EmulatorSettings(BaseModel):
    """Everything `create_emulator_app` needs. Host, port and the start-up delay belong to the
    CLI, which binds the socket; they are not part of the app."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    served_model_names: tuple[str, ...] = Field(("tiny",), min_length=1)
    """Names the engine answers to; the first one is used when a request names none, and is
    the `model_name` label of every metric (as in vLLM)."""
    max_model_len: int = Field(512, gt=1)
    lora_modules: dict[str, str] = Field(default_factory=dict)
    """LoRA adapters, name to path (vLLM's `--lora-modules name=path`): listed by /v1/models
    with their base model as parent, and served like it."""
    tokenizer: Path | None = None
    """A Hugging Face model folder (tokenizer.json, tokenizer_config.json): count tokens with
    `engine.tokenization.PromptTokenizer`. Without it, the built-in word rule counts."""
    max_num_seqs: int = Field(256, gt=0)
    """Requests generating at once; the others wait (vllm:num_requests_waiting)."""
    ttft_ms: NonNegativeFloat = 0.0
    """Delay before the first token of a request, once it runs."""
    tokens_per_second: NonNegativeFloat = 0.0
    """Rate of each request's stream after its first token; 0 means as fast as possible."""
    latency_ms: NonNegativeFloat = 0.0
    """Extra delay before every request on every path is handled (a slow engine)."""
    multi_step_bug: bool = False
    """Reproduce kserve#3971: a generation with no max_tokens (or max_tokens 0) kills the
    engine loop."""
    on_death: Literal["stay", "exit"] = "stay"
    """After the engine loop died: keep serving 500s and a 503 /health (V0 and
    VLLM_KEEP_ALIVE_ON_ENGINE_DEATH), or shut the server down (V1). Exiting is the CLI's
    doing (it watches `EngineCore.exit_requested`); an app served in-process stays up."""
    exit_code: int = Field(0, ge=0, le=255)
    """Exit status of every emulated engine exit (death with on_death=exit, die_on). 0 by
    default, as vllm#48966: a supervisor must treat any exit as a failure."""
    die_on: str | None = Field(None, min_length=1)
    """A request whose prompt contains this marker ends the process at once (os._exit)."""
    hang_on: str | None = Field(None, min_length=1)
    """A request whose prompt contains this marker stalls all generation for good, while
    /health keeps answering 200 (vllm#39863)."""
    hold_tokenize_on: str | None = Field(None, min_length=1)
    """A /tokenize whose text contains this marker is held open, never answered, until the
    process dies (its connection is then reset): the death window of an admission exchange.
    It prints `emulator holding /tokenize until the process dies` when it begins."""
    hold_tokenize_once: Path | None = None
    """With `hold_tokenize_on`: hold once across restarts. The first hold creates this file; a
    process that finds it answers marked /tokenize requests normally (a supervised engine is
    restarted with the same flags)."""
    serve_completions: bool = True
    """Serve POST /v1/completions. Off: it answers 404 as any unknown path (a server that
    serves only chat, as some OpenAI-compatible predictors do)."""
    log_requests: bool = False
    """Print a uvicorn-style access-log line per request on stdout, as vLLM does."""
    control: bool = False
    """Serve the run-time control endpoints (control.py): not part of vLLM's API."""
    version: str = "0.32.0"
    """What GET /version reports."""

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every name a request may give: the served names, then the LoRA adapters."""
        return (*self.served_model_names, *self.lora_modules)
