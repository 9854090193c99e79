"""Checks on the repository itself: generated code fresh, linters clean, compose consistent, and
`make run`'s supervision of the suite."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from gateway.__main__ import render_compose
from gateway.config import SERVICES
from tally.devstack import supervise
from tally.runtime.config import DEFAULT_GRPC_PORTS, DEFAULT_METRICS_PORTS, ServiceName, Settings

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(*command: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)


def test_generated_code_descriptor_and_openapi_are_fresh() -> None:
    result = run(sys.executable, "scripts/gen_protos.py", "--check")
    assert result.returncode == 0, result.stderr


def test_compose_envoy_config_is_fresh() -> None:
    assert (ROOT / "gateway" / "envoy.compose.yaml").read_text() == render_compose()


def test_buf_lint_clean() -> None:
    result = run(str(BIN / "buf"), "lint", cwd=ROOT / "protos")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_clean() -> None:
    result = run(str(BIN / "ruff"), "check", ".")
    assert result.returncode == 0, result.stdout


def test_mypy_clean() -> None:
    result = run(str(BIN / "mypy"))
    assert result.returncode == 0, result.stdout


def test_compose_describes_the_same_suite() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"timescaledb", "redis", "gateway", *(s.value for s in ServiceName)} <= set(services)
    assert services["timescaledb"]["image"].startswith("timescale/timescaledb:")
    assert services["gateway"]["image"].startswith("envoyproxy/envoy:")
    known_settings = {name.upper() for name in Settings.model_fields}
    for service in ServiceName:
        spec = services[service.value]
        env = spec["environment"]
        assert spec["command"][-1] == f"services.{service.value}"
        assert set(env) <= known_settings, set(env) - known_settings
        grpc_port = DEFAULT_GRPC_PORTS[service]
        metrics_port = DEFAULT_METRICS_PORTS[service]
        assert f"{grpc_port}:{grpc_port}" in spec["ports"]
        assert f"{metrics_port}:{metrics_port}" in spec["ports"]
        assert str(grpc_port) in " ".join(spec["healthcheck"]["test"])
        for other in ServiceName:
            assert env[f"{other.value.upper()}_ADDRESS"] == f"{other.value}:{DEFAULT_GRPC_PORTS[other]}"
            assert env[f"{other.value.upper()}_METRICS_PORT"] == str(DEFAULT_METRICS_PORTS[other])
        assert "timescaledb:5432" in env["DATABASE_URL"]
        assert "redis:6379" in env["REDIS_URL"]
        assert set(spec["depends_on"]) == {"timescaledb", "redis"}
    # A process that exits is started again, as `make run` does (tally.devstack.supervise).
    assert all(spec.get("restart") == "unless-stopped" for spec in services.values())
    # The gateway's config routes each gRPC service to the compose service of the same name.
    envoy = yaml.safe_load((ROOT / "gateway" / "envoy.compose.yaml").read_text())
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    for service in ServiceName:
        endpoint = clusters[service.value]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        socket = endpoint["address"]["socket_address"]
        assert (socket["address"], socket["port_value"]) == (service.value, DEFAULT_GRPC_PORTS[service])
    listener = envoy["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert f"{listener['port_value']}:{listener['port_value']}" in services["gateway"]["ports"]
    mounts = " ".join(services["gateway"]["volumes"])
    assert "envoy.compose.yaml" in mounts
    assert "descriptor.pb" in mounts
    assert "openapi.json" in mounts


def test_defaults_agree_with_settings() -> None:
    settings = Settings.model_validate({"admin_master_key": "x"})
    for service in ServiceName:
        assert settings.grpc_port_of(service) == DEFAULT_GRPC_PORTS[service]
        assert settings.metrics_port_of(service) == DEFAULT_METRICS_PORTS[service]
    assert set(SERVICES) == set(ServiceName)
    assert settings.gateway_port == 5002


def test_readme_documents_every_setting_and_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name.upper() for name in Settings.model_fields if f"`{name.upper()}`" not in readme]
    assert not missing, f"README lacks {missing}"
    assert "make run" in readme
    assert "make test" in readme


def test_readme_documents_every_metric() -> None:
    import re

    readme = (ROOT / "README.md").read_text()
    defined: set[str] = set()
    for path in [*ROOT.glob("services/**/*.py"), *ROOT.glob("tally/**/*.py")]:
        if "_pb2" in path.name:
            continue
        text = path.read_text()
        defined |= set(re.findall(r'(?:Counter|Gauge|Histogram)\(\s*"(tally_[a-z0-9_]+)"', text))
    missing = sorted(name for name in defined if f"`{name}`" not in readme)
    assert defined, "no metric found: the pattern is out of date"
    assert not missing, f"README's metrics table lacks {missing}"


def test_no_service_imports_another_services_internals() -> None:
    """Services talk gRPC; shared code lives in tally/ (runtime, usage, notify)."""
    import re

    offenders = []
    for path in ROOT.glob("services/*/**/*.py"):
        own = path.relative_to(ROOT / "services").parts[0]
        for other in re.findall(r"^\s*(?:from|import) services\.(\w+)", path.read_text(), flags=re.MULTILINE):
            if other != own:
                offenders.append(f"{path.relative_to(ROOT)} imports services.{other}")
    assert not offenders, offenders


def test_make_run_starts_a_process_that_exits_again_with_a_growing_delay() -> None:
    """`make run` supervises the suite: a process that exits is started again, after 1 s, then
    2 s, ... (here scaled down), and the others are left alone."""

    def sleeper() -> subprocess.Popen[bytes]:
        return subprocess.Popen(["sleep", "60"])

    processes = {"ingest": sleeper(), "budget": sleeper()}
    respawned: list[tuple[str, float]] = []
    stop = threading.Event()

    def respawn(name: str) -> None:
        at = time.monotonic()
        processes[name] = sleeper()
        respawned.append((name, at))  # after the new process is in place: the test kills that one next

    thread = threading.Thread(
        target=supervise,
        args=(processes, respawn, stop.is_set),
        kwargs={"first_delay": 0.2, "max_delay": 0.4, "stable_seconds": 30, "poll_seconds": 0.01},
    )
    thread.start()
    try:
        began = time.monotonic()
        for round_ in range(3):
            processes["ingest"].kill()
            deadline = time.monotonic() + 5
            while len(respawned) <= round_ and time.monotonic() < deadline:
                time.sleep(0.01)
        assert [name for name, _ in respawned] == ["ingest"] * 3
        waits = [at - began for _, at in respawned]
        # 0.2, then 0.4, then 0.4 (the cap) after each exit
        assert waits[0] >= 0.2 and waits[1] - waits[0] >= 0.4 and waits[2] - waits[1] >= 0.4
        assert processes["budget"].poll() is None
    finally:
        stop.set()
        thread.join()
        for process in processes.values():
            process.kill()
            process.wait()
