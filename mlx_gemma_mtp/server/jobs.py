"""A request on its way through the engine thread: what the HTTP side hands over, and what comes back."""

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from mlx_gemma_mtp.server.text import TextStream

PENALTY_CONTEXT = 20  # tokens presence/frequency penalties look back over (mlx-lm's default)


@dataclass(eq=False)
class Job:
    """One request on its way through the engine thread."""

    ids: list
    request: Any  # engine.Request, built MLX-free on the event loop
    stops: list
    top_logprobs: Optional[int]  # None: no log-probabilities
    processors: dict  # logit_bias / presence / frequency penalty, built into processors in the engine thread
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    uid: Optional[int] = None
    stats: Any = None
    text: Optional[TextStream] = None
    cancelled: bool = False
    done: bool = False
    checked: float = field(default_factory=time.monotonic)  # when the client was last seen connected
    settings: dict = field(default_factory=dict)  # make_request's arguments, which other ranks rebuild it from
    # a reply sent whole (not streamed): its text is kept here, not sent round by round, so the
    # event loop is woken only when the reply is complete
    whole: bool = False
    held: list = field(default_factory=list)  # (text, logprob entries) per round
    admitted: float = 0.0  # when the engine thread took it from the queue (time.monotonic)
    images: tuple = ()  # images.ImageSpan per image of the prompt (prepared, not yet encoded)

    def add(self, text: str, entries: list) -> None:
        """A round's new text: sent at once when streamed, kept when the reply goes whole."""
        if self.whole:
            self.held.append((text, entries))
        else:
            self.send(("delta", text, entries))

    def send(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed: the server is going down
            pass


def processors(settings: dict) -> list:
    """A request's logit_bias / presence / frequency penalty settings as mlx-lm logits processors."""
    from mlx_lm.sample_utils import make_logits_processors

    return make_logits_processors(settings.get("logit_bias"), presence_penalty=settings.get("presence_penalty"),
                                  presence_context_size=PENALTY_CONTEXT,
                                  frequency_penalty=settings.get("frequency_penalty"),
                                  frequency_context_size=PENALTY_CONTEXT)
