"""Wires the analytics service: its servicer, the probes and the channels it uses.

The servicer only translates: each RPC hands its request fields to `AnalyticsReads` and wraps
the answer in the contract's envelope, timing itself for `GetPerformanceMetrics`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import TypeVar

import grpc

from services.analytics.health import ConsistencyCheck, pipeline_health
from services.analytics.reads import AnalyticsReads
from tally.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from tally.runtime.clients import service_channel
from tally.runtime.config import ServiceName
from tally.runtime.server import Registration, Resources

T = TypeVar("T")
# Query latencies kept per endpoint for GetPerformanceMetrics (the most recent ones).
TIMING_SAMPLES = 2048


class QueryTimings:
    """Wall-clock durations of the analytics reads since start, per endpoint (bounded samples)."""

    def __init__(self) -> None:
        self.samples: dict[str, deque[float]] = {}
        self.counts: dict[str, int] = {}

    async def timed(self, name: str, work: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await work
        finally:
            elapsed_ms = (time.perf_counter() - started) * 1000
            self.samples.setdefault(name, deque(maxlen=TIMING_SAMPLES)).append(elapsed_ms)
            self.counts[name] = self.counts.get(name, 0) + 1

    def stats(self) -> dict[str, analytics_pb2.EndpointQueryStats]:
        out = {}
        for name, samples in self.samples.items():
            ordered = sorted(samples)

            def at(q: float, ordered: list[float] = ordered) -> float:
                return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 3)

            out[name] = analytics_pb2.EndpointQueryStats(
                count=self.counts[name], p50_ms=at(0.5), p95_ms=at(0.95), p99_ms=at(0.99)
            )
        return out


class AnalyticsServicer(analytics_pb2_grpc.AnalyticsServiceServicer):
    def __init__(self, resources: Resources, peers: dict[str, grpc.aio.Channel | None]) -> None:
        self._resources = resources
        self._peers = peers
        self._reads = AnalyticsReads(
            resources.settings, resources.db, resources.redis, peers.get(ServiceName.BUDGET.value)
        )
        self._timings = QueryTimings()
        self._consistency = ConsistencyCheck(resources.db, resources.settings.analytics_consistency_check_seconds)

    def _timed(self, name: str, work: Awaitable[T]) -> Awaitable[T]:
        return self._timings.timed(name, work)

    async def GetLiveUsage(
        self, request: analytics_pb2.GetLiveUsageRequest, context: grpc.aio.ServicerContext
    ) -> analytics_pb2.GetLiveUsageResponse:
        data = await self._timed("GetLiveUsage", self._reads.live_usage())
        return analytics_pb2.GetLiveUsageResponse(success=True, data=data)

    async def GetUsageTrends(
        self, request: analytics_pb2.GetUsageTrendsRequest, context: grpc.aio.ServicerContext
    ) -> analytics_pb2.GetUsageTrendsResponse:
        data = await self._timed("GetUsageTrends", self._reads.usage_trends(request.period, request.granularity))
        return analytics_pb2.GetUsageTrendsResponse(success=True, data=data)

    async def GetVirtualKeyAnalytics(
        self, request: analytics_pb2.GetVirtualKeyAnalyticsRequest, context: grpc.aio.ServicerContext
    ) -> analytics_pb2.GetVirtualKeyAnalyticsResponse:
        data = await self._timed(
            "GetVirtualKeyAnalytics", self._reads.key_analytics(request.key_id, request.period, request.breakdown)
        )
        return analytics_pb2.GetVirtualKeyAnalyticsResponse(success=True, data=data)

    async def CompareVirtualKeys(
        self, request: analytics_pb2.CompareVirtualKeysRequest, context: grpc.aio.ServicerContext
    ) -> analytics_pb2.CompareVirtualKeysResponse:
        data = await self._timed(
            "CompareVirtualKeys", self._reads.compare_keys(list(request.key_ids), request.period, list(request.metrics))
        )
        return analytics_pb2.CompareVirtualKeysResponse(success=True, data=data)

    async def GetProviderAnalytics(
        self, request: analytics_pb2.GetProviderAnalyticsRequest, context: grpc.aio.ServicerContext
    ) -> analytics_pb2.GetProviderAnalyticsResponse:
        data = await self._timed(
            "GetProviderAnalytics", self._reads.provider_analytics(request.period, request.breakdown)
        )
        return analytics_pb2.GetProviderAnalyticsResponse(success=True, data=data)

    async def GetCostOptimization(
        self, request: analytics_pb2.GetCostOptimizationRequest, context: grpc.aio.ServicerContext
    ) -> analytics_pb2.GetCostOptimizationResponse:
        data = await self._timed("GetCostOptimization", self._reads.cost_optimization(request.period))
        return analytics_pb2.GetCostOptimizationResponse(success=True, data=data)

    async def GetBudgetForecast(
        self, request: analytics_pb2.GetBudgetForecastRequest, context: grpc.aio.ServicerContext
    ) -> analytics_pb2.GetBudgetForecastResponse:
        data = await self._timed("GetBudgetForecast", self._reads.budget_forecast(request.horizon))
        return analytics_pb2.GetBudgetForecastResponse(success=True, data=data)

    async def GetUsagePatterns(
        self, request: analytics_pb2.GetUsagePatternsRequest, context: grpc.aio.ServicerContext
    ) -> analytics_pb2.GetUsagePatternsResponse:
        data = await self._timed("GetUsagePatterns", self._reads.usage_patterns(request.period, request.analysis))
        return analytics_pb2.GetUsagePatternsResponse(success=True, data=data)

    async def GetPerformance(
        self, request: analytics_pb2.GetPerformanceRequest, context: grpc.aio.ServicerContext
    ) -> analytics_pb2.GetPerformanceResponse:
        data = await self._timed("GetPerformance", self._reads.performance(request.period, request.breakdown))
        return analytics_pb2.GetPerformanceResponse(success=True, data=data)

    async def GetPerformanceMetrics(
        self, request: analytics_pb2.GetPerformanceMetricsRequest, context: grpc.aio.ServicerContext
    ) -> analytics_pb2.GetPerformanceMetricsResponse:
        """Latency of this process's analytics reads since it started, and data freshness."""
        freshness = await self._reads.freshness()
        data = analytics_pb2.PerformanceMetrics(rollup_freshness=freshness)
        for name, stats in self._timings.stats().items():
            data.endpoints[name].CopyFrom(stats)
        return analytics_pb2.GetPerformanceMetricsResponse(success=True, data=data)

    async def GetPipelineHealth(
        self, request: analytics_pb2.GetPipelineHealthRequest, context: grpc.aio.ServicerContext
    ) -> analytics_pb2.GetPipelineHealthResponse:
        settings = self._resources.settings
        gateway = settings.gateway_probe_address or f"127.0.0.1:{settings.gateway_port}"
        report = await pipeline_health(
            self._resources.db, self._resources.redis, self._peers, self._consistency, gateway
        )
        data = analytics_pb2.PipelineHealth(
            status=report.status,
            rollup_consistency=analytics_pb2.RollupConsistency(
                status=report.rollup_status, detail=report.rollup_detail
            ),
            outbox=analytics_pb2.OutboxHealth(pending=report.outbox_pending, dead_lettered=report.outbox_dead),
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
            AnalyticsServicer(resources, peers),
            analytics_pb2_grpc.add_AnalyticsServiceServicer_to_server,
            analytics_pb2.DESCRIPTOR.services_by_name["AnalyticsService"].full_name,
        )
    ]
