"""Benchmarks (`matvit bench ...`): cross-consistency against baselines, index build and query speed, their plots."""
