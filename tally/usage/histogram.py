"""The fixed latency buckets of the rollups (`lat_00`..`lat_23`, `ttft_00`..`ttft_23`).

Bucket i counts values v (milliseconds) with UPPER_BOUNDS_MS[i-1] < v <= UPPER_BOUNDS_MS[i];
the last bucket is unbounded. Percentiles interpolate linearly inside a bucket, so they are
exact to within the bucket's width.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

UPPER_BOUNDS_MS: tuple[float, ...] = (
    25, 50, 100, 150, 200, 300, 400, 500, 750, 1000, 1500, 2000,
    3000, 4000, 5000, 7500, 10000, 15000, 20000, 30000, 45000, 60000, 120000, math.inf,
)  # fmt: skip
BUCKETS = len(UPPER_BOUNDS_MS)
LATENCY_COLUMNS = tuple(f"lat_{i:02d}" for i in range(BUCKETS))
TTFT_COLUMNS = tuple(f"ttft_{i:02d}" for i in range(BUCKETS))


def bucket_of(value_ms: float) -> int:
    return bisect.bisect_left(UPPER_BOUNDS_MS, value_ms)


def percentile(counts: Sequence[int], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) in milliseconds, or None for an empty histogram."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            lower = 0.0 if index == 0 else UPPER_BOUNDS_MS[index - 1]
            upper = UPPER_BOUNDS_MS[index]
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return UPPER_BOUNDS_MS[-2]
