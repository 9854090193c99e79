"""The local stack without Docker: PostgreSQL+TimescaleDB, Redis, the four services and Envoy.

`make run` calls `python -m tally.devstack run`; the test fixtures use the same classes on free
loopback ports. PostgreSQL refuses to run as root, so when we are root its `initdb`/`pg_ctl`
run as the `postgres` user via `runuser`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tally.runtime.config import DEFAULT_GRPC_PORTS, ServiceName

ROOT = Path(__file__).resolve().parent.parent
PG_BIN = Path("/usr/lib/postgresql/15/bin")


_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_port() -> int:
    """A loopback port free now and not handed out before by this process. Components pick
    their ports well before they bind them (a suite's services and gateway when it is built, a
    receiver when it is made), and the kernel may offer a port again while it is still unbound:
    two components given one port would talk to each other's clients."""
    with _handed_out_lock:
        while True:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def wait_for_port(port: int, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before port {port} opened")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


def _unprivileged_user() -> str | None:
    """The user PostgreSQL runs as: `postgres` when we are root, else ourselves (None)."""
    return "postgres" if os.geteuid() == 0 else None


def _as_user(user: str | None, command: list[str]) -> list[str]:
    return ["runuser", "-u", user, "--", *command] if user else command


def _make_accessible(path: Path, user: str | None) -> None:
    """Creates `path` owned by `user`, checking that the user can reach it."""
    path.mkdir(parents=True, exist_ok=True)
    if user:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)
        probe = subprocess.run(_as_user(user, ["test", "-w", str(path)]), check=False)
        if probe.returncode != 0:
            raise RuntimeError(f"user {user} cannot write {path}; put the data folder where it can (UB_DATA_DIR)")


