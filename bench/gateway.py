"""REST through Envoy vs direct gRPC: the latency the gateway adds (target <= 1 ms at p50).

The same call, `GetVirtualKey` for a registered key (one primary-key read), made sequentially
over REST (httpx, keep-alive, through Envoy's transcoder) and over gRPC directly, interleaved in
rounds so both see the same machine load. Run with `python -m bench gateway`; writes
bench/results/gateway.json. `BENCH_GATEWAY_CALLS` sets the calls per path (default 3,000).
"""

from __future__ import annotations

import os
import time
import uuid

import grpc
import httpx

from bench.common import bench_stack, percentile, write_results
from tally.budget.v1 import budget_pb2, budget_pb2_grpc
from tally.runtime.config import ServiceName


def main() -> None:
    calls = int(os.environ.get("BENCH_GATEWAY_CALLS", "3000"))
    with bench_stack(list(ServiceName)) as suite:
        suite.start_gateway()
        env = suite.env
        key = env["ADMIN_MASTER_KEY"]
        key_id = str(uuid.uuid4())
        rest = httpx.Client(
            base_url=f"http://127.0.0.1:{env['GATEWAY_PORT']}", headers={"Authorization": f"Bearer {key}"}, timeout=10
        )
        assert rest.put(f"/api/admin/virtual-keys/{key_id}", json={"keyName": "bench"}).status_code == 200
        channel = grpc.insecure_channel(env["BUDGET_ADDRESS"])
        stub = budget_pb2_grpc.BudgetServiceStub(channel)
        metadata = [("authorization", f"Bearer {key}")]
        request = budget_pb2.GetVirtualKeyRequest(key_id=key_id)
        rest_times: list[float] = []
        grpc_times: list[float] = []
        for _ in range(200):  # warm both paths
            rest.get(f"/api/admin/virtual-keys/{key_id}")
            stub.GetVirtualKey(request, metadata=metadata, timeout=5)
        for _ in range(calls // 100):
            for _ in range(100):
                started = time.perf_counter()
                response = rest.get(f"/api/admin/virtual-keys/{key_id}")
                rest_times.append(time.perf_counter() - started)
                assert response.status_code == 200
            for _ in range(100):
                started = time.perf_counter()
                stub.GetVirtualKey(request, metadata=metadata, timeout=5)
                grpc_times.append(time.perf_counter() - started)
        rest.close()
        channel.close()
    figures = {
        "calls_per_path": len(rest_times),
        "rest_p50_ms": round(percentile(rest_times, 0.5) * 1000, 3),
        "rest_p99_ms": round(percentile(rest_times, 0.99) * 1000, 3),
        "grpc_p50_ms": round(percentile(grpc_times, 0.5) * 1000, 3),
        "grpc_p99_ms": round(percentile(grpc_times, 0.99) * 1000, 3),
    }
    figures["added_p50_ms"] = round(figures["rest_p50_ms"] - figures["grpc_p50_ms"], 3)
    figures["target_added_p50_ms"] = 1.0
    path = write_results("gateway", figures)
    print(
        f"gateway: REST via Envoy p50 {figures['rest_p50_ms']} ms (p99 {figures['rest_p99_ms']}), direct gRPC p50 "
        f"{figures['grpc_p50_ms']} ms (p99 {figures['grpc_p99_ms']}): added {figures['added_p50_ms']} ms at p50 "
        f"(target <= 1 ms) -> {path}"
    )


if __name__ == "__main__":
    main()
