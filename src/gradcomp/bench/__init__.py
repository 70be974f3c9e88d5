"""Benchmarks: speed and bytes, always as ratios against a baseline measured in the same run."""
