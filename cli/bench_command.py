"""`gemma-mtp bench` (being written)."""
