"""The one server interceptor every service installs.

For each call it: takes the correlation id from `x-correlation-id` (or Envoy's `x-request-id`)
or makes one; authenticates `authorization: Bearer <key>` (the master key, compared in memory,
or an API key, one primary-key read) and checks the role grants the permission the RPC declares
in the protos (tally/runtime/access.py); records the caller's deadline so SQL statements stop
with it; converts domain errors into `google.rpc.Status` with details; counts and times the call
for Prometheus; logs failures as JSON; and hands every admin call (not the request path) to the
audit writer. Health and reflection stay open so probes and tooling work without the key.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import psycopg
import redis.exceptions
from grpc_status import rpc_status
from psycopg_pool import PoolTimeout
from pydantic import SecretStr

from tally.options.v1 import options_pb2
from tally.runtime import context, metrics
from tally.runtime.access import (
    MASTER,
    REQUEST_PATH_PERMISSIONS,
    ApiKeyVerifier,
    Permission,
    Principal,
    looks_like_api_key,
    permission_name,
)
from tally.runtime.audit import AuditEntry, AuditWriter
from tally.runtime.errors import (
    DeadlineExceeded,
    PermissionDenied,
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


def as_service_error(exc: BaseException, method: str) -> ServiceError | None:
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


def caller_error(exc: BaseException, method: str) -> ServiceError:
    """The error the caller sees for `exc`: an unexpected one is logged and becomes INTERNAL
    naming the call's correlation id; unavailable dependencies and deadlines are logged as warnings."""
    error = as_service_error(exc, method)
    if error is None:
        log.error("unhandled error", exc_info=exc)
        return ServiceError(f"internal error (correlation id {context.correlation_id.get()})")
    if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        log.warning("%s: %s", error.code.name, error.message, extra={"cause": repr(exc)})
    return error


class _Call:
    """State of one call between the interceptor and the wrapped handler."""

    __slots__ = (
        "auditor",
        "code",
        "correlation_id",
        "forwarded_for",
        "log_level",
        "method",
        "permission",
        "principal",
        "request",
        "service",
        "short_method",
        "started",
        "token",
        "verifier",
    )

    def __init__(self, method: str, correlation_id: str, principal: Principal | None, log_level: int) -> None:
        self.log_level = log_level
        self.method = method
        _, _, rest = method.partition("/")
        self.service, _, self.short_method = rest.partition("/")
        self.correlation_id = correlation_id
        self.principal = principal
        self.started = time.perf_counter()
        self.code: grpc.StatusCode | None = None
        self.permission: Permission = options_pb2.PERMISSION_ADMIN
        self.token: str | None = None  # a bearer token still to verify as an API key
        self.verifier: ApiKeyVerifier | None = None
        self.auditor: AuditWriter | None = None  # set when this call is audited
        self.forwarded_for: str | None = None
        self.request: Any = None

    async def admit(self) -> None:
        """Authenticates an API key (the master key was checked already) and checks the role."""
        if self.principal is None and self.token is not None and self.verifier is not None:
            self.principal = await self.verifier.verify(self.token)
        if self.principal is None:
            raise Unauthenticated("missing or invalid credentials: send 'Authorization: Bearer <key>'")
        if not self.principal.may(self.permission):
            raise PermissionDenied(
                f"role {self.principal.role!r} lacks the {permission_name(self.permission)!r} permission"
                f" required by {self.short_method}",
                metadata={"role": self.principal.role, "permission": permission_name(self.permission)},
            )

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
        if self.auditor is not None:
            self._audit(ctx, code, elapsed)
        if log.isEnabledFor(self.log_level):
            log.log(self.log_level, "rpc finished", extra={"code": code.name, "durationMs": round(elapsed * 1000, 3)})
        for var, token in reversed(tokens):
            var.reset(token)

    def _audit(self, ctx: grpc.aio.ServicerContext, code: grpc.StatusCode, elapsed: float) -> None:
        assert self.auditor is not None
        principal = self.principal
        self.auditor.record(
            AuditEntry(
                time=datetime.now(UTC) - timedelta(seconds=elapsed),
                operation=self.method.lstrip("/"),
                principal=principal.id if principal is not None else "anonymous",
                role=principal.role if principal is not None else "",
                request=self.request,
                client_ip=_client_ip(self.forwarded_for, ctx),
                correlation_id=self.correlation_id,
                status_code=code.name,
                duration_ms=round(elapsed * 1000, 3),
            )
        )

    async def fail(self, ctx: grpc.aio.ServicerContext, exc: BaseException) -> None:
        """Aborts the call with the status `exc` maps to (raises grpc.aio.AbortError)."""
        error = caller_error(exc, self.method)
        self.code = error.code
        await ctx.abort_with_status(rpc_status.to_status(error.to_status()))


def _client_ip(forwarded_for: str | None, ctx: grpc.aio.ServicerContext) -> str:
    """The last x-forwarded-for entry (the address Envoy saw), else the gRPC peer's address."""
    if forwarded_for:
        return forwarded_for.rsplit(",", 1)[-1].strip()
    peer = ctx.peer() or ""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = address.rsplit(":", 1)[0]
        return host.strip("[]")
    return peer


def _code_of(ctx: grpc.aio.ServicerContext) -> grpc.StatusCode:
    code = ctx.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK


class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """`quiet_methods` (full method paths) are request-path RPCs logged at DEBUG, not INFO.

    `permissions` maps full method paths to the permission each declares (`access.method_permissions`);
    a method missing from it needs the admin permission. Without a `verifier` only the master key
    is accepted; without an `auditor` nothing is audited."""

    def __init__(
        self,
        master_key: SecretStr,
        quiet_methods: frozenset[str] = frozenset(),
        *,
        permissions: dict[str, Permission] | None = None,
        verifier: ApiKeyVerifier | None = None,
        auditor: AuditWriter | None = None,
    ) -> None:
        self._expected = master_key.get_secret_value().encode()
        self._quiet = quiet_methods
        self._permissions = permissions or {}
        self._verifier = verifier
        self._auditor = auditor

    @staticmethod
    def _bearer(header: str | None) -> str | None:
        if header is None:
            return None
        scheme, _, token = header.strip().partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

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
        token = self._bearer(headers.get("authorization"))
        is_master = token is not None and hmac.compare_digest(token.encode(), self._expected)
        call = _Call(method, correlation_id, MASTER if is_master else None, level)
        call.permission = self._permissions.get(method, options_pb2.PERMISSION_ADMIN)
        if not is_master and token is not None and self._verifier is not None and looks_like_api_key(token):
            call.token, call.verifier = token, self._verifier
        if self._auditor is not None and call.permission not in REQUEST_PATH_PERMISSIONS:
            call.auditor = self._auditor
            call.forwarded_for = headers.get("x-forwarded-for")
        return _wrap(handler, call)


def _wrap(handler: grpc.RpcMethodHandler, call: _Call) -> grpc.RpcMethodHandler:
    if handler.unary_unary or handler.stream_unary:
        inner = handler.unary_unary or handler.stream_unary

        async def respond(request: Any, ctx: grpc.aio.ServicerContext) -> Any:
            tokens = call.enter(ctx)
            call.request = request
            try:
                if call.principal is not MASTER:
                    await call.admit()
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
        call.request = request
        try:
            if call.principal is not MASTER:
                await call.admit()
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
