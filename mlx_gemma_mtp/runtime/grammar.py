"""Constraints: per-row token filters applied at verification.

A constrained row holds a grammar matcher (llguidance's `LLMatcher`, built by
`mlx_gemma_mtp.runtime.structured`) whose state is the row's accepted tokens. A round verifies
[last, d1..dK]; position j is judged by the mask of the state after d1..dj, so the host consumes
the drafts one by one, computes each mask and rolls back. A draft the grammar forbids has
probability 0 (or never the argmax) under the masked logits at its own position, so it is
rejected like any wrong draft, and the masks after it are never read (they allow everything,
so no position's distribution is empty).

Masks travel as llguidance's bit-packed words (32 tokens per int32) and are unpacked on the
device. This module does not import llguidance: the matcher is duck-typed.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np


@dataclass
class RoundMasks:
    """One row's masks for a round and the drafts they judge."""

    words: np.ndarray  # [k+1, W] int32: bit t of position j allows token t there
    drafts: list  # the drafts, forced tokens put in place of the drafter's guesses
    forced: list  # per draft: the forced token that replaced it, or -1


@dataclass(eq=False)
class Constraint:
    """One row's grammar state: a fresh matcher per row (it is consumed as the row decodes)."""

    matcher: object  # llguidance.LLMatcher
    vocab_size: int  # the target's logits width
    grammar_eos: int  # the token the grammar's tokenizer ends with
    eos_ids: frozenset = frozenset()  # every token that ends the row: all allowed where the grammar may end
    replace_forced: bool = True  # put a forced token in place of the drafter's guess (cheaper than a rejection)
    forced_replaced: int = 0  # how many drafts a forced token replaced (benchmarks read it)

    @property
    def words(self) -> int:
        return (self.vocab_size + 31) // 32

    def mask(self, out: Optional[np.ndarray] = None) -> np.ndarray:
        """The mask [W] int32 of the current state."""
        out = np.zeros(self.words, np.int32) if out is None else out
        self.matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
        if allowed(out, self.grammar_eos) or not out.any():
            # the grammar may end here (or has nothing left: an error state): every EOS ends the row
            for t in self.eos_ids:
                if t < self.vocab_size:
                    out[t >> 5] |= np.int32(np.uint32(1 << (t & 31)).view(np.int32))
        return out

    def round_masks(self, drafts: list) -> RoundMasks:
        """Masks for positions 0..k (position j after d1..dj) and the drafts with forced tokens in
        place; the matcher ends where it began."""
        k = len(drafts)
        words = np.full((k + 1, self.words), -1, np.int32)  # rows never reached allow everything
        drafts, forced, consumed = list(drafts), [-1] * k, 0
        try:
            for j in range(k + 1):
                self.mask(words[j])
                if j == k:
                    break
                only = single_token(words[j])
                if self.replace_forced and only is not None and only != drafts[j]:
                    drafts[j] = forced[j] = only
                    self.forced_replaced += 1
                d = drafts[j]
                if not allowed(words[j], d) or d in self.eos_ids:
                    break  # rejected here, or the row ends here: later positions are never read
                if not self.matcher.consume_token(d):  # the mask allowed it: never expected
                    words[j, d >> 5] &= ~np.int32(np.uint32(1 << (d & 31)).view(np.int32))
                    break
                consumed += 1
        finally:
            if consumed:
                self.matcher.rollback(consumed)
        return RoundMasks(words, drafts, forced)

    def advance(self, tokens: list) -> Optional[str]:
        """Consume a row's emitted tokens (EOS ids end the row and are not consumed); an error
        message if the grammar refused one (the masks make that impossible: a bug if seen)."""
        for t in tokens:
            if t in self.eos_ids:
                break
            if not self.matcher.consume_token(t):
                return f"the grammar refused token {t}: {self.matcher.get_error()}"
        return None


def allowed(words: np.ndarray, token: int) -> bool:
    return 0 <= token < words.size * 32 and bool((int(words[token >> 5]) >> (token & 31)) & 1)


def single_token(words: np.ndarray) -> Optional[int]:
    """The token a mask allows if it allows exactly one."""
    nonzero = np.flatnonzero(words)
    if nonzero.size != 1:
        return None
    w = int(words[nonzero[0]]) & 0xFFFFFFFF
    if w & (w - 1):
        return None
    return int(nonzero[0]) * 32 + w.bit_length() - 1


def apply_masks(logits: mx.array, words: mx.array) -> mx.array:
    """logits [..., V] with the tokens words [..., W] (bit-packed int32) does not allow at -inf."""
    bits = (words.astype(mx.uint32)[..., None] >> mx.arange(32, dtype=mx.uint32)) & 1
    allow = bits.reshape(*words.shape[:-1], -1)[..., : logits.shape[-1]]
    return mx.where(allow.astype(mx.bool_), logits, mx.array(-float("inf"), logits.dtype))
