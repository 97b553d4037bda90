"""Request bodies of the OpenAI-compatible server (`gemma-mtp serve`), as pydantic models.

The models check types only; the values are checked where they are used (server.py,
serve_requests.py and the API's boundary, `api.make_request`), so that a nonsense value gets
OpenAI's 400 with a one-line message, and a field of the wrong type gets 422. `tools` stay plain
dicts here: serve_requests checks them as OpenAI does (400 naming e.g. `tools[0].function.name`).
Fields OpenAI defines that this server does not read are ignored, as OpenAI-compatible servers do;
the few that would change the answer's meaning and are not supported (n > 1, echo, suffix,
best_of > 1, a structured response_format, tool_choice "required") are refused.
"""

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class FunctionCall(_Body):
    name: str
    arguments: Union[str, dict, None] = None  # OpenAI sends a JSON string; a dict is accepted too


class ToolCall(_Body):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Body):
    type: str
    text: Optional[str] = None
    image_url: Optional[dict] = None  # {"url": "data:..." | "https://...", "detail": ...}


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None


class Sampling(_Body):
    """The sampling fields both endpoints share (OpenAI's, then this server's extensions)."""

    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None  # OpenAI's default: 1
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    n: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # extensions, with mlx-lm's meaning
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    repetition_context_size: Optional[int] = None
    num_draft_tokens: Union[int, str, None] = None


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    response_format: Optional[dict[str, Any]] = None


class CompletionRequest(Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: Optional[int] = None
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None


class ResponsesRequest(_Body):
    """OpenAI's Responses: `input` items stay dicts here; server.responses checks them (400)."""

    model: str
    input: Union[str, list[dict[str, Any]]]
    instructions: Optional[str] = None
    previous_response_id: Optional[str] = None
    store: bool = True
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    max_output_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stream: bool = False
    text: Optional[dict[str, Any]] = None
    metadata: Optional[dict[str, Any]] = None
    # extensions, as in chat
    seed: Optional[int] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    num_draft_tokens: Union[int, str, None] = None


class AnthropicMessage(_Body):
    role: Literal["user", "assistant"]
    content: Union[str, list[dict[str, Any]]]


class MessagesRequest(_Body):
    """Anthropic's Messages: content blocks and tools stay dicts here; server.messages checks them."""

    model: str
    max_tokens: int
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: Union[str, list[dict[str, Any]], None] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[dict[str, Any]] = None
    stop_sequences: Optional[list[str]] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    stream: bool = False
    metadata: Optional[dict[str, Any]] = None
    # extensions, as in chat
    seed: Optional[int] = None
    num_draft_tokens: Union[int, str, None] = None


class CountTokensRequest(_Body):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: Union[str, list[dict[str, Any]], None] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[dict[str, Any]] = None
