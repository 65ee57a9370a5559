"""Orchestration of the embedding feature platform: configuration and the ``derm`` CLI."""
