"""Shared pieces of the benchmarks: a private stack on free ports, percentiles, results files."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tally.devstack import Postgres, Redis, Suite, free_port, read_or_create_secret
from tally.runtime.config import ServiceName

RESULTS = Path(__file__).resolve().parent / "results"


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set size."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by process `pid`; NaN once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds_by_group(groups: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each named pid, plus all `postgres` and `redis-server` processes."""
    ticks = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {name: 0.0 for name in [*groups, "postgres", "redis"]}
    by_pid = {pid: name for name, pid in groups.items()}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        used = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        pid = int(entry.name)
        if pid in by_pid:
            totals[by_pid[pid]] += used
        elif comm == "postgres":
            totals["postgres"] += used
        elif comm.startswith("redis-server"):
            totals["redis"] += used
    return totals


def write_results(name: str, figures: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    return path


@contextlib.contextmanager
def bench_stack(
    services: Sequence[ServiceName], extra_env: dict[str, str] | None = None, keep: Path | None = None
) -> Iterator[Suite]:
    """PostgreSQL+TimescaleDB, Redis and the given services in a temporary folder, or in `keep`,
    which is left in place (with its database) for the next run to reuse."""
    root = keep if keep is not None else Path(tempfile.mkdtemp(prefix="tally-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    postgres = Postgres(root / "postgres" / "data", free_port(), read_or_create_secret(root / "postgres.password"))
    redis = Redis(root / "redis", free_port())
    env = dict(os.environ)
    env.update(
        {
            "ADMIN_MASTER_KEY": secrets.token_urlsafe(24),
            "END_USER_HASH_KEY": secrets.token_urlsafe(32),
            "DATABASE_URL": postgres.url,
            "DATABASE_PASSWORD": postgres.password,
            "REDIS_URL": redis.url,
            "LOG_LEVEL": "WARNING",
            "GATEWAY_PORT": str(free_port()),
            "GATEWAY_ADMIN_PORT": str(free_port()),
            "MIGRATE_ON_START": "false",
            **(extra_env or {}),
        }
    )
    for service in ServiceName:
        env[f"{service.value.upper()}_ADDRESS"] = f"127.0.0.1:{free_port()}"
        env[f"{service.value.upper()}_METRICS_PORT"] = str(free_port())
    suite = Suite(env, log_dir=root / "logs")
    try:
        postgres.start()
        redis.start()
        import subprocess
        import sys

        subprocess.run([sys.executable, "-m", "tally.runtime.migrate"], env=env, check=True)
        for service in services:
            suite.start_service(service)
        yield suite
    finally:
        suite.stop_all()
        redis.stop()
        postgres.stop()
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
