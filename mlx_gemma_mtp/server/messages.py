"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`), translated onto the
one request.

`system` and the messages' content blocks (text, tool_use, tool_result) become chat-template
messages as the chat endpoint's: an assistant's tool_use blocks are its tool_calls, each tool_result
a "tool" message. Tools ({name, description, input_schema}) become the function tools the template
sees. Errors on these routes have Anthropic's shape, {"type": "error", "error": {"type", "message"}}.
"""

import json
import uuid
from contextlib import aclosing
from typing import Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from mlx_gemma_mtp.server.errors import APIError, bad
from mlx_gemma_mtp.server.protocol import GenerateRequest, content_of, image_part
from mlx_gemma_mtp.server.requests import Server, check_tools
from mlx_gemma_mtp.server.schema import CountTokensRequest, MessagesRequest
from mlx_gemma_mtp.server.serving import SSE_HEADERS, generate, gone, receive, sse

PREFIX = "/v1/messages"
MAX_STOPS = 64  # Anthropic sets no small limit; each stop string is looked for after every token
NAMES = {"stop": "stop_sequences"}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
               529: "overloaded_error"}


def error_body(exc: APIError) -> dict:
    status = 400 if exc.status == 422 else exc.status  # Anthropic answers a malformed body with 400
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=400 if exc.status == 422 else exc.status, headers=exc.headers)


# --- requests ------------------------------------------------------------------------------------


def image_url_of(block: dict, where: str) -> str:
    """An image block's source as a URL the server reads: base64 data as a data: URL, or its url."""
    source = block.get("source")
    if not isinstance(source, dict):
        raise bad(f"{where}.source must be an object", f"{where}.source")
    if source.get("type") == "base64":
        media, data = source.get("media_type"), source.get("data")
        if not isinstance(media, str) or not isinstance(data, str) or not data:
            raise bad(f"{where}.source needs media_type and data", f"{where}.source")
        return f"data:{media};base64,{data}"
    if source.get("type") == "url" and isinstance(source.get("url"), str) and source["url"]:
        return source["url"]
    raise bad(f"{where}.source.type must be 'base64' or 'url' (with its url)", f"{where}.source.type")


def block_text(block, where: str) -> str:
    if not isinstance(block, dict):
        raise bad(f"{where} must be an object", where)
    if block.get("type") == "image":
        raise bad(f"{where}: an image block is not allowed here", where)
    if block.get("type") != "text" or not isinstance(block.get("text"), str):
        raise bad(f"{where}: expected a text block, got {block.get('type')!r}", where)
    return block["text"]


def system_text(system, where: str = "system") -> Optional[str]:
    if system is None or isinstance(system, str):
        return system or None
    return "".join(block_text(b, f"{where}[{i}]") for i, b in enumerate(system)) or None


def tool_result(block: dict, where: str) -> dict:
    content, tool_use_id = block.get("content", ""), block.get("tool_use_id")
    if not isinstance(tool_use_id, str) or not tool_use_id:
        raise bad(f"{where}.tool_use_id must be a string", where)
    if isinstance(content, list):
        content = "".join(block_text(b, f"{where}.content[{j}]") for j, b in enumerate(content))
    if not isinstance(content, str):
        raise bad(f"{where}.content must be a string or text blocks", where)
    return {"role": "tool", "tool_call_id": tool_use_id, "content": content}


def tool_use(block: dict, where: str) -> dict:
    name, call_id, arguments = block.get("name"), block.get("id"), block.get("input", {})
    if not isinstance(name, str) or not name or not isinstance(call_id, str) or not isinstance(arguments, dict):
        raise bad(f"{where}: a tool_use block needs an id, a name and an input object", where)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def template_messages(messages: list) -> list:
    """Anthropic messages as chat-template messages, as the chat endpoint has them."""
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        parts, calls, results = [], [], []
        for j, block in enumerate(m.content):
            at, kind = f"{where}.content[{j}]", block.get("type") if isinstance(block, dict) else None
            if kind == "tool_use" and m.role == "assistant":
                calls.append(tool_use(block, at))
            elif kind == "tool_result" and m.role == "user":
                results.append(tool_result(block, at))
            elif kind == "image" and m.role == "user":
                parts.append(image_part(image_url_of(block, at)))
            elif kind == "text":
                parts.append({"type": "text", "text": block_text(block, at)})
            else:
                raise bad(f"{at}: a {kind!r} block is not supported in a {m.role} message", at)
        out += results  # tool results answer the assistant's calls, before the user's own words
        if calls:
            out.append({"role": "assistant", "content": content_of(parts) or None, "tool_calls": calls})
        elif parts or not results:
            out.append({"role": m.role, "content": content_of(parts)})
    return out


def template_tools(tools: Optional[list], choice: Optional[dict]) -> Optional[list]:
    kind = (choice or {}).get("type", "auto")
    if kind not in ("auto", "none", "any", "tool"):
        raise bad(f"tool_choice.type must be 'auto', 'any', 'tool' or 'none', got {kind!r}", "tool_choice")
    out = []
    for i, tool in enumerate(tools or []):
        if tool.get("type") not in (None, "custom"):
            raise bad(f"tools[{i}]: server and client tools of type {tool.get('type')!r} are not supported",
                      f"tools[{i}]")
        if not isinstance(tool.get("input_schema"), dict):
            raise bad(f"tools[{i}].input_schema: field required (an object)", f"tools[{i}]")
        out.append({"type": "function", "function": {
            "name": tool.get("name"), "description": tool.get("description"), "parameters": tool["input_schema"]}})
    try:
        check_tools(out)
    except APIError as e:
        raise bad(e.message.replace(".function.", ".").replace("parameters", "input_schema")) from None
    if kind == "tool":
        out = [t for t in out if t["function"]["name"] == choice.get("name")]
        if not out:
            raise bad(f"tool_choice names {choice.get('name')!r}, which is not among the tools", "tool_choice")
    return out if out and kind != "none" else None


