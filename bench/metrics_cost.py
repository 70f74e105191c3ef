"""CPU time the metrics add per request, in-process: `Metrics.request_finished` for a typical
finished chat request (non-streamed answer with usage; a stream without usage), and one scrape
of GET /metrics's text with a few models and label sets in use.

    .venv/bin/python bench/metrics_cost.py [--n 200000] [--repeat 5]

Each figure is the best of `--repeat` runs (the machine is shared: the best is the least
disturbed).

The end-to-end figure of `bench/admission_cost.py` (CPU per request of the gateway process, read
from /proc at a 10 ms tick) cannot resolve a few microseconds; this times the recording itself.
"""

from __future__ import annotations

import argparse
import json
import time

from gateway.config import parse_config
from gateway.metrics import Metrics
from gateway.requestlog import Outcome, RequestRecord

BODY = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "tiny",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi " * 40}}],
        "usage": {"prompt_tokens": 15, "total_tokens": 23, "completion_tokens": 8},
    }
).encode()


def _record(*, usage: bytes | None) -> RequestRecord:
    record = RequestRecord("id", "POST", "/v1/chat/completions")
    now = time.perf_counter()
    record.model, record.endpoint, record.status = "tiny", "chat", 200
    record.outcome = Outcome.OK
    record.policy_action = "kept"
    record.sent, record.first_byte, record.last_byte = now, now, now
    record.usage = usage
    return record


def _per_call(fn: object, n: int) -> float:
    assert callable(fn)
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    config = parse_config({"models": {"tiny": {}, "other": {}}})
    served = {"tiny": 512, "other": 512}
    metrics = Metrics(lambda: (config, served))
    whole, stream = _record(usage=BODY), _record(usage=None)
    for _ in range(1000):  # warm: label children made
        metrics.request_finished(whole)
    n = args.n
    rows = [
        ("request_finished, JSON answer with usage", lambda: metrics.request_finished(whole), n),
        ("request_finished, stream without usage", lambda: metrics.request_finished(stream), n),
        ("one scrape (exposition text)", metrics.exposition, max(n // 1000, 50)),
    ]
    for name, fn, count in rows:
        best = min(_per_call(fn, count) for _ in range(args.repeat))
        print(f"{name:45s} {best * 1e6:8.2f} µs")


if __name__ == "__main__":
    main()
