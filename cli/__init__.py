"""The ``derm`` command line (top layer).

One command per pipeline stage, and the runtime wiring (local Redis, Feast environment). Nothing
imports it.
"""
