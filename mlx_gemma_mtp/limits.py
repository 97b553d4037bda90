"""Limits every entry point applies the same way: draft length and context length."""

from mlx_gemma_mtp.errors import MTPError

MAX_SEED = 2**32 - 1  # a row's seed is hashed as a uint32
MAX_DRAFT_TOKENS = 16


def check_draft_tokens(num_draft_tokens):
    """`num_draft_tokens` as callers pass it: a whole number in 0..MAX_DRAFT_TOKENS or "adaptive"."""
    if num_draft_tokens == "adaptive":
        return num_draft_tokens
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int):
        raise MTPError(f"num_draft_tokens must be a whole number or 'adaptive', got {num_draft_tokens!r}")
    if not 0 <= num_draft_tokens <= MAX_DRAFT_TOKENS:
        raise MTPError(f"num_draft_tokens must be between 0 and {MAX_DRAFT_TOKENS}, got {num_draft_tokens}")
    return num_draft_tokens


def fit_max_tokens(prompt_tokens: int, max_tokens: int, context: int) -> int:
    """Refuse a prompt that does not fit the context; shorten max_tokens to what it leaves."""
    if prompt_tokens >= context:
        raise MTPError(f"the prompt has {prompt_tokens} tokens; the model's context is {context} tokens")
    return min(max_tokens, context - prompt_tokens)
