"""Wires the budget service: its servicer and the resources it uses."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from services.budget.keys import VirtualKeyRecord, VirtualKeyRepository, validate_key_name
from tally.budget.v1 import budget_pb2, budget_pb2_grpc
from tally.runtime.errors import NotFound
from tally.runtime.server import Registration, Resources
from tally.runtime.validation import Violations, decode_page_token, encode_page_token, page_size, require_uuid


def _key_message(record: VirtualKeyRecord) -> budget_pb2.VirtualKey:
    message = budget_pb2.VirtualKey(
        key_id=str(record.key_id),
        key_name=record.key_name,
        enabled=record.enabled,
        is_test=record.is_test,
        disabled_reason=record.disabled_reason or "",
    )
    message.created_at.FromDatetime(record.created_at)
    return message


class BudgetServicer(budget_pb2_grpc.BudgetServiceServicer):
    """RPCs not overridden here answer UNIMPLEMENTED until their issue lands."""

    def __init__(self, resources: Resources) -> None:
        self._resources = resources
        self._keys = VirtualKeyRepository(resources.db)

    async def GetVirtualKey(
        self, request: budget_pb2.GetVirtualKeyRequest, context: grpc.aio.ServicerContext
    ) -> budget_pb2.GetVirtualKeyResponse:
        key_id = require_uuid(request.key_id, "keyId")
        record = await self._keys.get(key_id)
        if record is None:
            raise NotFound(f"virtual key {key_id} is unknown", metadata={"keyId": str(key_id)})
        return budget_pb2.GetVirtualKeyResponse(success=True, data=_key_message(record))

    async def UpdateVirtualKey(
        self, request: budget_pb2.UpdateVirtualKeyRequest, context: grpc.aio.ServicerContext
    ) -> budget_pb2.UpdateVirtualKeyResponse:
        violations = Violations()
        key_id = require_uuid(request.key_id, "keyId")
        name = validate_key_name(request.key_name, violations)
        violations.raise_if_any()
        record = await self._keys.upsert(key_id, name, request.is_test)
        return budget_pb2.UpdateVirtualKeyResponse(success=True, data=_key_message(record))

    async def ListVirtualKeys(
        self, request: budget_pb2.ListVirtualKeysRequest, context: grpc.aio.ServicerContext
    ) -> budget_pb2.ListVirtualKeysResponse:
        size = page_size(request.page_size)
        position = decode_page_token(request.page_token)
        after = (str(position[0]), str(position[1])) if position and len(position) == 2 else None
        records = await self._keys.page(size + 1, after)
        page = budget_pb2.VirtualKeyPage(keys=[_key_message(r) for r in records[:size]])
        if len(records) > size:
            last = records[size - 1]
            page.next_page_token = encode_page_token([last.key_name, str(last.key_id)])
        return budget_pb2.ListVirtualKeysResponse(success=True, data=page)


async def build(resources: Resources) -> Sequence[Registration]:
    return [
        Registration(
            # Until their issues land, unimplemented RPCs fall through to the generated base,
            # which answers UNIMPLEMENTED; mypy sees them as abstract.
            BudgetServicer(resources),  # type: ignore[abstract]
            budget_pb2_grpc.add_BudgetServiceServicer_to_server,
            budget_pb2.DESCRIPTOR.services_by_name["BudgetService"].full_name,
        )
    ]
