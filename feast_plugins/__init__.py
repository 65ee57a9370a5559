"""Feast extension points (ground layer).

The Redis online store and its format codec, the batch engine, the ASOF offline store. They import
Feast, redis, DuckDB and ibis only, never the platform.
"""
