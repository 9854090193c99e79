"""Renders the OpenAPI 3.1 document of the REST admin API from the protos' descriptor set.

Paths, verbs, parameters and bodies come from the `google.api.http` annotations; schemas from
the messages, with their proto3 JSON (camelCase) names, so the document describes exactly what
Envoy's transcoder accepts and prints.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor_pb2 import FieldDescriptorProto as F

_SCALARS: dict[int, dict[str, Any]] = {
    F.TYPE_DOUBLE: {"type": "number"},
    F.TYPE_FLOAT: {"type": "number"},
    F.TYPE_INT64: {"type": "string", "format": "int64"},
    F.TYPE_UINT64: {"type": "string", "format": "uint64"},
    F.TYPE_SINT64: {"type": "string", "format": "int64"},
    F.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    F.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    F.TYPE_INT32: {"type": "integer", "format": "int32"},
    F.TYPE_UINT32: {"type": "integer", "format": "int32"},
    F.TYPE_SINT32: {"type": "integer", "format": "int32"},
    F.TYPE_FIXED32: {"type": "integer", "format": "int32"},
    F.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    F.TYPE_BOOL: {"type": "boolean"},
    F.TYPE_STRING: {"type": "string"},
    F.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    ".google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    ".google.protobuf.Duration": {"type": "string"},
    ".google.protobuf.ListValue": {"type": "array", "items": {}},
    ".google.protobuf.Struct": {"type": "object"},
    ".google.protobuf.Value": {},
    ".google.protobuf.Any": {"type": "object"},
}
_PATH_VAR = re.compile(r"\{([a-z0-9_.]+)(?:=[^}]*)?\}")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


class _Index:
    def __init__(self, fds: descriptor_pb2.FileDescriptorSet) -> None:
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
        self.comments: dict[str, str] = {}
        self.files = list(fds.file)
        for file in fds.file:
            prefix = f".{file.package}" if file.package else ""
            for message in file.message_type:
                self._add(prefix, message)
            for enum in file.enum_type:
                self.enums[f"{prefix}.{enum.name}"] = enum

    def _add(self, prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{message.name}"
        self.messages[name] = message
        for nested in message.nested_type:
            self._add(name, nested)
        for enum in message.enum_type:
            self.enums[f"{name}.{enum.name}"] = enum


class _Renderer:
    def __init__(self, index: _Index) -> None:
        self.index = index
        self.schemas: dict[str, dict[str, Any]] = {}

    def ref(self, type_name: str) -> dict[str, Any]:
        if type_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[type_name])
        key = type_name.lstrip(".")
        if key not in self.schemas:
            self.schemas[key] = {}  # placeholder breaks cycles
            self.schemas[key] = self.message_schema(type_name)
        return {"$ref": f"#/components/schemas/{key}"}

    def field_schema(self, field: descriptor_pb2.FieldDescriptorProto) -> dict[str, Any]:
        if field.type == F.TYPE_MESSAGE:
            message = self.index.messages.get(field.type_name)
            if message is not None and message.options.map_entry:
                value = message.field[1]
                return {"type": "object", "additionalProperties": self.field_schema(value)}
            schema = self.ref(field.type_name)
        elif field.type == F.TYPE_ENUM:
            enum = self.index.enums[field.type_name]
            schema = {"type": "string", "enum": [v.name for v in enum.value]}
        else:
            schema = dict(_SCALARS[field.type])
        if field.label == F.LABEL_REPEATED:
            return {"type": "array", "items": schema}
        return schema

    def message_schema(self, type_name: str) -> dict[str, Any]:
        message = self.index.messages[type_name]
        properties = {(field.json_name or _camel(field.name)): self.field_schema(field) for field in message.field}
        return {"type": "object", "properties": properties, "additionalProperties": False}


def http_routes(
    fds: descriptor_pb2.FileDescriptorSet,
) -> Iterator[
    tuple[
        descriptor_pb2.FileDescriptorProto,
        descriptor_pb2.ServiceDescriptorProto,
        descriptor_pb2.MethodDescriptorProto,
        str,
        str,
        http_pb2.HttpRule,
    ]
]:
    """Every REST route of the tally services: (file, service, method, verb, path template, rule)."""
    for file in fds.file:
        if not file.package.startswith("tally."):
            continue
        for service in file.service:
            for method in service.method:
                if not method.options.HasExtension(annotations_pb2.http):
                    continue
                rule: http_pb2.HttpRule = method.options.Extensions[annotations_pb2.http]
                verb = rule.WhichOneof("pattern")
                if verb is None or verb == "custom":
                    continue
                yield file, service, method, verb, getattr(rule, verb), rule


def render_openapi(descriptor_set: bytes) -> str:
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
    index = _Index(fds)
    renderer = _Renderer(index)
    paths: dict[str, dict[str, Any]] = {}
    for file, service, method, verb, template, rule in http_routes(fds):
        path_vars = _PATH_VAR.findall(template)
        oa_path = _PATH_VAR.sub(lambda m: "{" + _camel(m[1]) + "}", template)
        request = index.messages[method.input_type]
        parameters: list[dict[str, Any]] = [
            {"name": _camel(v), "in": "path", "required": True, "schema": {"type": "string"}} for v in path_vars
        ]
        operation: dict[str, Any] = {
            "operationId": f"{service.name}.{method.name}",
            "tags": [file.package.split(".")[1]],
            "security": [{"bearer": []}],
        }
        if rule.body == "*":
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": renderer.ref(method.input_type)}},
            }
        else:
            for field in request.field:
                if field.name in path_vars or field.type == F.TYPE_MESSAGE:
                    continue
                parameters.append(
                    {
                        "name": field.json_name or _camel(field.name),
                        "in": "query",
                        "required": False,
                        "schema": renderer.field_schema(field),
                    }
                )
        if parameters:
            operation["parameters"] = parameters
        if method.output_type == ".google.api.HttpBody":
            content: dict[str, Any] = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
        else:
            content = {"application/json": {"schema": renderer.ref(method.output_type)}}
        operation["responses"] = {
            "200": {"description": "OK", "content": content},
            "default": {
                "description": "Error: a google.rpc.Status as JSON (code, message, details).",
                "content": {"application/json": {"schema": renderer.ref(".google.rpc.Status")}},
            },
        }
        paths.setdefault(oa_path, {})[verb] = operation
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "Tally admin API",
            "version": "v1",
            "description": 'Usage & billing for LLM gateways. Every response is {"success": true, "data": ...}.',
        },
        "servers": [{"url": "http://localhost:5002"}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": dict(sorted(renderer.schemas.items())),
        },
        "paths": dict(sorted(paths.items())),
    }
    return json.dumps(document, indent=2, sort_keys=False) + "\n"
