"""Rejects JSON request bodies that name a field the request message does not have.

Envoy's transcoder drops unknown JSON fields silently (the proto3 JSON mapping's lenient
default, and it has no option to refuse them): a misspelled `filters` exported every key, a
misspelled top-level key of a full-replacement PUT turned alerts off, a misspelled token count
would bill nothing. So a Lua filter before the transcoder walks each JSON body of a route with a
body and answers 400 naming the first unknown field (its JSON path, e.g. `events[3].inputTokenz`).

The schema of every route's body is generated here from the descriptor set: per message, its
fields by both JSON names the transcoder accepts (camelCase and the proto name), each marked as a
nested message (checked inside), free (a map, Struct, Value or Any: keys are data) or a leaf.
Types and values are left to the transcoder and the services.
"""

from __future__ import annotations

import re

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor_pb2 import FieldDescriptorProto as F

from gateway.openapi import http_routes

LEAF, FREE = 0, -1
_FREE_TYPES = {".google.protobuf.Struct", ".google.protobuf.Value", ".google.protobuf.Any"}
_LEAF_TYPES = {
    ".google.protobuf.Timestamp", ".google.protobuf.Duration", ".google.protobuf.ListValue",
    ".google.protobuf.FieldMask", ".google.protobuf.DoubleValue", ".google.protobuf.FloatValue",
    ".google.protobuf.Int64Value", ".google.protobuf.UInt64Value", ".google.protobuf.Int32Value",
    ".google.protobuf.UInt32Value", ".google.protobuf.BoolValue", ".google.protobuf.StringValue",
    ".google.protobuf.BytesValue",
}  # fmt: skip
_PATH_VAR = re.compile(r"\{[^}]*\}")
HEADER = "x-tally-invalid-field"


def _messages(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, descriptor_pb2.DescriptorProto]:
    out: dict[str, descriptor_pb2.DescriptorProto] = {}

    def add(prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{message.name}"
        out[name] = message
        for nested in message.nested_type:
            add(name, nested)

    for file in fds.file:
        for message in file.message_type:
            add(f".{file.package}" if file.package else "", message)
    return out


class _Schemas:
    """Message schemas numbered from 1, as Lua tables: {json name = child}."""

    def __init__(self, messages: dict[str, descriptor_pb2.DescriptorProto]) -> None:
        self.messages = messages
        self.numbers: dict[str, int] = {}
        self.tables: list[dict[str, int]] = []

    def number(self, type_name: str) -> int:
        if type_name in _FREE_TYPES:
            return FREE
        if type_name in _LEAF_TYPES:
            return LEAF
        if type_name not in self.numbers:
            self.numbers[type_name] = len(self.tables) + 1
            table: dict[str, int] = {}
            self.tables.append(table)
            for field in self.messages[type_name].field:
                child = LEAF
                if field.type == F.TYPE_MESSAGE:
                    entry = self.messages.get(field.type_name)
                    child = FREE if entry is not None and entry.options.map_entry else self.number(field.type_name)
                table[field.json_name or field.name] = child
                table[field.name] = child
        return self.numbers[type_name]


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def body_check_lua(descriptor_set: bytes) -> str:
    """The Lua source of the check (an `envoy_on_request`), for every route with a JSON body."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
    schemas = _Schemas(_messages(fds))
    routes: list[tuple[str, str, int]] = []
    for _file, _service, method, verb, template, rule in http_routes(fds):
        if rule.body != "*":
            continue
        pattern = "^" + "[^/]+".join(re.escape(part).replace("\\", "%") for part in _PATH_VAR.split(template))
        routes.append((verb.upper(), pattern + "$", schemas.number(method.input_type)))
    tables = ",\n".join(
        "  {" + ", ".join(f"[{_lua_string(name)}] = {child}" for name, child in sorted(table.items())) + "}"
        for table in schemas.tables
    )
    route_rows = ",\n".join(
        f"  {{{_lua_string(verb)}, {_lua_string(pattern)}, {number}}}" for verb, pattern, number in routes
    )
    return f"""
local SCHEMAS = {{
{tables}
}}
local ROUTES = {{
{route_rows}
}}
{_SCANNER}"""


# Walks the JSON text keeping, per open object or array, the schema of its members; a key the
# object's schema lacks ends the walk with its path. Malformed JSON is left to the transcoder.
_SCANNER = f"""
local function path_of(kinds, keys, depth)
  local parts = {{}}
  for d = 1, depth do
    if kinds[d] == "o" then
      if #parts > 0 then parts[#parts + 1] = "." end
      parts[#parts + 1] = keys[d]
    elseif keys[d] > 0 then
      parts[#parts + 1] = "[" .. (keys[d] - 1) .. "]"
    end
  end
  return table.concat(parts)
end

local function unknown_field(text, root)
  local kinds, schemas, keys = {{}}, {{}}, {{}}
  local depth, pos, value = 0, 1, root
  while true do
    local s, _, c = string.find(text, '([{{}}%[%]"])', pos)
    if not s then return nil end
    if c == '"' then
      local q = s + 1
      while true do
        local a = string.find(text, '[\\\\"]', q)
        if not a then return nil end
        if string.byte(text, a) == 92 then q = a + 2 else q = a break end
      end
      if depth > 0 and kinds[depth] == "o" and string.find(text, "^%s*:", q + 1) then
        local key = string.sub(text, s + 1, q - 1)
        keys[depth] = key
        local schema = schemas[depth]
        if schema > 0 then
          local child = SCHEMAS[schema][key]
          if child == nil then return path_of(kinds, keys, depth) end
          value = child
        else
          value = {FREE}
        end
      end
      pos = q + 1
    elseif c == "{{" or c == "[" then
      local schema = value
      if depth > 0 and kinds[depth] == "a" then
        schema = schemas[depth]
        if c == "{{" then keys[depth] = keys[depth] + 1 end
      elseif depth == 0 then
        schema = root
      end
      depth = depth + 1
      kinds[depth] = c == "{{" and "o" or "a"
      schemas[depth] = schema
      keys[depth] = c == "[" and 0 or ""
      value = {FREE}
      pos = s + 1
    else
      depth = depth - 1
      pos = s + 1
    end
  end
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local method = headers:get(":method")
  if method ~= "POST" and method ~= "PUT" and method ~= "PATCH" then return end
  local path = string.match(headers:get(":path") or "", "^[^?]*")
  local root = nil
  for _, route in ipairs(ROUTES) do
    if route[1] == method and string.find(path, route[2]) then root = route[3] break end
  end
  if root == nil or root <= 0 then return end
  local body = handle:body()
  if body == nil or body:length() == 0 then return end
  local field = unknown_field(body:getBytes(0, body:length()), root)
  if field == nil then return end
  handle:headers():add("{HEADER}", field)  -- headers taken before body() are out of scope
  handle:respond({{[":status"] = "400"}}, "unknown field " .. field)
end
"""
