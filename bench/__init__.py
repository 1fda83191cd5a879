"""Benchmarks: latency to first audio, density, memory, against baselines in the same run."""
