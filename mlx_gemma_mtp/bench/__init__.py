"""`gemma-mtp bench`: measuring our paths against mlx-lm, side by side in one process."""
