"""The core every layer stands on.

Paths, names, the snapshot and training-set formats, model versions, atomic files, the DuckDB helper
and the Feast repository handle.
"""
