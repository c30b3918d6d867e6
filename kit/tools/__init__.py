"""Tooling that drives the pipeline (benchmarks, the demo, the starting checkpoint); the pipeline never imports it."""
