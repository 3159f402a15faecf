"""Benchmarks: plain functions ``run(profile, out_dir, ...) -> dict`` that write JSON and a markdown table."""
