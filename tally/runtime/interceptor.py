"""The one server interceptor every service installs.

For each call it: takes the correlation id from `x-correlation-id` (or Envoy's `x-request-id`)
or makes one; checks `authorization: Bearer <master key>`; records the caller's deadline so SQL
statements stop with it; converts domain errors into `google.rpc.Status` with details; counts
and times the call for Prometheus; and logs failures as JSON. Health and reflection stay open
so probes and tooling work without the key.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import psycopg
import redis.exceptions
from grpc_status import rpc_status
from psycopg_pool import PoolTimeout
from pydantic import SecretStr

from tally.runtime import context, metrics
from tally.runtime.errors import (
    DeadlineExceeded,
    ServiceError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)

log = logging.getLogger("tally.rpc")

PUBLIC_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def _as_service_error(exc: BaseException, method: str) -> ServiceError | None:
    """Maps an exception escaping a handler to the error the caller should see."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, NotImplementedError):
        return Unimplemented(f"{method} is not implemented yet")
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return DeadlineExceeded("the query was cancelled at the call's deadline")
    if isinstance(exc, PoolTimeout | psycopg.OperationalError):
        return Unavailable("the database is unavailable", metadata={"dependency": "postgresql"})
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return Unavailable("redis is unavailable", metadata={"dependency": "redis"})
    return None


class _Call:
    """State of one call between the interceptor and the wrapped handler."""

    __slots__ = ("authenticated", "code", "correlation_id", "log_level", "method", "service", "short_method", "started")

    def __init__(self, method: str, correlation_id: str, authenticated: bool, log_level: int) -> None:
        self.log_level = log_level
        self.method = method
        _, _, rest = method.partition("/")
        self.service, _, self.short_method = rest.partition("/")
        self.correlation_id = correlation_id
        self.authenticated = authenticated
        self.started = time.perf_counter()
        self.code: grpc.StatusCode | None = None

    def enter(self, ctx: grpc.aio.ServicerContext) -> list[Any]:
        metrics.RPC_STARTED.labels(self.service, self.short_method).inc()
        remaining = ctx.time_remaining()
        return [
            (context.correlation_id, context.correlation_id.set(self.correlation_id)),
            (context.rpc_method, context.rpc_method.set(self.method)),
            (context.deadline, context.deadline.set(None if remaining is None else time.monotonic() + remaining)),
        ]

    def leave(self, tokens: list[Any], ctx: grpc.aio.ServicerContext) -> None:
        code = self.code or _code_of(ctx)
        elapsed = time.perf_counter() - self.started
        metrics.RPC_HANDLED.labels(self.service, self.short_method, code.name).inc()
        metrics.RPC_LATENCY.labels(self.service, self.short_method).observe(elapsed)
        if log.isEnabledFor(self.log_level):
            log.log(self.log_level, "rpc finished", extra={"code": code.name, "durationMs": round(elapsed * 1000, 3)})
        for var, token in reversed(tokens):
            var.reset(token)

    async def fail(self, ctx: grpc.aio.ServicerContext, exc: BaseException) -> None:
        """Aborts the call with the status `exc` maps to (raises grpc.aio.AbortError)."""
        error = _as_service_error(exc, self.method)
        if error is None:
            log.error("unhandled error", exc_info=exc)
            error = ServiceError(f"internal error (correlation id {self.correlation_id})")
        elif error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            log.warning("%s: %s", error.code.name, error.message, extra={"cause": repr(exc)})
        self.code = error.code
        await ctx.abort_with_status(rpc_status.to_status(error.to_status()))


def _code_of(ctx: grpc.aio.ServicerContext) -> grpc.StatusCode:
    code = ctx.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK


class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """`quiet_methods` (full method paths) are request-path RPCs logged at DEBUG, not INFO."""

    def __init__(self, master_key: SecretStr, quiet_methods: frozenset[str] = frozenset()) -> None:
        self._expected = master_key.get_secret_value().encode()
        self._quiet = quiet_methods

    def _authenticated(self, header: str | None) -> bool:
        if header is None:
            return False
        scheme, _, token = header.strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._expected)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(PUBLIC_SERVICES):
            return handler
        headers = {key: value for key, value in details.invocation_metadata or () if isinstance(value, str)}
        correlation_id = headers.get("x-correlation-id") or headers.get("x-request-id") or uuid.uuid4().hex
        level = logging.DEBUG if method in self._quiet else logging.INFO
        call = _Call(method, correlation_id, self._authenticated(headers.get("authorization")), level)
        return _wrap(handler, call)


def _wrap(handler: grpc.RpcMethodHandler, call: _Call) -> grpc.RpcMethodHandler:
    unauthenticated = Unauthenticated("missing or invalid credentials: send 'Authorization: Bearer <key>'")

    if handler.unary_unary or handler.stream_unary:
        inner = handler.unary_unary or handler.stream_unary

        async def respond(request: Any, ctx: grpc.aio.ServicerContext) -> Any:
            tokens = call.enter(ctx)
            try:
                if not call.authenticated:
                    raise unauthenticated
                result = inner(request, ctx)
                if inspect.isawaitable(result):
                    result = await result
                return result
            except asyncio.CancelledError:
                call.code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await call.fail(ctx, exc)
            finally:
                call.leave(tokens, ctx)

        factory = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
        return factory(respond, handler.request_deserializer, handler.response_serializer)

    inner_stream = handler.unary_stream or handler.stream_stream

    async def stream(request: Any, ctx: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        tokens = call.enter(ctx)
        try:
            if not call.authenticated:
                raise unauthenticated
            produced = inner_stream(request, ctx)
            if inspect.isawaitable(produced):  # a handler that writes with ctx.write()
                await produced
            else:
                async for item in produced:
                    yield item
        except asyncio.CancelledError:
            call.code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await call.fail(ctx, exc)
        finally:
            call.leave(tokens, ctx)

    factory = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
    return factory(stream, handler.request_deserializer, handler.response_serializer)
