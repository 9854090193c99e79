"""Wires the reporting service: its servicer and the resources it uses."""

from __future__ import annotations

from collections.abc import Sequence

from tally.reporting.v1 import reporting_pb2, reporting_pb2_grpc
from tally.runtime.server import Registration, Resources


class ReportingServicer(reporting_pb2_grpc.ReportingServiceServicer):
    """RPCs not overridden here answer UNIMPLEMENTED until their issue lands."""

    def __init__(self, resources: Resources) -> None:
        self._resources = resources


async def build(resources: Resources) -> Sequence[Registration]:
    return [
        Registration(
            # Until their issues land, unimplemented RPCs fall through to the generated base,
            # which answers UNIMPLEMENTED; mypy sees them as abstract.
            ReportingServicer(resources),  # type: ignore[abstract]
            reporting_pb2_grpc.add_ReportingServiceServicer_to_server,
            reporting_pb2.DESCRIPTOR.services_by_name["ReportingService"].full_name,
        )
    ]
