"""The diffusion engine core: request queue, one-step scheduling, step batching, failure isolation (knows no family)."""
