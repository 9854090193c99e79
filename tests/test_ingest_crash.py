"""An ingest process killed with SIGKILL under load loses and doubles nothing."""

from __future__ import annotations

import signal
import threading
import time
from datetime import timedelta

import grpc
import psycopg

from tally.devstack import Suite, free_port, wait_for_grpc_health
from tally.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from tally.runtime.config import ServiceName
from tests.conftest import Stack
from tests.usage_support import EventFactory, recent


def test_sigkill_under_load_loses_and_doubles_nothing(stack: Stack) -> None:
    env = dict(stack.env)
    address = f"127.0.0.1:{free_port()}"
    env.update({"INGEST_ADDRESS": address, "INGEST_METRICS_PORT": str(free_port())})
    suite = Suite(env, log_dir=stack.root / "logs-crash")
    factory = EventFactory(seed=99, models=[("openai", "gpt-4o"), ("anthropic", "claude-3-haiku")])
    batches = [factory.events(500, recent(hours=6), timedelta(hours=5)) for _ in range(30)]
    acknowledged: list[int] = []
    attempts = 0
    failures = 0

    def client() -> None:
        nonlocal attempts, failures
        channel = grpc.insecure_channel(address)
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        for number, batch in enumerate(batches):
            while True:  # retry every unacknowledged batch until it is acknowledged
                attempts += 1
                try:
                    stub.RecordUsageBatch(
                        ingest_pb2.RecordUsageBatchRequest(events=batch),
                        timeout=10,
                        metadata=stack.auth(),
                        wait_for_ready=True,
                    )
                except grpc.RpcError:
                    failures += 1
                    time.sleep(0.05)
                    continue
                acknowledged.append(number)
                break
        channel.close()

    process = suite.start_service(ServiceName.INGEST)
    worker = threading.Thread(target=client)
    worker.start()
    kills = 0
    try:
        for target in (4, 12, 20):
            while len(acknowledged) < target and worker.is_alive():
                time.sleep(0.005)
            process.send_signal(signal.SIGKILL)  # mid-load: the client is sending the next batch
            process.wait(10)
            kills += 1
            process = suite._spawn("ingest", "services.ingest")
            wait_for_grpc_health(address, 60, process)
        worker.join(180)
    finally:
        suite.stop_all()
    assert not worker.is_alive()
    assert kills == 3 and acknowledged == list(range(30))
    with psycopg.connect(stack.postgres.url, password=stack.postgres.password) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT request_id), coalesce(sum(input_tokens), 0) FROM usage_events "
            "WHERE key_id = ANY(%s::uuid[])",
            (factory.keys,),
        ).fetchone()
        rollup = conn.execute(
            "SELECT coalesce(sum(requests), 0), coalesce(sum(input_tokens), 0) FROM usage_rollup_hourly "
            "WHERE key_id = ANY(%s::uuid[])",
            (factory.keys,),
        ).fetchone()
    sent = [e for batch in batches for e in batch]
    assert row == (len(sent), len(sent), sum(e.input_tokens for e in sent))
    assert rollup == (len(sent), sum(e.input_tokens for e in sent))
