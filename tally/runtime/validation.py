"""Field validation helpers shared by the services; each failure names the camelCase field."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from typing import Any

from tally.runtime.errors import FieldViolation, InvalidArgument


def require_uuid(value: str, field: str) -> uuid.UUID:
    if not value:
        raise InvalidArgument.field(field, "required")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument.field(field, f"must be a UUID, got {value[:64]!r}") from None


def page_size(value: int, field: str = "pageSize", *, default: int = 100, maximum: int = 1000) -> int:
    if value < 0:
        raise InvalidArgument.field(field, "must not be negative")
    if value > maximum:
        raise InvalidArgument.field(field, f"must be at most {maximum}")
    return value or default


def encode_page_token(position: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode()


def decode_page_token(token: str, field: str = "pageToken") -> list[Any] | None:
    if not token:
        return None
    try:
        position = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (binascii.Error, ValueError):
        raise InvalidArgument.field(field, "not a token returned by this API") from None
    if not isinstance(position, list):
        raise InvalidArgument.field(field, "not a token returned by this API")
    return position


class Violations:
    """Collects every violation of a request, then raises them together."""

    def __init__(self) -> None:
        self._items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self._items.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self._items:
            raise InvalidArgument(self._items)
