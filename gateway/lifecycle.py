"""The gateway's own lifecycle state."""

from __future__ import annotations


class Lifecycle:
    """Whether the gateway is draining: on SIGTERM /ready answers 503 at once and new
    generation requests are refused, while those in flight finish."""

    __slots__ = ("draining",)

    def __init__(self) -> None:
        self.draining = False
