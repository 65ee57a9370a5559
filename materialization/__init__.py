"""Publishing.

The gate, then offline Parquet, ``feast apply`` and Redis; promote, roll back, retire; the catalog;
counting features.
"""
