"""Downstream rankers.

Point-in-time training sets through Feast, the PyTorch dataset, the ranker, its training and
metrics, and the leakage audit.
"""
