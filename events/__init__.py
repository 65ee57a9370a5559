"""The event log: its schema (the bring-your-own-data contract) and a synthetic generator."""
