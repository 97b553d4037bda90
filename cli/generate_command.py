"""`gemma-mtp generate` and `gemma-mtp chat` (being written)."""
