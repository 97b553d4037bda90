"""The model side: checkpoints, configs, loading, the target view, the drafter, sharding."""
