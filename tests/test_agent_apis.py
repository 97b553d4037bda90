"""The APIs agents speak: OpenAI's Responses and Anthropic's Messages, through the official clients.

One demo server runs for the module (a subprocess on a free local port); each API's greedy text is
checked against chat completions' for the same conversation. A miniature Gemma 4 pair is served in
this process with a logits processor that forces its greedy reply to be a Gemma 4 tool call whenever
tools are in the prompt, so that a tool call made by the model (with MTP on) comes back parsed.
"""

import concurrent.futures
import contextlib
import http.client
import json
import shutil
import threading
import time

import pytest

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
pytest.importorskip("fastapi")

import mlx.core as mx  # noqa: E402
import uvicorn  # noqa: E402

import mlx_gemma_mtp.server.worker as worker_module  # noqa: E402
from mlx_gemma_mtp import load  # noqa: E402
from mlx_gemma_mtp.model.demo import CHAT_TEMPLATE  # noqa: E402
from mlx_gemma_mtp.server.app import create_app  # noqa: E402
from mlx_gemma_mtp.server.requests import Server  # noqa: E402
from mlx_gemma_mtp.server.worker import Worker  # noqa: E402
from server_process import free_port, running_server  # noqa: E402

MODEL = "gemma-mtp-demo"
K = 3
GREEDY = {"temperature": 0}  # anthropic's client has no temperature argument: sent in the body
PROMPT = "def parse_args(argv):"
TOOL = {"name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}
CHAT_TOOLS = [{"type": "function", "function": TOOL}]
RESPONSES_TOOLS = [{"type": "function", **TOOL}]
MESSAGES_TOOLS = [{"name": TOOL["name"], "description": TOOL["description"], "input_schema": TOOL["parameters"]}]
CALL_TEXT = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>'


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("agents") / "server.log"
    with running_server(["--demo", "--num-draft-tokens", str(K), "--max-batch", "4", "--log-level", "warning"],
                        log) as port:
        yield port


def clients(port):
    return (openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=60, max_retries=0),
            anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="x", timeout=60, max_retries=0))


@pytest.fixture(scope="module")
def oc(demo_server):
    return clients(demo_server)[0]


@pytest.fixture(scope="module")
def ac(demo_server):
    return clients(demo_server)[1]


def chat_text(oc, messages, n, tools=None, model=MODEL):
    r = oc.chat.completions.create(model=model, messages=messages, max_tokens=n, temperature=0,
                                   **({"tools": tools} if tools else {}))
    return r.choices[0].message.content or "", r.usage


def responses_stream_text(oc, **kwargs):
    text, types, final = "", [], None
    for e in oc.responses.create(stream=True, **kwargs):
        types.append(e.type)
        if e.type == "response.output_text.delta":
            text += e.delta
        if e.type in ("response.completed", "response.incomplete"):
            final = e.response
    return text, types, final


# --- Responses -----------------------------------------------------------------------------------


def test_responses_equal_chat(oc):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    want, usage = chat_text(oc, messages, 20)
    r = oc.responses.create(model=MODEL, instructions="Be brief.", input=PROMPT, max_output_tokens=20, temperature=0)
    assert r.output_text == want and r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens == usage.prompt_tokens and r.usage.output_tokens == 20
    assert r.usage.total_tokens == usage.prompt_tokens + 20 and r.usage.mtp["num_draft_tokens"] == K
    text, types, final = responses_stream_text(oc, model=MODEL, instructions="Be brief.", input=PROMPT,
                                               max_output_tokens=20, temperature=0)
    assert text == want and final.output_text == want
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    # input as items, with input_text parts
    r = oc.responses.create(model=MODEL, instructions="Be brief.", max_output_tokens=20, temperature=0, input=[
        {"role": "user", "content": [{"type": "input_text", "text": PROMPT[:5]}, {"type": "input_text",
                                                                                 "text": PROMPT[5:]}]}])
    assert r.output_text == want


