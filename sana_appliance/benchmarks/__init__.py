"""Benchmark scripts: each prints numbers (they are measurements, not timed tests).

Run one with ``python -m sana_appliance.benchmarks.NAME --help``; README.md in this
folder lists them and the numbers measured so far.
"""
