"""Upstream DERM models.

Config, model, losses, point-in-time features, daily training, embedding export and the refresh that
chains them.
"""
