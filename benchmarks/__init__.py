"""Throughput and quality benchmarks (not part of the test suite)."""
