"""Per-call context carried through `contextvars`: correlation id, deadline, method."""

from __future__ import annotations

import time
from contextvars import ContextVar

correlation_id: ContextVar[str] = ContextVar("correlation_id", default="")
rpc_method: ContextVar[str] = ContextVar("rpc_method", default="")
# Absolute deadline on the `time.monotonic()` clock, or None when the caller set none.
deadline: ContextVar[float | None] = ContextVar("deadline", default=None)


def seconds_remaining() -> float | None:
    """Seconds left before the current call's deadline, or None without a deadline."""
    end = deadline.get()
    return None if end is None else end - time.monotonic()
