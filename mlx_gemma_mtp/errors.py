class MTPError(Exception):
    """An error caused by the user's input; the CLI prints its message as one line."""
