"""The prompt cache pool of `gemma-mtp serve`: finished rows' KV caches, kept for later requests.

It lives in the engine thread. A finished row's KV cache (holding its prompt and output) goes into a
small LRU, bounded in bytes. A new request takes out the entry sharing the longest token prefix with
its prompt, so a conversation's next turn computes only its new tokens; an entry is never used by two
rows at once. Only an entry that needs to move back at most `cache.REUSE_ROLLBACK` tokens is taken
(the sliding-window rings cannot move back further: the engine would reset it): so a conversation
is not given up for a shared first line, and a prompt sent again is reused only when its previous
reply was short.
"""

from collections import OrderedDict


def common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PromptCachePool:
    """An LRU of PromptCache objects bounded in bytes; an entry is taken out while a row uses it."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict = OrderedDict()  # id -> (PromptCache, bytes)
        self.bytes = 0  # a plain number, so other threads can read it while this one changes entries

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def take(self, ids: list):
        """The entry sharing the longest prefix with `ids`, taken out; None if none can be reused
        (the engine moves a cache back at most REUSE_ROLLBACK tokens, and resets one it cannot)."""
        from mlx_gemma_mtp.runtime.cache import REUSE_ROLLBACK

        best, best_n = None, 0
        for key, (pc, _) in self.entries.items():
            n = common_prefix(pc.tokens, ids[:-1])  # the last prompt token is always computed
            if n > best_n and len(pc.tokens) - n <= REUSE_ROLLBACK:
                best, best_n = key, n
        if best is None:
            return None
        pc, size = self.entries.pop(best)
        self.bytes -= size
        return pc

    def put(self, pc) -> None:
        import mlx.core as mx

        from mlx_gemma_mtp.runtime.cache import cache_bytes

        if pc is None or not pc.tokens or self.max_bytes <= 0:
            return
        mx.eval([c.state for c in pc.cache])  # detach it from the batch's buffers
        size = cache_bytes(pc.cache)
        if size > self.max_bytes:
            return
        self.entries[id(pc)] = (pc, size)
        self.bytes += size
        while self.bytes > self.max_bytes:  # least recently used first
            _, (_, dropped) = self.entries.popitem(last=False)
            self.bytes -= dropped
