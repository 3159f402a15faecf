"""One Ray Serve deployment per stage: plain classes; options come from ``cluster.placement``."""
