"""Wires the reporting service: its servicer, the webhook pipeline, the report scheduler and a
notification delivery worker. The servicer only translates between protos and the modules:
exports.py (usage export), billing.py (billing export), webhooks.py, reports.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc
from google.api import httpbody_pb2

from services.reporting import billing, datasubjects, exports, retention
from services.reporting.governance import ApiKeyStore, AuditLogReader
from services.reporting.reports import ReportRunner, ReportScheduler, ReportStore
from services.reporting.webhooks import WebhookPipeline, WebhookStore
from tally.notify import DeliveryWorker
from tally.reporting.v1 import reporting_pb2, reporting_pb2_grpc
from tally.runtime.config import ServiceName
from tally.runtime.server import Registration, Resources


def content_disposition(filename: str) -> tuple[tuple[str, str], ...]:
    """Sent as initial metadata: Envoy's transcoder passes response headers through, and HttpBody
    itself only carries the content type."""
    return (("content-disposition", f'attachment; filename="{filename}"'),)


async def _chunks_as_bodies(content_type: str, chunks: AsyncIterator[bytes]) -> AsyncIterator[httpbody_pb2.HttpBody]:
    """The first message carries the content type (what the transcoder uses for the response)."""
    first = True
    async for chunk in chunks:
        yield httpbody_pb2.HttpBody(content_type=content_type if first else "", data=chunk)
        first = False
    if first:
        yield httpbody_pb2.HttpBody(content_type=content_type, data=b"")


async def _bytes_in_chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


class ReportingServicer(reporting_pb2_grpc.ReportingServiceServicer):
    """Every RPC of ReportingService; each delegates to its module."""

    def __init__(
        self,
        resources: Resources,
        webhooks: WebhookStore,
        reports: ReportStore,
        billing_exporter: billing.BillingExporter,
    ) -> None:
        self._resources = resources
        self._settings = resources.settings
        self._webhooks = webhooks
        self._reports = reports
        self._billing = billing_exporter
        self._api_keys = ApiKeyStore(resources.db)
        self._audit_log = AuditLogReader(resources.db)

    # ------------------------------------------------------------------------------------------ exports
    async def ExportUsage(
        self, request: reporting_pb2.ExportUsageRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        plan = exports.plan_export(request, self._settings)
        await context.send_initial_metadata(content_disposition(plan.filename))
        async for body in _chunks_as_bodies(
            plan.content_type, exports.export_chunks(self._resources.db, self._settings, plan)
        ):
            yield body

    async def ExportBilling(
        self, request: reporting_pb2.ExportBillingRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        plan = billing.plan_billing(request, self._settings)
        document = billing.encode(await self._billing.document(plan))
        name = plan.billing_cycle or f"{plan.window.start:%Y%m%dT%H%MZ}-{plan.window.end:%Y%m%dT%H%MZ}"
        await context.send_initial_metadata(content_disposition(f"billing-{name}-{plan.group_by}.json"))
        chunks = _bytes_in_chunks(document, self._settings.reporting_export_chunk_bytes)
        async for body in _chunks_as_bodies("application/json", chunks):
            yield body

    # ------------------------------------------------------------------------------------------ data subjects
    async def ExportDataSubject(
        self, request: reporting_pb2.ExportDataSubjectRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        await context.send_initial_metadata(content_disposition("data-subject-export.json"))
        async for body in datasubjects.export_bodies(self._resources, request):
            yield body

    async def DeleteDataSubject(
        self, request: reporting_pb2.DeleteDataSubjectRequest, context: grpc.aio.ServicerContext
    ) -> reporting_pb2.DeleteDataSubjectResponse:
        return await datasubjects.delete_response(self._resources, request)

    # ------------------------------------------------------------------------------------------ webhooks
    async def GetWebhooks(
        self, request: reporting_pb2.GetWebhooksRequest, context: grpc.aio.ServicerContext
    ) -> reporting_pb2.GetWebhooksResponse:
        return reporting_pb2.GetWebhooksResponse(success=True, data=await self._webhooks.get())

    async def UpdateWebhooks(
        self, request: reporting_pb2.UpdateWebhooksRequest, context: grpc.aio.ServicerContext
    ) -> reporting_pb2.UpdateWebhooksResponse:
        return reporting_pb2.UpdateWebhooksResponse(success=True, data=await self._webhooks.update(request))

    async def ListWebhookDeliveries(
        self, request: reporting_pb2.ListWebhookDeliveriesRequest, context: grpc.aio.ServicerContext
    ) -> reporting_pb2.ListWebhookDeliveriesResponse:
        return reporting_pb2.ListWebhookDeliveriesResponse(
            success=True, data=await self._webhooks.list_deliveries(request)
        )

    async def ReplayWebhookDelivery(
        self, request: reporting_pb2.ReplayWebhookDeliveryRequest, context: grpc.aio.ServicerContext
    ) -> reporting_pb2.ReplayWebhookDeliveryResponse:
        return reporting_pb2.ReplayWebhookDeliveryResponse(
            success=True, data=await self._webhooks.replay(request.delivery_id)
        )

    # ------------------------------------------------------------------------------------------ reports
    async def CreateReport(
        self, request: reporting_pb2.CreateReportRequest, context: grpc.aio.ServicerContext
    ) -> reporting_pb2.CreateReportResponse:
        return reporting_pb2.CreateReportResponse(success=True, data=await self._reports.create(request))

    async def ListReports(
        self, request: reporting_pb2.ListReportsRequest, context: grpc.aio.ServicerContext
    ) -> reporting_pb2.ListReportsResponse:
        return reporting_pb2.ListReportsResponse(success=True, data=await self._reports.list_reports(request))

    async def GetReport(
        self, request: reporting_pb2.GetReportRequest, context: grpc.aio.ServicerContext
    ) -> reporting_pb2.GetReportResponse:
        return reporting_pb2.GetReportResponse(success=True, data=await self._reports.get(request.report_id))

    async def ListReportRuns(
        self, request: reporting_pb2.ListReportRunsRequest, context: grpc.aio.ServicerContext
    ) -> reporting_pb2.ListReportRunsResponse:
        return reporting_pb2.ListReportRunsResponse(success=True, data=await self._reports.runs(request))

    async def DownloadReportRun(
        self, request: reporting_pb2.DownloadReportRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        run = await self._reports.output(request.report_id, request.run_id)
        await context.send_initial_metadata(content_disposition(run["filename"]))
        chunks = _bytes_in_chunks(bytes(run["output"]), self._settings.reporting_export_chunk_bytes)
        async for body in _chunks_as_bodies(run["content_type"], chunks):
            yield body

    async def GetScheduledReports(
        self, request: reporting_pb2.GetScheduledReportsRequest, context: grpc.aio.ServicerContext
    ) -> reporting_pb2.GetScheduledReportsResponse:
        return reporting_pb2.GetScheduledReportsResponse(success=True, data=await self._reports.scheduled())

    async def UpdateScheduledReports(
        self, request: reporting_pb2.UpdateScheduledReportsRequest, context: grpc.aio.ServicerContext
    ) -> reporting_pb2.UpdateScheduledReportsResponse:
        return reporting_pb2.UpdateScheduledReportsResponse(
            success=True, data=await self._reports.replace_scheduled(request)
        )

    # ------------------------------------------------------------------------------------------ governance
    async def ListAuditLog(
        self, request: reporting_pb2.ListAuditLogRequest, context: grpc.aio.ServicerContext
    ) -> reporting_pb2.ListAuditLogResponse:
        return reporting_pb2.ListAuditLogResponse(success=True, data=await self._audit_log.list_entries(request))

    async def CreateApiKey(
        self, request: reporting_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> reporting_pb2.CreateApiKeyResponse:
        return reporting_pb2.CreateApiKeyResponse(success=True, data=await self._api_keys.create(request))

    async def ListApiKeys(
        self, request: reporting_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> reporting_pb2.ListApiKeysResponse:
        return reporting_pb2.ListApiKeysResponse(success=True, data=await self._api_keys.list_keys(request))

    async def RevokeApiKey(
        self, request: reporting_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> reporting_pb2.RevokeApiKeyResponse:
        return reporting_pb2.RevokeApiKeyResponse(success=True, data=await self._api_keys.revoke(request.api_key_id))


async def build(resources: Resources) -> Sequence[Registration]:
    settings, db = resources.settings, resources.db
    worker = DeliveryWorker(db, settings)
    pipeline = WebhookPipeline(db, settings, worker.wake, settings.address_of(ServiceName.BUDGET))
    webhooks = WebhookStore(db, settings, pipeline.wake)
    runner = ReportRunner(db, settings, worker.wake)
    scheduler: ReportScheduler | None = None
    store = ReportStore(db, settings, runner, lambda: scheduler.changed() if scheduler else None)
    scheduler = ReportScheduler(db, settings, store, runner)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(worker.run(stop), name="notify-worker"),
        asyncio.create_task(pipeline.run(stop), name="webhook-pipeline"),
        asyncio.create_task(scheduler.run(stop), name="report-scheduler"),
    ]

    async def close() -> None:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await worker.close()

    resources.closers.append(close)
    retention.install(resources)  # raw-event retention and archiving (issue 7)
    servicer = ReportingServicer(resources, webhooks, store, billing.BillingExporter(db, settings))
    return [
        Registration(
            servicer,
            reporting_pb2_grpc.add_ReportingServiceServicer_to_server,
            reporting_pb2.DESCRIPTOR.services_by_name["ReportingService"].full_name,
        )
    ]
