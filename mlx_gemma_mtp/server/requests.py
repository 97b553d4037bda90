"""The requests of `gemma-mtp serve`: parsed, checked, templated and encoded.

`Server` holds what the HTTP handlers share (the engine thread, the tokenizers, the served model's
name). It parses request bodies (JSON whatever the Content-Type; a lone surrogate is refused), renders
chat templates (OpenAI messages as chat-template messages, the tools the template sees), encodes
completion prompts, checks prompt lengths and every setting against OpenAI's limits and the model's,
and builds each row's `Job` with its `engine.Request`, without MLX (processors that need arrays are
built in the engine thread). A refused request is an `APIError` naming its parameter.

Parsing a large body, templating and encoding run in worker threads (`starlette`'s thread pool), on
the engine thread's own copy of the tokenizer (`Worker.encoder`): they take seconds for a prompt of
megabytes, which on the event loop would stall every stream.
"""

import asyncio
import json
import math
import random
import re
import time
from typing import Optional

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from mlx_gemma_mtp.errors import MTPError
from mlx_gemma_mtp.server.schema import ChatCompletionRequest
from mlx_gemma_mtp.server.errors import APIError, bad, validation_error
from mlx_gemma_mtp.server.images import ImagePolicy, image_bytes
from mlx_gemma_mtp.server.jobs import Job
from mlx_gemma_mtp.server.protocol import GenerateRequest, content_of, image_part, image_urls
from mlx_gemma_mtp.server.worker import Worker

MAX_BODY_BYTES = 16 << 20  # --max-body-bytes' default

MAX_TOP_LOGPROBS = 20  # the engine's limit (and OpenAI's for chat)
PARSE_INLINE_BYTES = 64 << 10  # bodies up to this are parsed on the event loop (a thread costs more)
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names


# --- bodies --------------------------------------------------------------------------------------


def parse_body(raw: bytes, model):
    """A request body as `model`: 400 unless it is a JSON object of valid Unicode, 422 for a field
    of the wrong type."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise APIError(400, "the request body is not valid JSON: send a JSON object "
                            "(Content-Type: application/json)", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    where = lone_surrogate(data)
    if where is not None:
        raise bad(f"{where}: the text holds a lone surrogate (\\ud800-\\udfff without its pair), "
                  "which is not valid Unicode", where, "invalid_unicode")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def lone_surrogate(value, path: str = "") -> Optional[str]:
    """Where a string holds a lone surrogate (JSON's "\\ud800" decodes to one), as a parameter path;
    None if nowhere. Neither UTF-8, nor the tokenizer, nor a response can carry one."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if lone_surrogate(key) is not None:
                return path or "body"  # (the key itself cannot go into the message)
            found = lone_surrogate(item, f"{path}.{key}" if path else key)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = lone_surrogate(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


# --- chat ----------------------------------------------------------------------------------------


def message_text(content, where: str):
    """A message's content for the template: its text, or content parts when it has image_url
    parts (the template renders an image placeholder for each)."""
    if content is None or isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.type == "image_url":
            url = (part.image_url or {}).get("url")
            if not isinstance(url, str) or not url:
                raise bad(f"{where}: an image_url part needs image_url.url", "messages")
            parts.append(image_part(url))
        elif part.type != "text" or part.text is None:
            raise bad(f"{where}: only text and image_url content parts are supported, got '{part.type}'", "messages")
        else:
            parts.append({"type": "text", "text": part.text})
    return content_of(parts)


def template_messages(body: ChatCompletionRequest) -> list:
    """OpenAI messages as chat-template messages (tool call arguments as dicts, as templates
    such as Gemma 4's expect)."""
    out = []
    for i, m in enumerate(body.messages):
        where = f"messages[{i}]"
        msg = {"role": "system" if m.role == "developer" else m.role, "content": message_text(m.content, where)}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            calls = []
            for call in m.tool_calls:
                arguments = call.function.arguments
                if isinstance(arguments, str):
                    try:
                        arguments = json.loads(arguments) if arguments.strip() else {}
                    except json.JSONDecodeError:
                        raise bad(f"{where}: tool call arguments are not JSON", "messages") from None
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments or {}}})
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def check_tools(tools: Optional[list]) -> None:
    """Each tool as OpenAI requires it: {"type": "function", "function": {"name", "description"?,
    "parameters"?, "strict"?}}, a name of letters, digits, _ and - (at most 64)."""
    for i, tool in enumerate(tools or []):
        where = f"tools[{i}]"
        if tool.get("type") != "function":
            raise bad(f"{where}.type must be 'function', got {tool.get('type')!r}", f"{where}.type")
        function = tool.get("function")
        if function is None:
            raise bad(f"missing required parameter: '{where}.function'", f"{where}.function",
                      "missing_required_parameter")
        if not isinstance(function, dict):
            raise bad(f"{where}.function must be an object", f"{where}.function", "invalid_type")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise bad(f"{where}.function.name must be a string of letters, digits, '_' and '-' (at most 64), "
                      f"got {name!r}", f"{where}.function.name")
        for key, kind, what in (("description", str, "a string"), ("parameters", dict, "an object"),
                                ("strict", bool, "a boolean")):
            if function.get(key) is not None and not isinstance(function[key], kind):
                raise bad(f"{where}.function.{key} must be {what}", f"{where}.function.{key}", "invalid_type")


