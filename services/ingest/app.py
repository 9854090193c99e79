"""Wires the ingest service: its servicer and the resources it uses."""

from __future__ import annotations

from collections.abc import Sequence

from tally.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from tally.runtime.server import Registration, Resources


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    """RPCs not overridden here answer UNIMPLEMENTED until their issue lands."""

    def __init__(self, resources: Resources) -> None:
        self._resources = resources


async def build(resources: Resources) -> Sequence[Registration]:
    return [
        Registration(
            # Until their issues land, unimplemented RPCs fall through to the generated base,
            # which answers UNIMPLEMENTED; mypy sees them as abstract.
            IngestServicer(resources),  # type: ignore[abstract]
            ingest_pb2_grpc.add_IngestServiceServicer_to_server,
            ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name,
        )
    ]
