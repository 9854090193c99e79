"""Shared facts about usage data that several services read (schema constants, histogram buckets).

This is data definition, not service internals: ingest writes the rollups these describe,
analytics, budget and reporting read them.
"""
