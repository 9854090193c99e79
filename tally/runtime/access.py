"""Roles, permissions and API keys: who may call what.

Each RPC declares the permission it requires in the protos
(`option (tally.options.v1.required_permission) = PERMISSION_...`, protos/tally/options/v1).
`method_permissions` reads those options from the service descriptors once, at start; a role
grants a set of permissions (`ROLE_PERMISSIONS`). Callers authenticate with
`Authorization: Bearer <secret>`: the master key from `ADMIN_MASTER_KEY` is the bootstrap admin;
API keys are created through the API (`POST /api/admin/api-keys`) and look like
`tally_<key id, 32 hex>_<random secret>`. Only the SHA-256 of the random part is stored, and the
id in the token makes the lookup one primary-key read. There is no cache: a revoked or expired
key is refused on its next call, in every process.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf import descriptor_pool

from tally.options.v1 import options_pb2
from tally.runtime.db import Database

Permission = int  # a tally.options.v1.Permission value

ROLES = ("admin", "analyst", "billing", "operator", "gateway")

ROLE_PERMISSIONS: dict[str, frozenset[Permission]] = {
    "admin": frozenset(v for v in options_pb2.Permission.values() if v != options_pb2.PERMISSION_UNSPECIFIED),
    "analyst": frozenset({options_pb2.PERMISSION_ANALYTICS_READ, options_pb2.PERMISSION_EXPORTS_READ}),
    "billing": frozenset({options_pb2.PERMISSION_BILLING_EXPORT, options_pb2.PERMISSION_BUDGETS_READ}),
    "operator": frozenset(
        {
            options_pb2.PERMISSION_HEALTH_READ,
            options_pb2.PERMISSION_INGESTION_READ,
            options_pb2.PERMISSION_RECALCULATE,
        }
    ),
    "gateway": frozenset({options_pb2.PERMISSION_USAGE_WRITE, options_pb2.PERMISSION_BUDGET_EVENTS_WATCH}),
}

# Request-path permissions: calls that need one of these are not audited (too hot).
REQUEST_PATH_PERMISSIONS = frozenset({options_pb2.PERMISSION_USAGE_WRITE, options_pb2.PERMISSION_BUDGET_EVENTS_WATCH})

TOKEN_PREFIX = "tally_"  # noqa: S105 (the public prefix of API key tokens, not a secret)
_TOKEN = re.compile(r"^tally_([0-9a-f]{32})_([A-Za-z0-9_-]{20,200})$")


def permission_name(permission: Permission) -> str:
    """`PERMISSION_ANALYTICS_READ` -> `analytics_read`."""
    return options_pb2.Permission.Name(permission).removeprefix("PERMISSION_").lower()  # type: ignore[arg-type]


def method_permissions(full_service_names: Iterable[str]) -> dict[str, Permission]:
    """Full method path (`/tally.budget.v1.BudgetService/Authorize`) -> required permission.

    Raises when a method declares none: an RPC nobody thought about is not served."""
    pool = descriptor_pool.Default()
    permissions: dict[str, Permission] = {}
    missing: list[str] = []
    for name in full_service_names:
        for method in pool.FindServiceByName(name).methods:
            path = f"/{name}/{method.name}"
            value = method.GetOptions().Extensions[options_pb2.required_permission]
            if value == options_pb2.PERMISSION_UNSPECIFIED:
                missing.append(path)
            permissions[path] = value
    if missing:
        raise RuntimeError(f"RPCs without (tally.options.v1.required_permission): {', '.join(missing)}")
    return permissions


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: "master" or an API key id, and its role."""

    id: str
    role: str

    def may(self, permission: Permission) -> bool:
        return permission in ROLE_PERMISSIONS.get(self.role, frozenset())


MASTER = Principal("master", "admin")


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_token(key_id: uuid.UUID) -> tuple[str, bytes]:
    """A fresh API key token and the hash stored for it."""
    import secrets

    secret = secrets.token_urlsafe(32)
    return f"{TOKEN_PREFIX}{key_id.hex}_{secret}", hash_secret(secret)


def display_prefix(token: str) -> str:
    """What ListApiKeys shows to recognise a key: `tally_` and the first 8 hex of its id."""
    return token[: len(TOKEN_PREFIX) + 8]


def looks_like_api_key(token: str) -> bool:
    return token.startswith(TOKEN_PREFIX)


class ApiKeyVerifier:
    """Resolves an API key token to its principal with one primary-key read (no cache).

    `on_use(key_id)` is told of every accepted key (the audit writer records `last_used_at`)."""

    def __init__(self, db: Database, on_use: Callable[[str], None] | None = None) -> None:
        self._db = db
        self._on_use = on_use

    async def verify(self, token: str) -> Principal | None:
        match = _TOKEN.match(token)
        if match is None:
            return None
        key_id = uuid.UUID(hex=match.group(1))
        row = await self._db.fetch_one(
            "SELECT role, secret_sha256, expires_at, revoked_at FROM api_keys WHERE api_key_id = %s", (key_id,)
        )
        if row is None:
            return None
        role, digest, expires_at, revoked_at = row["role"], row["secret_sha256"], row["expires_at"], row["revoked_at"]
        if not hmac.compare_digest(bytes(digest), hash_secret(match.group(2))):
            return None
        if revoked_at is not None or (expires_at is not None and expires_at <= datetime.now(UTC)):
            return None
        if self._on_use is not None:
            self._on_use(str(key_id))
        return Principal(str(key_id), str(role))
