"""CPU time of the request limits per request, in-process: what `gateway.hardening`'s two steps
cost a request that uses none of the fields they read (the presence check alone), and what the
checks cost the requests that do use them.

    .venv/bin/python bench/limits_cost.py

Each row times `watched` + `check_generation` (the first step, with the tiny model's
vocabulary) and `check_output_budget` (the second) on one body, repeated; the best of five
rounds is reported, in microseconds per request, so other load on the machine shows less.
Compare with the whole admission's cost per request in `make bench` (about 1 ms and up).
"""

from __future__ import annotations

import base64
import io
import timeit
from pathlib import Path
from typing import Any

from PIL import Image

from gateway.config import Limits, OnExceed, Policy, PolicyMode
from gateway.limits import check_generation, check_output_budget, watched
from gateway.policy import Admit, decide
from gateway.schemas import parse_chat, parse_completion
from gateway.vocab import read_vocabulary

ROOT = Path(__file__).resolve().parent.parent
TEXT = "The quick brown fox jumps over the lazy dog. " * 10


def png(side: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (side, side)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": TEXT}], "max_tokens": 1,
            **fields}  # fmt: skip


SCHEMA = {
    "type": "object",
    "properties": {f"field{i}": {"type": "string", "maxLength": 40} for i in range(20)},
    "required": [f"field{i}" for i in range(20)],
}
ROWS: list[tuple[str, bool, dict[str, Any]]] = [
    ("ordinary chat (no limited field)", True, chat(temperature=0.7, stream=True)),
    ("ordinary completion", False, {"model": "tiny", "prompt": TEXT, "max_tokens": 1}),
    ("chat with stop strings", True, chat(stop=["\n\n", "User:"])),
    ("chat with logit_bias of 100 ids", True, chat(logit_bias={str(i): 1 for i in range(100)})),
    ("completion of 2,000 token ids", False,
     {"model": "tiny", "prompt": list(range(2000)), "max_tokens": 1}),
    ("chat with a 20-property json schema", True,
     chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})),
    ("chat with a 512x512 inline png", True,
     chat(messages=[{"role": "user", "content": [
         {"type": "text", "text": "what is it"},
         {"type": "image_url", "image_url": {"url": png(512)}}]}])),
]  # fmt: skip


def main() -> None:
    vocab = read_vocabulary(ROOT / "models" / "tiny")
    limits = Limits()
    policy = Policy()
    print(f"{'request':<40} {'us/request':>11}")
    print("-" * 52)
    for name, is_chat, body in ROWS:
        view = parse_chat(body) if is_chat else parse_completion(body)
        decision = decide(view, policy, [100] * view.num_prompts, 65536)
        assert isinstance(decision, Admit)

        def steps(
            body: dict[str, Any] = body,
            view: Any = view,
            decision: Admit = decision,
            is_chat: bool = is_chat,
        ) -> None:
            if watched(body, chat=is_chat, limits=limits):
                check_generation(
                    body, chat=is_chat, limits=limits, vocab=vocab, mode=PolicyMode.ENFORCE
                )
            check_output_budget(decision, view, body, limits, OnExceed.CLAMP)

        number = 2000
        best = min(timeit.repeat(steps, number=number, repeat=5)) / number
        print(f"{name:<40} {best * 1e6:>11.1f}")


if __name__ == "__main__":
    main()
