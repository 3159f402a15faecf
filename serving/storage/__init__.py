"""Object storage for inputs, results, stage outputs and checkpoints (Ray-free).

- ``store``: one interface over a local directory, S3 / S3-compatible, GCS and memory;
- ``opening``: ``open_storage(url)``, the store a URL names (Redis included);
- ``redis_store``: the same interface on Redis (stage outputs in the job store's Redis);
- ``keys``: the key layout, built only from checked job ids, attempts and names;
- ``codec``: typed hand-offs and checkpoints as safetensors + JSON, never pickle;
- ``outputs``: a job attempt's stage outputs and checkpoints on a store;
- ``lifecycle``: expiration rules where the backend has them, sweeps where it does not;
- ``errors``: ``StorageFull``, ``StorageUnavailable``, ``StorageError``, ``SigningNotSupported``.
"""

__all__: list[str] = []  # import from the modules: the package itself pulls in nothing
