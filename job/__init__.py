"""The batch job: CLI, storage, sharding, leases, workers, checkpoints, merge."""
