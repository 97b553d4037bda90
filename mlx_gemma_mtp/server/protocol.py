"""The one request every API is translated into, and the events a generation gives back.

Chat completions, completions, Responses and Messages each parse their own body into a
`GenerateRequest` (messages for the chat template or a raw prompt, the tools the template sees,
sampling, stops, the reply's length, streaming, log-probabilities, the draft length), and turn the
`server.serving` events ("text", "tool_call", "end", "error") into their own JSON and stream format.
Nothing below the translators knows which API a request came in by, except `names`: the API's own
parameter names, so that an error names what the client sent.
"""

from dataclasses import dataclass, field
from typing import Optional, Union

MAX_STOPS = 4  # OpenAI's limit


@dataclass
class GenerateRequest:
    messages: Optional[list] = None  # chat-template messages (role, content, tool_calls, tool_call_id)
    prompt: Union[str, list, None] = None  # a raw prompt (completions), when messages is None
    tools: Optional[list] = None  # OpenAI-style function tools the template sees; calls are parsed when set
    max_tokens: Optional[int] = None  # None: the server's --max-tokens
    stops: list = field(default_factory=list)
    max_stops: int = MAX_STOPS
    stream: bool = False
    temperature: Optional[float] = None  # None: 1, as OpenAI and Anthropic default
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None
    repetition_penalty: Optional[float] = None
    repetition_context_size: Optional[int] = None
    top_logprobs: Optional[int] = None  # None: no log-probabilities
    num_draft_tokens: Union[int, str, None] = None
    n: Optional[int] = None
    # structured output: OpenAI's response_format shape ({"type": "json_schema", "json_schema": {...}}, ...)
    response_format: Optional[dict] = None
    force_tool: bool = False  # the reply must be one call to one of `tools` (tool_choice required / named)
    names: dict = field(default_factory=dict)  # our field -> the API's parameter name

    def param(self, name: str) -> str:
        return self.names.get(name, name)


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                   "logit_bias", "repetition_penalty", "repetition_context_size", "num_draft_tokens", "n")


def sampling_of(body) -> dict:
    """The sampling fields a pydantic body shares with GenerateRequest (those it has)."""
    return {name: getattr(body, name) for name in SAMPLING_FIELDS if hasattr(body, name)}


@dataclass
class Result:
    """A whole (not streamed) reply: text without the tool calls, the calls, and how it ended."""

    text: str
    calls: list  # [{"id", "name", "arguments": JSON string}]
    entries: list  # log-probability entries (text, logprob, top)
    reason: str  # "stop", "length", "tool_calls"
    usage: dict  # chat completions' usage (server.worker), which translators reshape
    stop_sequence: Optional[str] = None  # the stop string that ended it, if one did


def image_part(url: str) -> dict:
    """A chat-template content part for an image: the template renders its placeholder, and the
    server fetches `url` (data:, http(s), or a local file where allowed)."""
    return {"type": "image", "url": url}


def content_of(parts: list):
    """Content parts as a template message's content: plain text when there is no image."""
    if any(p["type"] == "image" for p in parts):
        return parts
    return "".join(p["text"] for p in parts)


def image_urls(messages: list) -> list:
    """The URLs of the messages' images, in the order the template places them."""
    return [p["url"] for m in messages if isinstance(m.get("content"), list)
            for p in m["content"] if p.get("type") == "image"]
