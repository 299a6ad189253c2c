"""Benchmark harness: ``python -m bench.run`` (``make bench``)."""
