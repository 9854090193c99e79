"""Builds Envoy's configuration: one listener transcoding REST to gRPC, one cluster per service.

The same builder renders the local config (services on loopback addresses from the settings)
and the committed `envoy.compose.yaml` (compose service names), so both run the same gateway.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.bodycheck import HEADER, body_check_lua
from tally.runtime.config import ServiceName, Settings

GATEWAY_DIR = Path(__file__).resolve().parent
DESCRIPTOR_PATH = GATEWAY_DIR / "descriptor.pb"
OPENAPI_PATH = GATEWAY_DIR / "openapi.json"

# gRPC service full names, per owning service process.
SERVICES: dict[ServiceName, str] = {
    ServiceName.INGEST: "tally.ingest.v1.IngestService",
    ServiceName.ANALYTICS: "tally.analytics.v1.AnalyticsService",
    ServiceName.BUDGET: "tally.budget.v1.BudgetService",
    ServiceName.REPORTING: "tally.reporting.v1.ReportingService",
}
# Downloads stream for as long as they need; other calls get a generous ceiling.
_ROUTE_TIMEOUTS = {ServiceName.REPORTING: "0s"}
_DEFAULT_ROUTE_TIMEOUT = "120s"
_MAX_BODY = 64 * 1024 * 1024


@dataclass(frozen=True)
class GatewayLayout:
    """Where Envoy listens, finds each service, and reads its descriptor and OpenAPI files."""

    listen_host: str
    listen_port: int
    admin_host: str
    admin_port: int
    upstreams: dict[ServiceName, tuple[str, int]]
    descriptor_path: str
    openapi_path: str

    @classmethod
    def from_settings(cls, settings: Settings) -> GatewayLayout:
        upstreams = {}
        for service in ServiceName:
            host, port = settings.address_of(service).rsplit(":", 1)
            upstreams[service] = (host, int(port))
        return cls(
            listen_host=settings.gateway_host,
            listen_port=settings.gateway_port,
            admin_host="127.0.0.1",
            admin_port=settings.gateway_admin_port,
            upstreams=upstreams,
            descriptor_path=str(DESCRIPTOR_PATH),
            openapi_path=str(OPENAPI_PATH),
        )


def _error_body(status: str) -> dict[str, Any]:
    return {
        "success": False,
        "error": {
            "httpStatus": "%RESPONSE_CODE%",
            "status": status,
            "message": "%LOCAL_REPLY_BODY%",
            "reason": "%RESPONSE_CODE_DETAILS%",
        },
    }


# Envoy's own error replies in the services' error shape, with the gRPC status name of each HTTP
# status it produces (the services' errors carry theirs).
_LOCAL_REPLY_STATUS = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 405: "UNIMPLEMENTED",
    413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}  # fmt: skip


def _status_is(op: str, code: int) -> dict[str, Any]:
    return {
        "status_code_filter": {
            "comparison": {"op": op, "value": {"default_value": code, "runtime_key": "tally.local_reply_status"}}
        }
    }


def _local_reply_mappers() -> list[dict[str, Any]]:
    unknown_field = {
        "filter": {"header_filter": {"header": {"name": HEADER, "present_match": True}}},
        "body_format_override": {
            "json_format": {
                "success": False,
                "error": {
                    "httpStatus": "%RESPONSE_CODE%",
                    "status": "INVALID_ARGUMENT",
                    "message": "%LOCAL_REPLY_BODY%",
                    "details": [
                        {
                            "@type": "type.googleapis.com/google.rpc.BadRequest",
                            "fieldViolations": [
                                {"field": "%REQ(" + HEADER + ")%", "description": "is not a field of this request"}
                            ],
                        }
                    ],
                },
            },
            "content_type": "application/json",
        },
    }
    by_status = [
        {
            "filter": _status_is("EQ", code),
            "body_format_override": {"json_format": _error_body(name), "content_type": "application/json"},
        }
        for code, name in _LOCAL_REPLY_STATUS.items()
    ]
    other = {
        "filter": _status_is("GE", 400),
        "body_format_override": {"json_format": _error_body("UNKNOWN"), "content_type": "application/json"},
    }
    return [unknown_field, *by_status, other]


# gRPC errors arrive from the transcoder as a google.rpc.Status JSON ({"code": 3, "message": ...,
# "details": [...]}); this wraps them in the contract's envelope with the HTTP status and the
# status name, so every error body has one shape: {"success": false, "error": {...}}.
_ERROR_ENVELOPE_LUA = """
local names = {[1]="CANCELLED", [2]="UNKNOWN", [3]="INVALID_ARGUMENT", [4]="DEADLINE_EXCEEDED",
  [5]="NOT_FOUND", [6]="ALREADY_EXISTS", [7]="PERMISSION_DENIED", [8]="RESOURCE_EXHAUSTED",
  [9]="FAILED_PRECONDITION", [10]="ABORTED", [11]="OUT_OF_RANGE", [12]="UNIMPLEMENTED",
  [13]="INTERNAL", [14]="UNAVAILABLE", [15]="DATA_LOSS", [16]="UNAUTHENTICATED"}
