"""``reelserve bench``: benchmark sections (served vs bare, and more) written to JSON, markdown and BENCHMARKS.md."""
