"""Model training: ``upstream`` (DERM embeddings, below publishing) and ``downstream`` (CTR/CVR rankers, above it)."""
