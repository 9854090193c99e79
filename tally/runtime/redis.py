"""The `redis.asyncio` client: a single Redis or a Redis Cluster, chosen by settings."""

from __future__ import annotations

from typing import Any, TypeAlias

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from tally.runtime.config import Settings

RedisClient: TypeAlias = "Redis | RedisCluster"


def create_redis(settings: Settings, **options: Any) -> RedisClient:
    """Builds the client; keys that must live together carry `{hash tags}` so both modes work."""
    common: dict[str, Any] = {"decode_responses": False, "socket_timeout": 2.0, "socket_connect_timeout": 2.0}
    common.update(options)
    if settings.redis_cluster:
        return RedisCluster.from_url(settings.redis_url, **common)
    return Redis.from_url(settings.redis_url, **common)