-- The transcoder's own refusals (a value of the wrong type, an unknown query parameter) name the
-- field in their message, by its proto name: add the field violation, by its JSON name.
local function with_field_violation(text)
  if not string.find(text, '"reason":"[%w_]*grpc_json_transcode_failure', 1) then return nil end
  local s = string.find(text, '"message":"', 1, true)
  if s == nil then return nil end
  local first, q = s + 11, s + 11
  while true do
    local a = string.find(text, '[\\\\"]', q)
    if a == nil then return nil end
    if string.byte(text, a) == 92 then q = a + 2 else q = a break end
  end
  local message = string.sub(text, first, q - 1)
  -- An unknown query parameter is named as given; a field of the request by its proto name.
  local field = string.match(message, '^Could not find field \\\\"([%w_%.%-]+)\\\\"')
  if field == nil then
    field = string.match(message, '^([%w_%.%[%]]+): ')
    if field == nil then return nil end
    field = string.gsub(field, "_(%l)", string.upper)
  end
  return '{"success":false,"error":{"httpStatus":400,"status":"INVALID_ARGUMENT","message":"' .. message
    .. '","details":[{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"'
    .. field .. '","description":"' .. message .. '"}]}]}}'
end

function envoy_on_response(handle)
  local status = tonumber(handle:headers():get(":status"))
  if status == nil or status < 400 then return end
  local ctype = handle:headers():get("content-type") or ""
  if not string.find(ctype, "application/json", 1, true) then return end
  local body = handle:body()
  if body == nil then return end
  local text = body:getBytes(0, body:length())
  if status == 400 then
    local rewritten = with_field_violation(text)
    if rewritten ~= nil then
      body:setBytes(rewritten)
      return
    end
  end
  local code = string.match(text, '^{"code":(%d+)')
  if code == nil then return end
  local name = names[tonumber(code)] or "UNKNOWN"
  body:setBytes('{"success":false,"error":{"httpStatus":' .. status .. ',"status":"' .. name .. '",'
    .. string.sub(text, 2) .. '}')
