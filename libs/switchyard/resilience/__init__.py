"""Resilience policies without I/O: retry backoff and budget, outlier ejection."""