def to_request(body) -> GenerateRequest:
    system = system_text(body.system)
    messages = ([{"role": "system", "content": system}] if system else []) + template_messages(body.messages)
    tools = template_tools(body.tools, body.tool_choice)
    if not isinstance(body, MessagesRequest):  # count_tokens
        return GenerateRequest(messages=messages, tools=tools)
    for name, value, low, high in (("temperature", body.temperature, 0, 1), ("top_p", body.top_p, 0, 1)):
        if value is not None and not low <= value <= high:
            raise bad(f"{name}: must be between {low} and {high}, got {value}", name)
    return GenerateRequest(messages=messages, tools=tools, max_tokens=body.max_tokens, stops=body.stop_sequences or [],
                           max_stops=MAX_STOPS, stream=body.stream, temperature=body.temperature, top_p=body.top_p,
                           top_k=body.top_k, seed=body.seed, num_draft_tokens=body.num_draft_tokens, names=NAMES,
                           force_tool=(body.tool_choice or {}).get("type") in ("any", "tool"))


# --- responses -----------------------------------------------------------------------------------


def usage_of(usage: dict) -> dict:
    # Anthropic's input_tokens leave out the cached ones (the prompt is their sum)
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    return {"input_tokens": usage["prompt_tokens"] - cached, "output_tokens": usage["completion_tokens"],
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0, "mtp": usage["mtp"]}


def tool_use_block(call: dict) -> dict:
    try:
        arguments = json.loads(call["arguments"])
    except json.JSONDecodeError:
        arguments = {}
    return {"type": "tool_use", "id": f"toolu_{call['id'].removeprefix('call_')}", "name": call["name"],
            "input": arguments}


def register(app: FastAPI, server: Server) -> None:
    @app.post(PREFIX + "/count_tokens")
    async def count_tokens(http: HTTPRequest):
        body = await receive(server, http, CountTokensRequest)
        if body is None:
            return gone()
        server.check_model(body.model)
        ids, _ = await run_in_threadpool(server.prompt_ids, to_request(body))
        return {"input_tokens": len(ids)}

    @app.post(PREFIX)
    async def create_message(http: HTTPRequest):
        body = await receive(server, http, MessagesRequest)
        if body is None:
            return gone()
        server.check_model(body.model)
        req = to_request(body)
        run = await generate(server, http, req)
        if run is None:
            return gone()
        message = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": server.model_id,
                   "content": [], "stop_reason": None, "stop_sequence": None}
        if not body.stream:
            result = await run.whole(http)
            if result is None:
                return gone()
            content = [{"type": "text", "text": result.text}] if result.text.strip() or not result.calls else []
            content += [tool_use_block(c) for c in result.calls]
            return {**message, "content": content, "stop_reason": stop_reason(result.reason, result.stop_sequence),
                    "stop_sequence": result.stop_sequence, "usage": usage_of(result.usage)}
        start_usage = {"input_tokens": run.prompt_tokens - run.cached_tokens, "output_tokens": 0,
                       "cache_read_input_tokens": run.cached_tokens, "cache_creation_input_tokens": 0}
        return StreamingResponse(stream(run, {**message, "usage": start_usage}), media_type="text/event-stream",
                                 headers=SSE_HEADERS)


def stop_reason(reason: str, stop_sequence: Optional[str]) -> str:
    return "stop_sequence" if stop_sequence is not None else STOP_REASONS.get(reason, "end_turn")


def event(kind: str, **data) -> str:
    return sse({"type": kind, **data}, kind)


async def stream(run, message: dict):
    """Anthropic's event stream: message_start, content blocks (start, deltas, stop), message_delta
    with the stop reason and usage, message_stop."""
    index, text_open, pending, called = -1, False, "", False
    yield event("message_start", message=message)
    yield event("ping")
    async with aclosing(run.events()) as events:
        async for item in events:
            if item[0] == "text" and item[1]:
                if not text_open and not (pending + item[1]).strip():
                    pending += item[1]  # whitespace before a tool call is no block (as in the whole reply)
                    continue
                if not text_open:
                    index, text_open = index + 1, True
                    yield event("content_block_start", index=index, content_block={"type": "text", "text": ""})
                yield event("content_block_delta", index=index, delta={"type": "text_delta", "text": pending + item[1]})
                pending = ""
            elif item[0] == "tool_call":
                if text_open:
                    yield event("content_block_stop", index=index)
                index, text_open, pending, called = index + 1, False, "", True
                block = tool_use_block(item[1])
                yield event("content_block_start", index=index, content_block={**block, "input": {}})
                yield event("content_block_delta", index=index,
                            delta={"type": "input_json_delta", "partial_json": json.dumps(block["input"])})
                yield event("content_block_stop", index=index)
            elif item[0] == "error":
                yield event("error", error=error_body(item[1])["error"])
                return
            elif item[0] == "end":
                _, reason, usage, stop = item
                if not text_open and not called:
                    index, text_open = index + 1, True
                    yield event("content_block_start", index=index, content_block={"type": "text", "text": ""})
                    if pending:
                        yield event("content_block_delta", index=index, delta={"type": "text_delta", "text": pending})
                if text_open:
                    yield event("content_block_stop", index=index)
                yield event("message_delta", delta={"stop_reason": stop_reason(reason, stop), "stop_sequence": stop},
                            usage=usage_of(usage))
                yield event("message_stop")
