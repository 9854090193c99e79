"""Fixtures that start the real parts on free loopback ports: PostgreSQL with TimescaleDB,
Redis, the four services and Envoy, the same way `make run` does (`tally.devstack`)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import psycopg
import pytest

from services.ingest.store import prepare_connection
from tally.devstack import ROOT, Postgres, Redis, Suite, free_port
from tally.runtime.config import ServiceName, Settings
from tally.runtime.db import Database
from tally.runtime.migrate import apply_migrations


@dataclass
class Stack:
    """A running suite: its environment (settings) and clients for it."""

    env: dict[str, str]
    suite: Suite
    postgres: Postgres
    redis: Redis
    root: Path

    @property
    def key(self) -> str:
        return self.env["ADMIN_MASTER_KEY"]

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.env['GATEWAY_PORT']}"

    def settings(self) -> Settings:
        return Settings.model_validate(
            {k.lower(): v for k, v in self.env.items() if k.lower() in Settings.model_fields}
        )

    def address(self, service: ServiceName) -> str:
        return self.env[f"{service.value.upper()}_ADDRESS"]

    def channel(self, service: ServiceName) -> grpc.Channel:
        return grpc.insecure_channel(self.address(service))

    def auth(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.key}")]

    def http(self, key: str | None = "default") -> httpx.Client:
        headers = {}
        if key is not None:
            headers["Authorization"] = f"Bearer {self.key if key == 'default' else key}"
        return httpx.Client(base_url=self.gateway_url, headers=headers, timeout=30)

    def log_text(self, name: str) -> str:
        assert self.suite.log_dir is not None
        return (self.suite.log_dir / f"{name}.log").read_text()


def stack_env(key: str) -> dict[str, str]:
    """Free loopback ports for every listener of a suite."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "GATEWAY_"))}
    env.update(
        {
            "ADMIN_MASTER_KEY": key,
            "END_USER_HASH_KEY": secrets.token_urlsafe(32),
            "LOG_LEVEL": "INFO",
            "GATEWAY_PORT": str(free_port()),
            "GATEWAY_ADMIN_PORT": str(free_port()),
            "SHUTDOWN_GRACE_SECONDS": "10",
            "INGEST_COMPACT_SECONDS": "1",
            "ANALYTICS_CONSISTENCY_CHECK_SECONDS": "1",
        }
    )
    for service in ServiceName:
        env[f"{service.value.upper()}_ADDRESS"] = f"127.0.0.1:{free_port()}"
        env[f"{service.value.upper()}_METRICS_PORT"] = str(free_port())
    return env


def fresh_database(postgres: Postgres, prefix: str) -> str:
    """A new, empty database on the shared PostgreSQL server; its URL."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(
        f"postgresql://{postgres.user}@127.0.0.1:{postgres.port}/postgres", password=postgres.password, autocommit=True
    ) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql://{postgres.user}@127.0.0.1:{postgres.port}/{name}"


@contextlib.contextmanager
def private_suite(
    infra: tuple[Postgres, Redis, Path], prefix: str, extra_env: dict[str, str]
) -> Iterator[tuple[dict[str, str], Suite, Path]]:
    """A whole suite of its own (fresh database, its own Redis) for tests that need exact global
    totals or change server-wide state. Yields its environment, the suite and its folder."""
    postgres, _redis, shared_root = infra
    root = shared_root / f"{prefix}-{secrets.token_hex(3)}"
    redis_server = Redis(root / "redis", free_port())
    env = stack_env(secrets.token_urlsafe(24))
    env.update(
        {
            "DATABASE_URL": fresh_database(postgres, prefix),
            "DATABASE_PASSWORD": postgres.password,
            "REDIS_URL": redis_server.url,
            "MIGRATE_ON_START": "false",
            **extra_env,
        }
    )
    suite = Suite(env, log_dir=root / "logs")
    try:
        redis_server.start()
        subprocess.run([sys.executable, "-m", "tally.runtime.migrate"], env=env, cwd=ROOT, check=True)
        suite.start_all()
        yield env, suite, root
    finally:
        suite.stop_all()
        redis_server.stop()


@pytest.fixture(scope="session")
def infra() -> Iterator[tuple[Postgres, Redis, Path]]:
    root = Path(tempfile.mkdtemp(prefix="tally-test-"))
    root.chmod(0o755)
    postgres = Postgres(root / "postgres" / "data", free_port(), secrets.token_urlsafe(16))
    redis = Redis(root / "redis", free_port())
    try:
        postgres.start({"fsync": "off", "synchronous_commit": "on", "shared_buffers": "256MB"})
        redis.start()
        yield postgres, redis, root
    finally:
        redis.stop()
        postgres.stop()
        if keep := os.environ.get("TALLY_TEST_LOGS"):  # keep service logs for debugging
            shutil.copytree(root / "logs", Path(keep), dirs_exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def stack(infra: tuple[Postgres, Redis, Path]) -> Iterator[Stack]:
    postgres, redis, root = infra
    env = stack_env(secrets.token_urlsafe(24))
    env.update(
        {
            "DATABASE_URL": postgres.url,
            "DATABASE_PASSWORD": postgres.password,
            "REDIS_URL": redis.url,
            "MIGRATE_ON_START": "false",
        }
    )
    suite = Suite(env, log_dir=root / "logs")
    try:
        suite.start_all()
        yield Stack(env, suite, postgres, redis, root)
    finally:
        suite.stop_all()


def settings_for_new_database(postgres: Postgres, name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("DATABASE_URL", fresh_database(postgres, name))
    monkeypatch.setenv("DATABASE_PASSWORD", postgres.password)
    monkeypatch.setenv("END_USER_HASH_KEY", "store-test-secret")
    monkeypatch.setenv("ADMIN_MASTER_KEY", "store-test-master-key")
    return Settings()


@pytest.fixture
async def database(infra: tuple[Postgres, Redis, Path], monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Database]:
    settings = settings_for_new_database(infra[0], "store", monkeypatch)
    await apply_migrations(settings)
    db = Database(settings, configure=prepare_connection)
    await db.open()
    try:
        yield db
    finally:
        await db.close()
