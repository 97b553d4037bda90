"""OpenAI's Responses API (`POST /v1/responses`), translated onto the one request.

`input` (a string or items: messages, function_call, function_call_output) and `instructions`
become chat-template messages; function tools become the tools the template sees. A reply is a
list of output items: a message with output_text, then a function_call item per tool call.
Responses are kept (`store`, on by default as OpenAI's) in a bounded LRU, so that a conversation
continues with `previous_response_id` without resending its history; its prompt then begins with
the tokens of the earlier turns, which the prompt cache pool still holds (cached_tokens).
"""

import json
import time
import uuid
from collections import OrderedDict
from contextlib import aclosing
from typing import Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import StreamingResponse

from mlx_gemma_mtp.server.errors import APIError, bad
from mlx_gemma_mtp.server.protocol import GenerateRequest, content_of, image_part
from mlx_gemma_mtp.server.requests import Server, check_tools
from mlx_gemma_mtp.server.schema import ResponsesRequest
from mlx_gemma_mtp.server.serving import SSE_HEADERS, generate, gone, receive, sse

STORE_ENTRIES = 1024  # responses kept for previous_response_id and GET
STORE_BYTES = 256 << 20  # and at most this much of their conversations (JSON's size)
NAMES = {"max_tokens": "max_output_tokens", "messages": "input"}


# --- the store -----------------------------------------------------------------------------------


class ResponseStore:
    """Finished responses and their conversations (chat-template messages, instructions left out,
    as OpenAI does not carry them over), least recently used out first."""

    def __init__(self, entries: int = STORE_ENTRIES, size: int = STORE_BYTES):
        self.limit, self.size_limit = entries, size
        self.items: OrderedDict = OrderedDict()  # id -> (response, messages, size)
        self.size = 0

    def put(self, response: dict, messages: list) -> None:
        size = len(json.dumps(messages, ensure_ascii=False)) + len(json.dumps(response, ensure_ascii=False))
        self.items[response["id"]] = (response, messages, size)
        self.size += size
        while self.items and (len(self.items) > self.limit or self.size > self.size_limit):
            _, (_, _, gone_size) = self.items.popitem(last=False)
            self.size -= gone_size

    def get(self, rid: str) -> Optional[tuple]:
        if rid not in self.items:
            return None
        self.items.move_to_end(rid)
        response, messages, _ = self.items[rid]
        return response, messages

    def delete(self, rid: str) -> bool:
        entry = self.items.pop(rid, None)
        if entry is not None:
            self.size -= entry[2]
        return entry is not None


# --- requests ------------------------------------------------------------------------------------


def part_of(part, where: str) -> dict:
    """An input part as a template content part: text, or an input_image's URL."""
    if isinstance(part, dict) and part.get("type") == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            raise bad(f"{where}: an input_image needs image_url (a data: or http(s) URL; file_id is not supported)",
                      where, "unsupported_value")
        return image_part(url)
    return {"type": "text", "text": part_text(part, where)}


def part_text(part, where: str) -> str:
    if not isinstance(part, dict):
        raise bad(f"{where} must be an object", where)
    kind = part.get("type")
    if kind == "input_image":
        raise bad(f"{where}: an image is not allowed here", where, "unsupported_value")
    if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
        raise bad(f"{where}: only input_text and output_text parts are supported, got {kind!r}", where,
                  "unsupported_value")
    return part["text"]


def message_of(item: dict, where: str) -> dict:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise bad(f"{where}.role must be 'user', 'assistant', 'system' or 'developer', got {role!r}", f"{where}.role")
    content = item.get("content")
    if isinstance(content, list):
        content = content_of([part_of(p, f"{where}.content[{i}]") for i, p in enumerate(content)])
    elif not isinstance(content, str):
        raise bad(f"{where}.content must be a string or a list of parts", f"{where}.content")
    return {"role": "system" if role == "developer" else role, "content": content}