def test_responses_function_call_output_turn(oc):
    history = [{"role": "user", "content": "What is the weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    want, usage = chat_text(oc, history, 12, CHAT_TOOLS)
    items = [{"role": "user", "content": "What is the weather in Paris?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather",
              "arguments": json.dumps({"city": "Paris"})},
             {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]
    r = oc.responses.create(model=MODEL, input=items, tools=RESPONSES_TOOLS, max_output_tokens=12, temperature=0)
    assert r.output_text == want and r.usage.input_tokens == usage.prompt_tokens
    text, _, _ = responses_stream_text(oc, model=MODEL, input=items, tools=RESPONSES_TOOLS, max_output_tokens=12,
                                       temperature=0)
    assert text == want


def test_previous_response_id_continues_and_reuses_the_cache(oc, demo_server):
    first = oc.responses.create(model=MODEL, input=PROMPT, max_output_tokens=10, temperature=0)
    second = oc.responses.create(model=MODEL, input="for x in items:", previous_response_id=first.id,
                                 max_output_tokens=10, temperature=0)
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": "for x in items:"}]
    want, usage = chat_text(oc, messages, 10)
    assert second.output_text == want and second.usage.input_tokens == usage.prompt_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens  # the KV prefix reused
    got = oc.responses.retrieve(second.id)
    assert got.id == second.id and got.output_text == want
    # store: false keeps nothing
    r = oc.responses.create(model=MODEL, input=PROMPT, max_output_tokens=2, temperature=0, store=False)
    with pytest.raises(openai.NotFoundError):
        oc.responses.retrieve(r.id)
    oc.responses.delete(first.id)
    with pytest.raises(openai.BadRequestError):
        oc.responses.create(model=MODEL, input="x", previous_response_id=first.id, max_output_tokens=2)


# --- Messages ------------------------------------------------------------------------------------


def test_messages_equal_chat(ac, oc):
    want, usage = chat_text(oc, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}], 20)
    m = ac.messages.create(model=MODEL, max_tokens=20, system="Be brief.", extra_body=GREEDY,
                           messages=[{"role": "user", "content": PROMPT}])
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == want
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 20
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == usage.prompt_tokens
    with ac.messages.stream(model=MODEL, max_tokens=20, system=[{"type": "text", "text": "Be brief."}],
                            extra_body=GREEDY, messages=[{"role": "user", "content": PROMPT}]) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert final.content[0].text == want and final.stop_reason == "max_tokens"
    assert kinds[0] == "message_start" and "content_block_delta" in kinds and kinds[-1] == "message_stop"
    # a stop sequence ends the reply and is named
    stop = want.strip().split()[1]
    m = ac.messages.create(model=MODEL, max_tokens=20, stop_sequences=[stop], extra_body=GREEDY,
                           messages=[{"role": "user", "content": PROMPT}])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert m.content[0].text == want[:want.index(stop)]
    count = ac.messages.count_tokens(model=MODEL, system="Be brief.", messages=[{"role": "user", "content": PROMPT}])
    assert count.input_tokens == usage.prompt_tokens


def test_messages_tool_result_turn(ac, oc):
    history = [{"role": "user", "content": "What is the weather in Paris?"},
               {"role": "assistant", "content": "Let me look.", "tool_calls": [{"id": "call_1", "type": "function",
                                                                                "function": {
                   "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    want, usage = chat_text(oc, history, 12, CHAT_TOOLS)
    messages = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                                  {"type": "tool_use", "id": "call_1", "name": "get_weather",
                                                   "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1",
                                              "content": [{"type": "text", "text": "sunny"}]}]}]
    m = ac.messages.create(model=MODEL, max_tokens=12, tools=MESSAGES_TOOLS, messages=messages, extra_body=GREEDY)
    assert m.content[0].text == want
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == usage.prompt_tokens
    with ac.messages.stream(model=MODEL, max_tokens=12, tools=MESSAGES_TOOLS, messages=messages,
                            extra_body=GREEDY) as stream:
        assert stream.get_final_text() == want


# --- bad requests --------------------------------------------------------------------------------


def post(port, path, body=None, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        data = raw if raw is not None else json.dumps(body).encode()
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def test_bad_responses_requests(demo_server, oc):
    ok = {"model": MODEL, "input": "x", "max_output_tokens": 2}
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    cases = [
        ({"input": "x"}, 422), ({"model": MODEL}, 422), ({**ok, "model": "nope"}, 404),
        ({**ok, "input": []}, 400), ({**ok, "input": 5}, 422), ({**ok, "input": [{"role": "robot", "content": "x"}]}, 400),
        ({**ok, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, 400),
        ({**ok, "input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400),
        ({**ok, "input": [{"role": "user", "content": 5}]}, 400),
        ({**ok, "input": [{"type": "reasoning", "summary": []}]}, 400),
        ({**ok, "input": [{"type": "function_call", "name": "f", "arguments": "{"}]}, 400),
        ({**ok, "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{oops"}]}, 400),
        ({**ok, "input": [{"type": "function_call_output", "output": "x"}]}, 400),
        ({**ok, "max_output_tokens": 0}, 400), ({**ok, "max_output_tokens": "many"}, 422),
        ({**ok, "temperature": -1}, 400), ({**ok, "top_p": 7}, 400),
        ({**ok, "tools": [{"type": "web_search"}]}, 400), ({**ok, "tools": [{"type": "function", "name": "a b"}]}, 400),
        ({**ok, "tools": [tool], "tool_choice": {"type": "function", "name": "nope"}}, 400),
        ({**ok, "tool_choice": "auto"}, 400), ({**ok, "previous_response_id": "resp_nope"}, 400),
        ({**ok, "text": {"format": {"type": "json_schema", "schema": {}}}}, 400),
        ({**ok, "num_draft_tokens": 0}, 400), ({**ok, "input": "x\ud800"}, 400),
    ]
    for body, status in cases:
        got, error = post(demo_server, "/v1/responses", body)
        assert got == status, (body, error)
        assert set(error["error"]) == {"message", "type", "param", "code"} and error["error"]["message"], error
    assert post(demo_server, "/v1/responses", raw=b"{nope")[0] == 400
    got, error = post(demo_server, "/v1/responses", {**ok, "max_output_tokens": 0})
    assert error["error"]["param"] == "max_output_tokens"
    assert "whole server" in post(demo_server, "/v1/responses", {**ok, "num_draft_tokens": 0})[1]["error"]["message"]
    conn = http.client.HTTPConnection("127.0.0.1", demo_server, timeout=30)
    conn.request("GET", "/v1/responses/resp_nope")
    assert conn.getresponse().status == 404
    conn.close()
    assert oc.responses.create(model=MODEL, input=PROMPT, max_output_tokens=2).usage.output_tokens == 2  # alive


def test_bad_messages_requests(demo_server, ac):
    ok = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
    tool = {"name": "f", "input_schema": {"type": "object"}}
    cases = [
        ({k: v for k, v in ok.items() if k != "max_tokens"}, 400), ({**ok, "messages": []}, 400),
        ({**ok, "model": "nope"}, 404), ({**ok, "max_tokens": 0}, 400), ({**ok, "max_tokens": "x"}, 400),
        ({**ok, "messages": [{"role": "system", "content": "x"}]}, 400),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "document"}]}]}, 400),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
         400),
        ({**ok, "messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "f"}]}]}, 400),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]}, 400),
        ({**ok, "system": [{"type": "image"}]}, 400), ({**ok, "system": 5}, 400),
        ({**ok, "temperature": 1.5}, 400), ({**ok, "top_p": -0.1}, 400), ({**ok, "top_k": -3}, 400),
        ({**ok, "stop_sequences": [""]}, 400), ({**ok, "stop_sequences": "x"}, 400),
        ({**ok, "tools": [{"name": "f"}]}, 400), ({**ok, "tools": [{"name": "a b", "input_schema": {}}]}, 400),
        ({**ok, "tools": [{"type": "bash_20250124", "name": "bash"}]}, 400),
        ({**ok, "tools": [tool], "tool_choice": {"type": "tool", "name": "nope"}}, 400),
        ({**ok, "tool_choice": {"type": "sometimes"}}, 400),
        ({**ok, "num_draft_tokens": 0}, 400), ({**ok, "messages": [{"role": "user", "content": "\ud800"}]}, 400),
    ]
    for body, status in cases:
        got, error = post(demo_server, "/v1/messages", body)
        assert got == status, (body, error)
        assert error["type"] == "error" and set(error["error"]) == {"type", "message"}, error
        assert error["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    got, error = post(demo_server, "/v1/messages", raw=b"[1, 2")
    assert got == 400 and error["type"] == "error"
    got, error = post(demo_server, "/v1/messages/count_tokens", {"model": MODEL, "messages": []})
    assert got == 400 and error["type"] == "error"
    got, error = post(demo_server, "/v1/messages/nothing", ok)
    assert got == 404 and error["error"]["type"] == "not_found_error"
    too_big = b'{"model": "' + b"x" * (17 << 20) + b'"}'
    got, error = post(demo_server, "/v1/messages", raw=too_big)
    assert got == 413 and error["error"]["type"] == "request_too_large"
    assert ac.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "x"}]).usage \
        .output_tokens == 2  # alive


