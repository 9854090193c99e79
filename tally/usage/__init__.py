"""Shared facts about usage data that several services read (schema constants, histogram buckets).

This is data definition, not service internals: ingest writes the rollups these describe,
analytics, budget and reporting read them.
"""

# Token counts of an event are disjoint (input excludes cached-read and cache-write tokens,
# output excludes reasoning tokens), so "total tokens" everywhere is the sum of all five.
TOTAL_TOKENS_SQL = "(input_tokens + output_tokens + cached_read_tokens + cache_write_tokens + reasoning_tokens)"
