"""`gemma-mtp serve`: the HTTP APIs as thin translations onto one engine thread."""