# --- concurrency ---------------------------------------------------------------------------------


def test_mixed_apis_concurrently_equal_sequentially(demo_server):
    prompts = [PROMPT, "class Point:", "import os", "for i in range(10):"]

    def one(i):
        oc, ac = clients(demo_server)
        p, n = prompts[i % 4], 8 + 4 * (i % 3)
        if i % 3 == 0:
            return chat_text(oc, [{"role": "user", "content": p}], n)[0]
        if i % 3 == 1:
            if i % 2:
                return responses_stream_text(oc, model=MODEL, input=p, max_output_tokens=n, temperature=0)[0]
            return oc.responses.create(model=MODEL, input=p, max_output_tokens=n, temperature=0).output_text
        if i % 2:
            with ac.messages.stream(model=MODEL, max_tokens=n, messages=[{"role": "user", "content": p}],
                                    extra_body=GREEDY) as stream:
                return stream.get_final_text()
        return ac.messages.create(model=MODEL, max_tokens=n, messages=[{"role": "user", "content": p}],
                                  extra_body=GREEDY).content[0].text

    sequential = [one(i) for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(8))) == sequential


# --- a miniature Gemma 4 pair whose greedy reply is a tool call ----------------------------------


def forcing(script: list, eos: int, trigger: list):
    """A logits processor: where `trigger` is in the prompt (the tools are), the reply is `script`
    then `eos`; elsewhere it does nothing."""
    def force(history, logits):
        seen = history.tolist()
        if not any(seen[i:i + len(trigger)] == trigger for i in range(len(seen) - len(trigger) + 1)):
            return logits
        done = max((n for n in range(len(script) + 1) if n == 0 or seen[-n:] == script[:n]), default=0)
        token = script[done] if done < len(script) else eos
        keep = mx.broadcast_to(mx.arange(logits.shape[-1]) == token, logits.shape)
        return mx.where(keep, mx.array(0.0, logits.dtype), mx.array(-1e9, logits.dtype))
    return force


