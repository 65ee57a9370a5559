"""Online serving.

The ranking and retrieval service, its HTTP API, the vectorized Feast-format Redis reader and the
ANN Pin index.
"""
