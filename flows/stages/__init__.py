"""Shard-level stage logic, plain functions the flows wire."""