@contextlib.contextmanager
def thread_server(loader, num_draft_tokens):
    worker = Worker(loader, num_draft_tokens, max_batch=4)
    worker.start()
    port = free_port()
    config = uvicorn.Config(create_app(Server(worker, "mini")), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 120
    while not (server.started and worker.ready.is_set()):
        assert time.time() < deadline and thread.is_alive() and worker.load_error is None, worker.load_error
        time.sleep(0.1)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        worker.stop()
        worker.join(timeout=30)


@pytest.fixture(scope="module")
def mini(pair_dir, tmp_path_factory):
    """The miniature e2b pair with a chat template that has tools (the demo's, in Gemma 4's markers),
    served in this process with the forcing processor added to every row."""
    folder = shutil.copytree(pair_dir("e2b"), tmp_path_factory.mktemp("agents") / "mini")
    config_file = folder / "target" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    pair, tok = load(str(folder))
    script = list(tok.encode(CALL_TEXT, add_special_tokens=False))
    assert tok.decode(script) == CALL_TEXT and len(script) < 70
    trigger = list(tok.encode('"get_weather"', add_special_tokens=False))[1:-1]
    force = forcing(script, tok.eos_token_id, trigger)
    original = worker_module.processors
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(worker_module, "processors", lambda settings: original(settings) + [force])
        with thread_server(lambda: load(str(folder)), K) as port:
            yield port


def test_a_tool_call_made_by_the_model(mini):
    oc, ac = clients(mini)
    ask = "What is the weather in Paris?"
    r = oc.chat.completions.create(model="mini", messages=[{"role": "user", "content": ask}], tools=CHAT_TOOLS,
                                   max_tokens=80, temperature=0)
    assert r.choices[0].finish_reason == "tool_calls" and r.usage.mtp["num_draft_tokens"] == K
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris", "days": 3}
    # Responses: a function_call item, whole and streamed
    r = oc.responses.create(model="mini", input=ask, tools=RESPONSES_TOOLS, max_output_tokens=80, temperature=0)
    assert [o.type for o in r.output] == ["function_call"] and r.status == "completed"
    call = r.output[0]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris", "days": 3}
    text, types, final = responses_stream_text(oc, model="mini", input=ask, tools=RESPONSES_TOOLS,
                                               max_output_tokens=80, temperature=0)
    assert text == "" and "response.function_call_arguments.delta" in types and types[-1] == "response.completed"
    assert [(o.type, o.name, json.loads(o.arguments)) for o in final.output] == \
        [("function_call", "get_weather", {"city": "Paris", "days": 3})]
    # the next turn answers the call by id: the stored conversation, the call and its output are the
    # prompt (tools are sent again: as OpenAI's, they are not carried over)
    r2 = oc.responses.create(model="mini", previous_response_id=r.id, max_output_tokens=4, temperature=0,
                             tools=RESPONSES_TOOLS,
                             input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    history = [{"role": "user", "content": ask},
               {"role": "assistant", "content": None, "tool_calls": [{"id": call.call_id, "type": "function",
                                                                      "function": {"name": call.name,
                                                                                   "arguments": call.arguments}}]},
               {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}]
    want = oc.chat.completions.create(model="mini", messages=history, tools=CHAT_TOOLS, max_tokens=4, temperature=0)
    assert r2.usage.input_tokens == want.usage.prompt_tokens and r2.usage.input_tokens_details.cached_tokens > 0
    # Messages: a tool_use block, whole and streamed
    m = ac.messages.create(model="mini", max_tokens=80, tools=MESSAGES_TOOLS, extra_body=GREEDY,
                           messages=[{"role": "user", "content": ask}])
    assert m.stop_reason == "tool_use" and [b.type for b in m.content] == ["tool_use"]
    assert m.content[0].name == "get_weather" and m.content[0].input == {"city": "Paris", "days": 3}
    with ac.messages.stream(model="mini", max_tokens=80, tools=MESSAGES_TOOLS, extra_body=GREEDY,
                            messages=[{"role": "user", "content": ask}]) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds and final.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in final.content] == [("tool_use", "get_weather",
                                                                  {"city": "Paris", "days": 3})]


def test_mini_pair_text_equal_across_apis(mini):
    oc, ac = clients(mini)
    messages = [{"role": "user", "content": "Hello, world!"}]
    want, _ = chat_text(oc, messages, 16, model="mini")
    assert want
    assert oc.responses.create(model="mini", input="Hello, world!", max_output_tokens=16,
                               temperature=0).output_text == want
    assert responses_stream_text(oc, model="mini", input="Hello, world!", max_output_tokens=16,
                                 temperature=0)[0] == want
    assert ac.messages.create(model="mini", max_tokens=16, messages=messages,
                              extra_body=GREEDY).content[0].text == want
    with ac.messages.stream(model="mini", max_tokens=16, messages=messages, extra_body=GREEDY) as stream:
        assert stream.get_final_text() == want