@dataclass
class Postgres:
    data_dir: Path
    port: int
    password: str
    user: str = "tally"
    database: str = "tally"
    log_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_file = self.data_dir.parent / "postgres.log"
        self._os_user = _unprivileged_user()

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, command: list[str], **kwargs: object) -> None:
        subprocess.run(_as_user(self._os_user, command), check=True, stdout=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]

    def initialize(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        _make_accessible(self.data_dir, self._os_user)
        pwfile = self.data_dir.parent / ".pgpass-init"
        pwfile.write_text(self.password + "\n")
        if self._os_user:
            entry = pwd.getpwnam(self._os_user)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        pwfile.chmod(0o600)
        try:
            self._run(
                [
                    str(PG_BIN / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    self.user,
                    "--pwfile",
                    str(pwfile),
                    "--auth-host=scram-sha-256",
                    "--auth-local=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                    # Text sorts and compares bytewise (the same order as C.UTF-8 for UTF-8 text)
                    # without going through the locale: a quarter of the ingest statement's cost
                    # was strcoll in its unique-index and rollup-index comparisons.
                    "--lc-collate=C",
                ]
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def start(self, extra_settings: Mapping[str, str] | None = None) -> None:
        self.initialize()
        settings = {
            "port": str(self.port),
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.data_dir),
            "shared_preload_libraries": "timescaledb",
            "timescaledb.telemetry_level": "off",
            "max_connections": "200",
            "shared_buffers": "2GB",
            "max_wal_size": "4GB",
            "wal_compression": "on",
            # A new WAL segment is not zero-filled first: on a young database (every segment new,
            # none yet recycled) the zero-fill was a seventh of the server's CPU under ingest load.
            "wal_init_zero": "off",
            "max_locks_per_transaction": "256",
            **(extra_settings or {}),
        }
        options = " ".join(f"-c {key}={value}" for key, value in settings.items())
        if self._os_user:
            self.log_file.touch()
            entry = pwd.getpwnam(self._os_user)
            os.chown(self.log_file, entry.pw_uid, entry.pw_gid)
        self._run(
            [
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "start",
            ]
        )
        self._ensure_database()

    def _ensure_database(self) -> None:
        env = {**os.environ, "PGPASSWORD": self.password}
        base = ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-v", "ON_ERROR_STOP=1", "-tAq"]
        found = subprocess.run(
            [*base, "-d", "postgres", "-c", f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'"],  # noqa: S608
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        if found != "1":
            subprocess.run([*base, "-d", "postgres", "-c", f'CREATE DATABASE "{self.database}"'], env=env, check=True)

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            subprocess.run(
                _as_user(self._os_user, [str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"]),
                check=False,
                stdout=subprocess.DEVNULL,
            )


@dataclass
class Redis:
    data_dir: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *extra: str) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.data_dir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
                "--logfile",
                str(self.data_dir / "redis.log"),
                *extra,
            ],
            stdin=subprocess.DEVNULL,
        )
        wait_for_port(self.port, 20, self.process)

    def stop(self) -> None:
        stop_process(self.process)


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@dataclass
class RedisClusterNodes:
    """A local Redis Cluster of `len(ports)` masters and no replicas (for tests and benchmarks).
    Ports come from `free_cluster_port()`: each node also listens on port + 10000 (the bus)."""

    data_dir: Path
    ports: list[int]
    nodes: list[Redis] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A seed node; with `REDIS_CLUSTER=true` the client discovers the others."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> None:
        for port in self.ports:
            node = Redis(self.data_dir / f"node-{port}", port)
            self.nodes.append(node)
            node.start(
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "5000",
            )
        cli = shutil.which("redis-cli") or "redis-cli"
        addresses = [f"127.0.0.1:{p}" for p in self.ports]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = [
                subprocess.run(
                    [cli, "-p", str(port), "cluster", "info"], capture_output=True, text=True, check=False
                ).stdout
                for port in self.ports
            ]
            if all("cluster_state:ok" in state for state in states):
                return
            time.sleep(0.1)
        raise TimeoutError("the Redis Cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@dataclass
class MailSink:
    """An SMTP server on loopback (aiosmtpd) that keeps every message in a Maildir folder, so
    `make run` sends no email anywhere."""

    mail_dir: Path
    port: int
    log_file: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.mail_dir.mkdir(parents=True, exist_ok=True)
        output = None if self.log_file is None else self.log_file.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                f"127.0.0.1:{self.port}",
                "-c",
                "aiosmtpd.handlers.Mailbox",
                str(self.mail_dir),
            ],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )
        wait_for_port(self.port, 20, self.process)

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 15) -> int | None:
    if process is None or process.poll() is not None:
        return None if process is None else process.returncode
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def wait_for_grpc_health(address: str, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"service at {address} exited with {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"service at {address} not SERVING within {timeout}s")


@dataclass
class Suite:
    """The four services and the gateway as child processes sharing one environment."""

    env: dict[str, str]
    log_dir: Path | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def _spawn(self, name: str, module: str) -> subprocess.Popen[bytes]:
        output = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            output = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", module],
            env=self.env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )
        self.processes[name] = process
        return process

    def start_service(self, service: ServiceName) -> subprocess.Popen[bytes]:
        process = self._spawn(service.value, f"services.{service.value}")
        address = self.env.get(f"{service.value.upper()}_ADDRESS", f"127.0.0.1:{DEFAULT_GRPC_PORTS[service]}")
        wait_for_grpc_health(address, 60, process)
        return process

    def start_gateway(self) -> subprocess.Popen[bytes]:
        process = self._spawn("gateway", "gateway")
        wait_for_port(int(self.env.get("GATEWAY_PORT", "5002")), 30, process)
        return process

    def start_all(self) -> None:
        # Migrations run once here, so the services start without racing for the lock.
        subprocess.run([sys.executable, "-m", "tally.runtime.migrate"], env=self.env, cwd=ROOT, check=True)
        for service in ServiceName:
            self.start_service(service)
        self.start_gateway()

    def respawn(self, name: str) -> subprocess.Popen[bytes]:
        """Starts a process of the suite again (without waiting for it: see `supervise`)."""
        return self._spawn(name, "gateway" if name == "gateway" else f"services.{name}")

    def stop(self, name: str) -> int | None:
        return stop_process(self.processes.pop(name, None))

    def stop_all(self) -> None:
        for name in reversed(list(self.processes)):
            self.stop(name)


def read_or_create_secret(path: Path, nbytes: int = 24) -> str:
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(nbytes)
    path.write_text(value + "\n")
    path.chmod(0o600)
    return value


@contextlib.contextmanager
def local_stack(data_dir: Path, env: dict[str, str]) -> Iterator[Suite]:
    """PostgreSQL and Redis under `data_dir`, then the suite; everything stops on exit."""
    pg = Postgres(
        data_dir / "postgres" / "data",
        int(env.get("UB_POSTGRES_PORT", "55432")),
        read_or_create_secret(data_dir / "postgres.password"),
    )
    redis = Redis(data_dir / "redis", int(env.get("UB_REDIS_PORT", "56379")))
    # Email goes to a local sink (mail kept in data_dir/mail) unless SMTP_HOST/SMTP_PORT are set.
    mail = None if "SMTP_HOST" in env or "SMTP_PORT" in env else MailSink(data_dir / "mail", free_port())
    suite_env = {
        **env,
        "DATABASE_URL": pg.url,
        "DATABASE_PASSWORD": pg.password,
        "REDIS_URL": redis.url,
        "MIGRATE_ON_START": "false",
    }
    if mail is not None:
        suite_env.update({"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(mail.port)})
    suite = Suite(suite_env, log_dir=data_dir / "logs")
    try:
        pg.start()
        # As docker-compose: an append-only file, so open reservations, the enforcement event
        # stream and the live counters outlive a restart (tests and benches run without one).
        redis.start("--appendonly", "yes", "--appendfsync", "everysec")
        if mail is not None:
            mail.log_file = data_dir / "logs" / "mail-sink.log"
            mail.log_file.parent.mkdir(parents=True, exist_ok=True)
            mail.start()
        suite.start_all()
        yield suite
    finally:
        suite.stop_all()
        if mail is not None:
            mail.stop()
        redis.stop()
        pg.stop()


def _load_demo(suite: Suite, events: int, days: int) -> None:
    """Sends demo traffic (tally.demo) through ingest, once: skipped when usage is already stored."""
    import asyncio

    import psycopg

    from tally.demo import load

    with psycopg.connect(suite.env["DATABASE_URL"], password=suite.env["DATABASE_PASSWORD"]) as conn:
        row = conn.execute("SELECT EXISTS (SELECT 1 FROM usage_events)").fetchone()
    if row is not None and row[0]:
        print("demo data: usage already stored, not loading it again", flush=True)
        return
    print(f"demo data: sending {events:,} events over {days} days through ingest ...", flush=True)
    address = suite.env.get("INGEST_ADDRESS", f"127.0.0.1:{DEFAULT_GRPC_PORTS[ServiceName.INGEST]}")
    accepted = asyncio.run(load(address, suite.env["ADMIN_MASTER_KEY"], events, days))
    print(f"demo data: {accepted:,} events accepted", flush=True)


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tally.devstack run", description="Run the whole suite locally.")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("UB_DATA_DIR", ROOT / ".data")))
    args = parser.parse_args(argv)
    env = dict(os.environ)
    key = env.get("ADMIN_MASTER_KEY") or read_or_create_secret(args.data_dir / "master-key")
    env["ADMIN_MASTER_KEY"] = key
    env.setdefault("END_USER_HASH_KEY", read_or_create_secret(args.data_dir / "end-user-hash-key", 32))
    demo = env.get("DEMO", "") not in ("", "0", "false")
    if demo:  # demo history reaches back DEMO_DAYS: ingest must accept events that old
        env.setdefault("INGEST_LATE_WINDOW_SECONDS", str((int(env.get("DEMO_DAYS", "90")) + 2) * 86400))
    stop_requested = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    with local_stack(args.data_dir.resolve(), env) as suite:
        if demo:
            _load_demo(suite, int(env.get("DEMO_EVENTS", "200000")), int(env.get("DEMO_DAYS", "90")))
        port = env.get("GATEWAY_PORT", "5002")
        grpc_addresses = ", ".join(
            f"{s.value} {suite.env.get(s.value.upper() + '_ADDRESS', f'127.0.0.1:{DEFAULT_GRPC_PORTS[s]}')}"
            for s in ServiceName
        )
        print(
            f"\nTally is running.\n"
            f"  REST admin API: http://localhost:{port}/api/admin/  (OpenAPI at /api/admin/openapi.json)\n"
            f"  gRPC services:  {grpc_addresses}\n"
            f"  master key:     {key}\n"
            f"  logs:           {args.data_dir / 'logs'}\n"
            f"  email (SMTP):   {suite.env.get('SMTP_HOST')}:{suite.env.get('SMTP_PORT')}"
            f" (local sink keeps mail in {args.data_dir / 'mail'})\n\n"
            f"  curl -H 'Authorization: Bearer {key}' http://localhost:{port}/api/admin/analytics/pipeline-health\n\n"
            f"Ctrl-C stops everything.\n",
            flush=True,
        )
        supervise(suite.processes, suite.respawn, lambda: stop_requested)
    return 0


def supervise(
    processes: dict[str, subprocess.Popen[bytes]],
    respawn: Callable[[str], object],
    stopping: Callable[[], bool],
    *,
    first_delay: float = 1.0,
    max_delay: float = 30.0,
    stable_seconds: float = 60.0,
    poll_seconds: float = 0.5,
) -> None:
    """Restarts any process of `processes` that exits, until `stopping()`: after `first_delay`
    seconds, doubling with each exit in a row up to `max_delay`; a process that has run
    `stable_seconds` starts over from `first_delay`. (Every service picks up where it left off:
    ingest's clients retry unacknowledged batches, budget rebuilds, outboxes resume.)"""
    exits: dict[str, int] = {}  # exits in a row
    due: dict[str, float] = {}  # name -> when to start it again
    started = dict.fromkeys(processes, time.monotonic())
    while not stopping():
        now = time.monotonic()
        for name, process in list(processes.items()):
            if process.poll() is None:
                if now - started.get(name, now) >= stable_seconds:
                    exits.pop(name, None)
                continue
            if name not in due:
                exits[name] = exits.get(name, 0) + 1
                delay = min(max_delay, first_delay * 2 ** (exits[name] - 1))
                due[name] = now + delay
                print(f"{name} exited with {process.returncode}; starting it again in {delay:g} s", file=sys.stderr)
            elif now >= due[name]:
                del due[name]
                respawn(name)
                started[name] = now
        time.sleep(poll_seconds)


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] != "run":
        print("usage: python -m tally.devstack run [--data-dir DIR]", file=sys.stderr)
        return 2
    return run(sys.argv[2:])


if __name__ == "__main__":
    raise SystemExit(main())
