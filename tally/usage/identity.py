"""End-user identity: raw end-user ids never reach storage, only this keyed hash does."""

from __future__ import annotations

import hashlib
import hmac

_CACHE_LIMIT = 100_000
# Per hash key: end-user id -> hash.
_user_hashes: dict[bytes, dict[str, str]] = {}


def hash_end_user(key: bytes, end_user_id: str) -> str:
    """HMAC-SHA256 of the id with END_USER_HASH_KEY, hex (cached: the same users recur)."""
    hashes = _user_hashes.get(key)
    if hashes is None:
        hashes = _user_hashes[key] = {}
    cached = hashes.get(end_user_id)
    if cached is None:
        cached = hmac.digest(key, end_user_id.encode(), hashlib.sha256).hex()
        if len(hashes) >= _CACHE_LIMIT:
            hashes.clear()
        hashes[end_user_id] = cached
    return cached
