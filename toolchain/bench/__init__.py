"""Latency benchmarks: one runner per runtime, run in a child process per model."""
