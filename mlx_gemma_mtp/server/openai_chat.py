"""OpenAI's chat completions and completions, translated onto the one request (`server.protocol`)."""

import time
import uuid
from contextlib import aclosing

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import StreamingResponse

from mlx_gemma_mtp.server.errors import bad
from mlx_gemma_mtp.server.protocol import GenerateRequest, sampling_of
from mlx_gemma_mtp.server.requests import Server, chosen_tools, template_messages
from mlx_gemma_mtp.server.schema import ChatCompletionRequest, CompletionRequest
from mlx_gemma_mtp.server.serving import SSE_HEADERS, generate, gone, receive, sse
from mlx_gemma_mtp.server.text import chat_logprobs, completion_logprobs


def stops_of(stop) -> list:
    return [stop] if isinstance(stop, str) else list(stop or [])


def chat_request(body: ChatCompletionRequest) -> GenerateRequest:
    if body.top_logprobs is not None and not body.logprobs:
        raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    forced = body.tool_choice == "required" or isinstance(body.tool_choice, dict)
    return GenerateRequest(messages=template_messages(body), tools=chosen_tools(body), max_tokens=max_tokens,
                           stops=stops_of(body.stop), stream=body.stream, response_format=body.response_format,
                           force_tool=forced,
                           top_logprobs=(body.top_logprobs or 0) if body.logprobs else None, **sampling_of(body))


def completion_request(body: CompletionRequest) -> GenerateRequest:
    if body.echo:
        raise bad("echo is not supported", "echo", "unsupported_value")
    if body.suffix:
        raise bad("suffix is not supported", "suffix", "unsupported_value")
    if body.best_of not in (None, 1):
        raise bad("best_of > 1 is not supported", "best_of", "unsupported_value")
    return GenerateRequest(prompt=body.prompt, max_tokens=body.max_tokens, stops=stops_of(body.stop),
                           stream=body.stream, top_logprobs=body.logprobs, **sampling_of(body))


def chat_calls(calls: list, first: int, with_index: bool = True) -> list:
    out = [{"index": first + i, "id": c["id"], "type": "function",
            "function": {"name": c["name"], "arguments": c["arguments"]}} for i, c in enumerate(calls)]
    return out if with_index else [{k: v for k, v in c.items() if k != "index"} for c in out]


def register(app: FastAPI, server: Server) -> None:
    # The bodies are read and parsed by hand (not as FastAPI body parameters): bounded in size,
    # parsed off the event loop when large, and JSON whatever the Content-Type, as OpenAI takes it.
    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        body = await receive(server, http, ChatCompletionRequest)
        if body is None:
            return gone()
        server.check_model(body.model)
        req = chat_request(body)
        run = await generate(server, http, req)
        if run is None:
            return gone()
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_id}
        logprobs = req.top_logprobs is not None
        if not body.stream:
            result = await run.whole(http)
            if result is None:
                return gone()
            message = {"role": "assistant", "content": result.text}
            if req.tools is not None and server.tokenizer.has_tool_calling and result.calls:
                message["tool_calls"] = chat_calls(result.calls, 0, with_index=False)
                if not result.text.strip():
                    message["content"] = None
            choice = {"index": 0, "message": message, "finish_reason": result.reason,
                      "logprobs": {"content": chat_logprobs(result.entries)} if logprobs else None}
            return {**base, "object": "chat.completion", "choices": [choice], "usage": result.usage}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta, lp=None, reason=None):
            out = {**base, "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}]}
            if include_usage:
                out["usage"] = None
            return out

        async def events():
            calls = 0
            yield sse(chunk({"role": "assistant", "content": ""}))
            async with aclosing(run.events()) as stream:
                async for event in stream:
                    if event[0] == "text":
                        yield sse(chunk({"content": event[1]}, {"content": chat_logprobs(event[2])}
                                        if logprobs and event[2] else None))
                    elif event[0] == "tool_call":
                        yield sse(chunk({"tool_calls": chat_calls([event[1]], calls)}))
                        calls += 1
                    elif event[0] == "error":
                        yield sse(event[1].body())
                        break
                    else:
                        yield sse(chunk({}, None, event[1]))
                        if include_usage:
                            yield sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": event[2]})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = await receive(server, http, CompletionRequest)
        if body is None:
            return gone()
        server.check_model(body.model)
        req = completion_request(body)
        run = await generate(server, http, req)
        if run is None:
            return gone()
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": server.model_id}
        want_lp = body.logprobs is not None
        if not body.stream:
            result = await run.whole(http)
            if result is None:
                return gone()
            choice = {"index": 0, "text": result.text, "finish_reason": result.reason,
                      "logprobs": completion_logprobs(result.entries, 0) if want_lp else None}
            return {**base, "choices": [choice], "usage": result.usage}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(text, lp=None, reason=None):
            out = {**base, "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": reason}]}
            if include_usage:
                out["usage"] = None
            return out

        async def events():
            offset = 0
            async with aclosing(run.events()) as stream:
                async for event in stream:
                    if event[0] == "text":
                        yield sse(chunk(event[1], completion_logprobs(event[2], offset) if want_lp else None))
                        offset += len(event[1])
                    elif event[0] == "error":
                        yield sse(event[1].body())
                        break
                    elif event[0] == "end":
                        yield sse(chunk("", None, event[1]))
                        if include_usage:
                            yield sse({**base, "choices": [], "usage": event[2]})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)