def call_of(item: dict, where: str) -> dict:
    name, arguments, call_id = item.get("name"), item.get("arguments"), item.get("call_id")
    if not isinstance(name, str) or not name:
        raise bad(f"{where}.name must be a function's name", f"{where}.name")
    if not isinstance(call_id, str) or not call_id:
        raise bad(f"{where}.call_id must be a string", f"{where}.call_id")
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) and arguments.strip() else {}
    except json.JSONDecodeError:
        raise bad(f"{where}.arguments is not JSON", f"{where}.arguments") from None
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def input_messages(items) -> list:
    """`input` as chat-template messages: an assistant's function calls join its message, as the
    chat endpoint's assistant message with tool_calls; a function_call_output is a tool message."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not items:
        raise bad("input must not be empty", "input")
    out = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            out.append(message_of(item, where))
        elif kind == "function_call":
            call = call_of(item, where)
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output, call_id = item.get("output"), item.get("call_id")
            if isinstance(output, list):
                output = "".join(part_text(p, f"{where}.output[{j}]") for j, p in enumerate(output))
            if not isinstance(output, str) or not isinstance(call_id, str):
                raise bad(f"{where} needs a call_id and a string output", where)
            out.append({"role": "tool", "tool_call_id": call_id, "content": output})
        else:
            raise bad(f"{where}.type {kind!r} is not supported: use message, function_call or "
                      "function_call_output", f"{where}.type", "unsupported_value")
    return out


def template_tools(body: ResponsesRequest) -> Optional[list]:
    """Responses' function tools ({"type": "function", "name", ...}) as chat's, which the template
    sees; None without tools or with tool_choice "none"."""
    tools, choice = body.tools, body.tool_choice
    if choice is not None and not tools:
        raise bad("tool_choice is only allowed when tools are given", "tool_choice")
    named = choice.get("name") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if choice not in (None, "auto", "none", "required") and not isinstance(named, str):
        raise bad(f"tool_choice must be 'auto', 'none', 'required' or {{\"type\": \"function\", \"name\": ...}}, "
                  f"got {choice!r}", "tool_choice")
    out = []
    for i, tool in enumerate(tools or []):
        if tool.get("type") != "function":
            raise bad(f"tools[{i}].type must be 'function' (built-in tools are not supported), got "
                      f"{tool.get('type')!r}", f"tools[{i}].type", "unsupported_value")
        out.append({"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}})
    try:
        check_tools(out)
    except APIError as e:  # named as Responses names it (no ".function")
        raise bad(e.message.replace(".function.", "."), (e.param or "").replace(".function", "")) from None
    if named is not None:
        out = [t for t in out if t["function"]["name"] == named]
        if not out:
            raise bad(f"tool_choice names '{named}', which is not among the tools", "tool_choice")
    return out if out and choice != "none" else None


def response_format(text: Optional[dict]) -> Optional[dict]:
    """Responses' text.format ({"type": "json_schema", "name", "schema", "strict"} flat) in chat's shape."""
    fmt = (text or {}).get("format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return fmt
    return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}


def to_request(body: ResponsesRequest, history: list) -> GenerateRequest:
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    return GenerateRequest(messages=system + history + input_messages(body.input), tools=template_tools(body),
                           max_tokens=body.max_output_tokens, stream=body.stream, temperature=body.temperature,
                           top_p=body.top_p, top_k=body.top_k, min_p=body.min_p, seed=body.seed,
                           num_draft_tokens=body.num_draft_tokens, response_format=response_format(body.text),
                           force_tool=body.tool_choice == "required" or isinstance(body.tool_choice, dict),
                           names={**NAMES, "response_format": "text.format"})


# --- responses -----------------------------------------------------------------------------------


def usage_of(usage: dict) -> dict:
    return {"input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"], "mtp": usage["mtp"]}


def text_item(text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}


def call_item(call: dict, status: str = "completed") -> dict:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"], "name": call["name"],
            "arguments": call["arguments"] if status == "completed" else "", "status": status}


def envelope(rid: str, created: int, body: ResponsesRequest, server: Server) -> dict:
    """A response without its output: what response.created carries, and the frame of the rest."""
    return {"id": rid, "object": "response", "created_at": created, "status": "in_progress", "model": server.model_id,
            "output": [], "usage": None, "error": None, "incomplete_details": None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature, "top_p": body.top_p, "tools": body.tools or [],
            "tool_choice": body.tool_choice or "auto", "parallel_tool_calls": True,
            "previous_response_id": body.previous_response_id, "store": body.store,
            "text": {"format": {"type": "text"}}, "truncation": "disabled", "metadata": body.metadata or {}}


def finished(frame: dict, output: list, reason: str, usage: dict) -> dict:
    incomplete = reason == "length"
    return {**frame, "status": "incomplete" if incomplete else "completed", "output": output,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None, "usage": usage_of(usage)}


def assistant_message(output: list) -> dict:
    """The reply as the chat template sees an assistant turn (kept for previous_response_id)."""
    text = "".join(c["text"] for item in output if item["type"] == "message" for c in item["content"])
    calls = [{"id": item["call_id"], "type": "function",
              "function": {"name": item["name"], "arguments": json.loads(item["arguments"] or "{}")}}
             for item in output if item["type"] == "function_call"]
    message = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return message


def register(app: FastAPI, server: Server, store: Optional[ResponseStore] = None) -> None:
    store = store if store is not None else ResponseStore()

    def stored(rid: str) -> tuple:
        entry = store.get(rid)
        if entry is None:
            raise APIError(404, f"no response with id '{rid}' (responses are kept in memory, most recent "
                                f"{store.limit})", "response_id", "not_found")
        return entry

    @app.get("/v1/responses/{rid}")
    async def get_response(rid: str):
        return stored(rid)[0]

    @app.delete("/v1/responses/{rid}")
    async def delete_response(rid: str):
        stored(rid)
        store.delete(rid)
        return {"id": rid, "object": "response", "deleted": True}

    @app.post("/v1/responses")
    async def create_response(http: HTTPRequest):
        body = await receive(server, http, ResponsesRequest)
        if body is None:
            return gone()
        server.check_model(body.model)
        history = []
        if body.previous_response_id is not None:
            entry = store.get(body.previous_response_id)
            if entry is None:
                raise bad(f"previous response with id '{body.previous_response_id}' not found", "previous_response_id",
                          "previous_response_not_found")
            history = entry[1]
        req = to_request(body, history)
        conversation = req.messages[1:] if body.instructions else req.messages
        run = await generate(server, http, req)
        if run is None:
            return gone()
        frame = envelope(f"resp_{uuid.uuid4().hex}", int(time.time()), body, server)

        def keep(response: dict) -> None:
            if body.store:
                store.put(response, conversation + [assistant_message(response["output"])])

        if not body.stream:
            result = await run.whole(http)
            if result is None:
                return gone()
            output = [text_item(result.text)] if result.text.strip() or not result.calls else []
            output += [call_item(c) for c in result.calls]
            response = finished(frame, output, result.reason, result.usage)
            keep(response)
            return response
        return StreamingResponse(stream(run, frame, keep), media_type="text/event-stream", headers=SSE_HEADERS)


async def stream(run, frame: dict, keep):
    """Responses' event stream: each output item is added, filled by deltas and done, in order."""
    sequence, output = 0, []
    message, pending = None, ""  # the open message item; whitespace held until text comes (or a call)

    def event(kind: str, **data) -> str:
        nonlocal sequence
        sequence += 1
        return sse({"type": kind, "sequence_number": sequence - 1, **data}, kind)

    def open_message():
        nonlocal message
        message = text_item("", "in_progress")
        output.append(message)
        at = len(output) - 1
        return [event("response.output_item.added", output_index=at, item=message),
                event("response.content_part.added", item_id=message["id"], output_index=at, content_index=0,
                      part={"type": "output_text", "text": "", "annotations": []})]

    def close_message():
        nonlocal message
        at, text = output.index(message), "".join(message.pop("parts", []))
        part = {"type": "output_text", "text": text, "annotations": []}
        message.update(status="completed", content=[part])
        done = [event("response.output_text.done", item_id=message["id"], output_index=at, content_index=0,
                      text=text, logprobs=[]),
                event("response.content_part.done", item_id=message["id"], output_index=at, content_index=0,
                      part=part),
                event("response.output_item.done", output_index=at, item=message)]
        message = None
        return done

    def text(delta: str) -> list:
        out = open_message() if message is None else []
        message.setdefault("parts", []).append(delta)
        return out + [event("response.output_text.delta", item_id=message["id"], output_index=output.index(message),
                            content_index=0, delta=delta, logprobs=[])]

    yield event("response.created", response=frame)
    yield event("response.in_progress", response=frame)
    async with aclosing(run.events()) as events:
        async for item in events:
            if item[0] == "text" and item[1]:
                if message is None and not (pending + item[1]).strip():
                    pending += item[1]
                    continue
                for e in text(pending + item[1]):
                    yield e
                pending = ""
            elif item[0] == "tool_call":
                pending = ""  # whitespace before a call is no message (as in the whole reply)
                for e in close_message() if message is not None else []:
                    yield e
                call = call_item(item[1], "in_progress")
                output.append(call)
                at = len(output) - 1
                yield event("response.output_item.added", output_index=at, item=call)
                yield event("response.function_call_arguments.delta", item_id=call["id"], output_index=at,
                            delta=item[1]["arguments"])
                call.update(arguments=item[1]["arguments"], status="completed")
                yield event("response.function_call_arguments.done", item_id=call["id"], output_index=at,
                            name=call["name"], arguments=call["arguments"])
                yield event("response.output_item.done", output_index=at, item=call)
            elif item[0] == "error":
                e = item[1]
                yield event("error", code=e.code, message=e.message, param=e.param)
                return
            elif item[0] == "end":
                if message is None and not any(o["type"] == "function_call" for o in output):
                    for e in text(pending) if pending else open_message():
                        yield e
                for e in close_message() if message is not None else []:
                    yield e
                response = finished(frame, output, item[1], item[2])
                keep(response)
                kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
                yield event(kind, response=response)
