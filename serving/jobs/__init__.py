"""The durable job runner: claims, leases, fenced writes, kept outputs and the job context (knows no model)."""
