"""Benchmarks for ds-widenet (issue 5): throughput, MoE overhead, scaling and a GPU projection.

The scripts run as files (`python bench/throughput.py ...`); the modules import as `bench.*` for
the tests. See bench/README.md.
"""
