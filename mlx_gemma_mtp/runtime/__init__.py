"""The runtime: the engine, rounds, caches, sampling, draft-length policies, text."""
