"""Wires the analytics service: its servicer, the probes and the channels it uses."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from services.analytics.health import pipeline_health
from tally.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from tally.runtime.clients import service_channel
from tally.runtime.config import ServiceName
from tally.runtime.server import Registration, Resources


class AnalyticsServicer(analytics_pb2_grpc.AnalyticsServiceServicer):
    """RPCs not overridden here answer UNIMPLEMENTED until their issue lands."""

    def __init__(self, resources: Resources, peers: dict[str, grpc.aio.Channel | None]) -> None:
        self._resources = resources
        self._peers = peers

    async def GetPipelineHealth(
        self, request: analytics_pb2.GetPipelineHealthRequest, context: grpc.aio.ServicerContext
    ) -> analytics_pb2.GetPipelineHealthResponse:
        report = await pipeline_health(self._resources.db, self._resources.redis, self._peers)
        data = analytics_pb2.PipelineHealth(
            status=report.status,
            rollup_consistency=analytics_pb2.RollupConsistency(
                status="unknown", detail="rollups are not maintained yet"
            ),
        )
        data.checked_at.FromDatetime(report.checked_at)
        for name, component in report.components.items():
            data.components[name].CopyFrom(
                analytics_pb2.ComponentHealth(
                    status=component.status,
                    latency_ms=component.latency_ms,
                    version=component.version,
                    detail=component.detail,
                )
            )
        return analytics_pb2.GetPipelineHealthResponse(success=True, data=data)


async def build(resources: Resources) -> Sequence[Registration]:
    peers: dict[str, grpc.aio.Channel | None] = {}
    for service in ServiceName:
        if service is ServiceName.ANALYTICS:
            peers[service.value] = None
        else:
            peers[service.value] = channel = service_channel(resources.settings.address_of(service))
            resources.closers.append(channel.close)
    return [
        Registration(
            AnalyticsServicer(resources, peers),  # type: ignore[abstract]  # later RPCs: UNIMPLEMENTED
            analytics_pb2_grpc.add_AnalyticsServiceServicer_to_server,
            analytics_pb2.DESCRIPTOR.services_by_name["AnalyticsService"].full_name,
        )
    ]
