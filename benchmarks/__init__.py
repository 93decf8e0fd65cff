"""Benchmarks: the whole service against the raw model and against the usual synchronous Flask app."""