def chosen_tools(body: ChatCompletionRequest) -> Optional[list]:
    """The tools the template sees: none for tool_choice "none", one for a named function."""
    tools, choice = body.tools, body.tool_choice
    check_tools(tools)
    if choice is not None and not tools:
        raise bad("tool_choice is only allowed when tools are given", "tool_choice")
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise bad("tool_choice must be 'none', 'auto' or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                      "tool_choice")
        named = [t for t in tools if t["function"]["name"] == name]
        if not named:
            raise bad(f"tool_choice names '{name}', which is not among the tools", "tool_choice")
        return named
    if choice not in (None, "auto", "required"):
        raise bad(f"tool_choice must be 'none', 'auto', 'required' or a function, got {choice!r}", "tool_choice")
    return tools


def check_number(value, name: str, low: float, high: float) -> None:
    if value is not None and not (math.isfinite(value) and low <= value <= high):
        raise bad(f"{name} must be between {low:g} and {high:g}, got {value}", name)


class Server:
    """What the HTTP handlers share: the engine thread, the tokenizers, the served model's name.
    The pair and the tokenizers are the engine thread's, read once it has loaded them."""

    def __init__(self, worker: Worker, model_id: str, default_max_tokens: int = 512,
                 max_body_bytes: int = MAX_BODY_BYTES, image_policy: ImagePolicy = ImagePolicy()):
        self.worker, self.model_id, self.default_max_tokens = worker, model_id, default_max_tokens
        self.max_body_bytes = max_body_bytes
        self.image_policy = image_policy
        self.created = int(time.time())

    @property
    def pair(self):
        return self.worker.pair

    @property
    def tokenizer(self):
        """The tokenizer's settings (tool calling, template); requests encode with `encoder`."""
        return self.worker.tokenizer

    async def parse(self, raw: bytes, model):
        """`parse_body`, in a worker thread for a large body."""
        if len(raw) <= PARSE_INLINE_BYTES:
            return parse_body(raw, model)
        return await run_in_threadpool(parse_body, raw, model)

    def check_model(self, model: str) -> None:
        if model != self.model_id:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.model_id}'",
                           "model", "model_not_found")

    def check_length(self, ids: list, param: str) -> None:
        context = self.pair.view.args.max_position_embeddings
        if len(ids) >= context:
            raise bad(f"the prompt has {len(ids)} tokens; the model's context is {context} tokens",
                      param, "context_length_exceeded")

    # prompt_ids runs in a worker thread (encoding takes seconds for megabytes)

    def prompt_ids(self, req: GenerateRequest) -> tuple:
        """(token ids, image spans) of the request's prompt: its messages through the chat
        template (with their images), or its raw prompt."""
        return self.chat_ids(req) if req.messages is not None else (self.completion_ids(req), ())

    def chat_ids(self, req: GenerateRequest) -> tuple:
        if not self.tokenizer.has_chat_template:
            raise bad("the model's tokenizer has no chat template: use /v1/completions", req.param("messages"))
        try:
            with self.worker.encoder_lock:
                ids = self.worker.encoder.apply_chat_template(req.messages, tools=req.tools,
                                                              add_generation_prompt=True)
        except Exception as e:  # the template refused the conversation
            raise bad(f"the chat template could not render the messages: {e}", req.param("messages")) from None
        ids, spans = list(ids), ()
        urls = image_urls(req.messages)
        if urls:
            ids, spans = self.with_images(ids, urls, req.param("messages"))
        self.check_length(ids, req.param("messages"))
        return ids, spans

    def with_images(self, ids: list, urls: list, param: str) -> tuple:
        """(ids with each image's tokens, image spans): the images fetched and prepared here (a
        worker thread); they are encoded in the engine thread, or taken from its caches."""
        from mlx_gemma_mtp.api import prompt_segments

        try:
            if self.pair.images is None:
                raise MTPError("this model takes no images (it was not loaded from a folder with a vision tower)")
            self.pair.images.info  # a model without a vision tower is refused before any URL is fetched
            images = [image_bytes(url, self.image_policy) for url in urls]
            return prompt_segments(self.pair, self.tokenizer, ids, images)
        except MTPError as e:
            code = "context_length_exceeded" if "context" in str(e) else None
            raise bad(str(e), param, code) from None

    def completion_ids(self, req: GenerateRequest) -> list:
        from mlx_gemma_mtp.api import prompt_ids

        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise bad("one prompt per request is supported", "prompt", "unsupported_value")
            prompt = prompt[0]
        if isinstance(prompt, list):
            vocab = self.pair.view.args.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise bad(f"the prompt's token ids must be in [0, {vocab})", "prompt")
        else:
            with self.worker.encoder_lock:
                prompt = self.worker.encoder.encode(prompt) if prompt else []
        if not prompt:
            raise bad("the prompt is empty", "prompt")
        self.check_length(prompt, "prompt")
        try:
            return prompt_ids(self.pair, self.tokenizer, prompt)
        except MTPError as e:
            raise bad(str(e), "prompt") from None

    def check(self, req: GenerateRequest) -> dict:
        """Check the settings that do not depend on the prompt (before it is encoded, which can
        take long) -> what `job` builds the row from."""
        from mlx_gemma_mtp.limits import check_draft_tokens

        if req.n is not None and req.n < 1:
            raise bad(f"n must be at least 1, got {req.n}", "n")
        if req.n not in (None, 1):
            raise bad("n > 1 is not supported: send one request per choice", "n", "unsupported_value")
        max_tokens = self.default_max_tokens if req.max_tokens is None else req.max_tokens
        if max_tokens < 1:
            raise bad(f"{req.param('max_tokens')} must be at least 1, got {max_tokens}", req.param("max_tokens"))
        stops = list(req.stops)
        if len(stops) > req.max_stops:
            raise bad(f"at most {req.max_stops} stop strings, got {len(stops)}", req.param("stop"))
        if any(not isinstance(s, str) or not s for s in stops):
            raise bad("stop strings must not be empty", req.param("stop"))
        check_number(req.presence_penalty, "presence_penalty", -2, 2)
        check_number(req.frequency_penalty, "frequency_penalty", -2, 2)
        bias = None
        if req.logit_bias:
            vocab, bias = self.pair.view.args.vocab_size, {}
            for key, value in req.logit_bias.items():
                try:
                    token = int(key)
                except ValueError:
                    raise bad(f"logit_bias keys must be token ids, got '{key}'", "logit_bias") from None
                if not 0 <= token < vocab:
                    raise bad(f"logit_bias token {token} is outside the vocabulary [0, {vocab})", "logit_bias")
                check_number(value, "logit_bias", -100, 100)
                bias[token] = value
        top = req.top_logprobs
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise bad(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {top}", "top_logprobs")
        if req.num_draft_tokens is not None:
            try:
                asked = check_draft_tokens(req.num_draft_tokens)
            except MTPError as e:
                raise bad(str(e), "num_draft_tokens") from None
            # every row of a round verifies the same K drafts (runtime.engine.build_round): a row
            # drafted otherwise would need a batch of its own
            if asked != self.worker.draft_tokens:
                raise bad(f"num_draft_tokens is set for the whole server ({self.worker.draft_tokens}: one batch "
                          f"drafts one length); this request asked for {asked}", "num_draft_tokens",
                          "unsupported_value")
        return {"max_tokens": max_tokens, "stops": stops, "bias": bias}

    def structured(self, req: GenerateRequest) -> Optional[tuple]:
        """(Grammar, the response_format every rank rebuilds it from) for a structured
        response_format or a forced tool call (`req.force_tool`: one of `req.tools`); None if
        neither. Compiling can take long for a large schema: call it in a worker thread."""
        from mlx_gemma_mtp.runtime import structured, tool_grammar

        fmt = req.response_format
        wants_format = fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") in (None, "text"))
        forced = req.force_tool and req.tools is not None
        if forced and wants_format:
            raise bad("a structured response format and a forced tool choice cannot be combined",
                      req.param("response_format"), "unsupported_value")
        if forced:
            if not self.tokenizer.has_tool_calling:
                raise bad("the model's tokenizer has no tool-call format: tool_choice cannot force a call",
                          req.param("tool_choice"), "unsupported_value")
            fmt, param = {"type": "grammar", "lark": tool_grammar.tool_call_lark(req.tools, self.tokenizer)}, \
                req.param("tool_choice")
        elif wants_format:
            param = req.param("response_format")
        else:
            return None
        try:
            grammar = structured.response_format(fmt, self.tokenizer, self.pair.view.args.vocab_size, param)
        except MTPError as e:
            raise bad(str(e), param) from None
        return grammar, fmt

    def job(self, req: GenerateRequest, ids: list, settings: dict, structured=None, images: tuple = ()) -> Job:
        """Build the row's Request from the checked `settings` (without MLX: processors that need
        arrays are built in the engine thread); `structured`: `Server.structured`'s answer."""
        from mlx_gemma_mtp.api import make_request

        max_tokens, stops, bias = settings["max_tokens"], settings["stops"], settings["bias"]
        temperature = 1.0 if req.temperature is None else req.temperature
        seed = req.seed
        if seed is None and not (isinstance(temperature, (int, float)) and temperature == 0):
            seed = random.randrange(2**31)  # what Sampling would draw, without touching MLX here
        kwargs = dict(temperature=temperature, seed=seed)
        for name in ("top_p", "top_k", "min_p", "repetition_penalty", "repetition_context_size"):
            if getattr(req, name) is not None:
                kwargs[name] = getattr(req, name)
        try:
            grammar = None if structured is None else structured[0]
            request = make_request(self.pair, self.tokenizer, len(ids), max_tokens, grammar=grammar, **kwargs)
            if structured is not None:
                kwargs["response_format"] = structured[1]  # other ranks compile it again
        except MTPError as e:  # its messages begin with the argument's name
            name = str(e).split(" ", 1)[0]
            known = name in kwargs or name == "max_tokens"
            raise bad(str(e), req.param(name) if known else None) from None
        loop = asyncio.get_running_loop()
        processors = {"logit_bias": bias, "presence_penalty": req.presence_penalty,
                      "frequency_penalty": req.frequency_penalty}
        return Job(ids, request, stops, req.top_logprobs, processors, loop, asyncio.Queue(),
                   settings={"max_tokens": max_tokens, **kwargs}, whole=not req.stream, images=images)
