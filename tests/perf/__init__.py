"""Benchmarks: scripts run by hand, not collected as tests."""
