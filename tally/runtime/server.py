"""Runs one service: a `grpc.aio` server with health, reflection, metrics and graceful shutdown.

A service supplies a `build` function that receives the process's shared `Resources` and
returns its servicers (`Registration`s). `run_service` does everything else, the same way for
all four services.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tally.runtime.access import ApiKeyVerifier, method_permissions
from tally.runtime.audit import AuditWriter
from tally.runtime.config import ServiceName, Settings, load_settings
from tally.runtime.db import Database
from tally.runtime.interceptor import CallInterceptor
from tally.runtime.logging import configure_logging
from tally.runtime.metrics import serve_metrics
from tally.runtime.migrate import apply_migrations
from tally.runtime.redis import RedisClient, create_redis

log = logging.getLogger("tally.server")

# Keepalive and message limits suited to batch ingest (10,000 events per call) and streams.
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


@dataclass
class Resources:
    """What a service process shares between its servicers, built once at start-up."""

    service: ServiceName
    settings: Settings
    db: Database
    redis: RedisClient
    # Coroutines to await on shutdown, after the server stopped (background tasks, clients).
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


@dataclass(frozen=True)
class Registration:
    """A servicer, the generated `add_XServicer_to_server` and the full service name."""

    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    full_name: str
    # Short method names of request-path RPCs, logged at DEBUG rather than once per call at INFO.
    quiet_methods: frozenset[str] = frozenset()


Build = Callable[[Resources], Awaitable[Sequence[Registration]]]


async def serve(
    service: ServiceName,
    settings: Settings,
    build: Build,
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serves until `stop` is set (or SIGTERM/SIGINT), then shuts down gracefully."""
    if settings.migrate_on_start:
        applied = await apply_migrations(settings)
        if applied:
            log.info("applied migrations", extra={"versions": applied})
    db = Database(settings)
    await db.open()
    resources = Resources(service=service, settings=settings, db=db, redis=create_redis(settings))
    registrations = await build(resources)

    quiet = frozenset(f"/{r.full_name}/{m}" for r in registrations for m in r.quiet_methods)
    # After build: a service may have replaced the pool (ingest does).
    auditor = AuditWriter(
        resources.db,
        queue_size=settings.audit_queue_size,
        batch_size=settings.audit_batch_size,
        flush_seconds=settings.audit_flush_seconds,
    )
    interceptor = CallInterceptor(
        settings.admin_master_key,
        quiet,
        permissions=method_permissions(r.full_name for r in registrations),
        verifier=ApiKeyVerifier(resources.db, on_use=auditor.key_used),
        auditor=auditor,
    )
    auditor.start()
    server = grpc.aio.server(interceptors=[interceptor], options=SERVER_OPTIONS)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for registration in registrations:
        registration.add_to_server(registration.servicer, server)
    names = [r.full_name for r in registrations]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)

    address = f"{settings.grpc_bind_host}:{settings.grpc_port_of(service)}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"cannot bind {address}")
    serve_metrics(settings.metrics_bind_host, settings.metrics_port_of(service))
    await server.start()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving", extra={"address": address, "services": names})

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    await stop.wait()

    log.info("shutting down", extra={"graceSeconds": settings.shutdown_grace_seconds})
    await health_servicer.enter_graceful_shutdown()
    await server.stop(settings.shutdown_grace_seconds)
    for close in reversed(resources.closers):
        await close()
    await auditor.close()
    await resources.redis.aclose()
    await resources.db.close()
    log.info("stopped")


def run_service(service: ServiceName, build: Build) -> None:
    """Entry point of `python -m services.<name>`."""
    settings = load_settings()
    configure_logging(service.value, settings.log_level)
    asyncio.run(serve(service, settings, build))