end
"""


_HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def _method_not_allowed_routes() -> list[dict[str, Any]]:
    """A request the transcoder did not take whose path is a REST route's (so its method is not
    one of the route's) is answered 405 with the methods allowed. Paths with no variable first,
    so `/virtual-keys/compare` is not taken for `/virtual-keys/{keyId}`."""
    paths: dict[str, list[str]] = json.loads(OPENAPI_PATH.read_text())["paths"]
    routes = []
    for template in sorted(paths, key=lambda t: ("{" in t, t)):
        regex = "^" + "[^/]+".join(re.escape(part) for part in re.split(r"\{[^}]*\}", template)) + "$"
        allowed = ", ".join(verb.upper() for verb in paths[template])
        routes.append(
            {
                "match": {"safe_regex": {"regex": regex}},
                "direct_response": {"status": 405, "body": {"inline_string": f"this path allows {allowed}"}},
                "response_headers_to_add": [
                    {"header": {"key": "allow", "value": allowed}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                ],
            }
        )
    return routes


def _cluster(service: ServiceName, host: str, port: int) -> dict[str, Any]:
    return {
        "name": service.value,
        "type": "STRICT_DNS",
        "connect_timeout": "2s",
        "dns_lookup_family": "V4_ONLY",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": service.value,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}
            ],
        },
    }


def build_envoy_config(layout: GatewayLayout) -> dict[str, Any]:
    routes: list[dict[str, Any]] = [
        {
            "match": {"prefix": f"/{full_name}/"},
            "route": {"cluster": service.value, "timeout": _ROUTE_TIMEOUTS.get(service, _DEFAULT_ROUTE_TIMEOUT)},
        }
        for service, full_name in SERVICES.items()
    ]
    routes.append(
        {
            "match": {"path": "/api/admin/openapi.json"},
            "direct_response": {"status": 200, "body": {"filename": layout.openapi_path}},
            "response_headers_to_add": [
                {
                    "header": {"key": "content-type", "value": "application/json"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
        }
    )
    routes += _method_not_allowed_routes()
    routes.append(
        {
            "match": {"prefix": "/"},
            "direct_response": {"status": 404, "body": {"inline_string": "no route matches this method and path"}},
        }
    )
    transcoder = {
        "name": "envoy.filters.http.grpc_json_transcoder",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            "proto_descriptor": layout.descriptor_path,
            "services": list(SERVICES.values()),
            "print_options": {
                "add_whitespace": False,
                "always_print_primitive_fields": True,
                "always_print_enums_as_ints": False,
                "preserve_proto_field_names": False,
            },
            "convert_grpc_status": True,
            "request_validation_options": {"reject_unknown_query_parameters": True},
            "case_insensitive_enum_parsing": True,
            "max_request_body_size": _MAX_BODY,
            "max_response_body_size": _MAX_BODY,
        },
    }
    connection_manager = {
        "@type": _HCM_TYPE,
        "stat_prefix": "admin_api",
        "codec_type": "AUTO",
        "generate_request_id": True,
        # Append the peer's address to x-forwarded-for (the services' audit log reads the last
        # entry as the client IP; earlier entries are whatever the client claimed).
        "use_remote_address": True,
        "stream_idle_timeout": "300s",
        "route_config": {
            "name": "admin_api",
            "max_direct_response_body_size_bytes": 8 * 1024 * 1024,
            "virtual_hosts": [{"name": "tally", "domains": ["*"], "routes": routes}],
        },
        # Envoy's own error replies (no route, bad JSON, unknown query parameter or body field)
        # as JSON bodies.
        "local_reply_config": {"mappers": _local_reply_mappers()},
        "http_filters": [
            {
                "name": "envoy.filters.http.lua",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                    "default_source_code": {
                        "inline_string": _ERROR_ENVELOPE_LUA + body_check_lua(DESCRIPTOR_PATH.read_bytes())
                    },
                },
            },
            transcoder,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    return {
        # Bounds downstream connections (and silences Envoy's warning that none is set).
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3."
                        "DownstreamConnectionsConfig",
                        "max_active_downstream_connections": 10_000,
                    },
                }
            ]
        },
        "admin": {"address": {"socket_address": {"address": layout.admin_host, "port_value": layout.admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "admin_api",
                    "per_connection_buffer_limit_bytes": _MAX_BODY,
                    "address": {"socket_address": {"address": layout.listen_host, "port_value": layout.listen_port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": connection_manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [_cluster(s, *layout.upstreams[s]) for s in ServiceName],
        },
    }
