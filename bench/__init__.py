"""Benchmarks for popproxy (not part of the test suite): run ``python -m bench --help``."""
