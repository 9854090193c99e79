"""gRPC channels from one service to another (they never import each other's code)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from pydantic import SecretStr

from tally.runtime import context

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
]


def service_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


def call_metadata(master_key: SecretStr) -> Sequence[tuple[str, str]]:
    """Credentials plus the current correlation id, so one id follows a request across services."""
    metadata = [("authorization", f"Bearer {master_key.get_secret_value()}")]
    if cid := context.correlation_id.get():
        metadata.append(("x-correlation-id", cid))
    return metadata
