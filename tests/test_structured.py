"""Structured output: grammar constraints as masks at verification, with MTP on.

Every constrained reply parses and validates against its schema (the demo pair and a random
miniature pair produce valid JSON only because of the grammar); greedy constrained MTP output is
greedy constrained plain output, token for token; sampled constrained output keeps the masked,
renormalized target distribution (a chi-square test at the first drafted position, which fails
when drafts are not masked); the server enforces json_schema and tool_choice "required".
"""

import json
import math

import mlx.core as mx
import numpy as np
import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

import mlx_gemma_mtp.runtime.engine as engine_module  # noqa: E402
from mlx_gemma_mtp import batch_generate, stream_generate  # noqa: E402
from mlx_gemma_mtp.runtime import structured  # noqa: E402
from mlx_gemma_mtp.errors import MTPError  # noqa: E402
from mlx_gemma_mtp.model.demo import load_demo  # noqa: E402
from mlx_gemma_mtp.runtime.cache import reserve  # noqa: E402
from mlx_gemma_mtp.runtime.grammar import allowed, single_token  # noqa: E402
from mlx_gemma_mtp.runtime.sampling import Sampling, log_distribution  # noqa: E402

MODEL = "gemma-mtp-demo"
SMALL_INT = {"type": "integer", "minimum": 0, "maximum": 99}


def obj(properties: dict, required=None) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required,
            "additionalProperties": False}


# bounded sizes, so that every reply can (and does) end within MAX_TOKENS
SCHEMAS = [
    obj({"user": obj({"id": SMALL_INT, "name": {"type": "string", "maxLength": 6}})}),  # nested objects
    {"type": "array", "items": SMALL_INT, "minItems": 1, "maxItems": 4},  # arrays
    obj({"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3]}}),  # enums
    obj({"a": {"type": "boolean"}, "b": {"type": "string", "maxLength": 4}}, required=["a"]),  # required / optional
    obj({"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}}),  # a string with a pattern
    {"type": "array", "items": obj({"k": {"type": "string", "maxLength": 3}, "v": SMALL_INT}), "maxItems": 2},
    {"enum": ["yes", "no", "maybe"]},
    {"anyOf": [SMALL_INT, {"type": "boolean"}, {"type": "null"}]},
    obj({"x": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25}, "n": {"type": "integer", "minimum": -5,
                                                                                            "maximum": 5}}),
    {"type": "array", "items": {"type": "array", "items": {"enum": [0, 1]}, "maxItems": 2}, "maxItems": 2},
]
MAX_TOKENS = 64
PROMPTS = ["Reply in JSON:", "def main():", "The weather is", "Numbers: 1 2 3"]


@pytest.fixture(scope="module")
def demo():
    return load_demo()


def check_replies(schemas: list, texts: list, finish: list) -> None:
    for schema, text, reason in zip(schemas, texts, finish):
        assert reason == "stop", (schema, text, reason)  # every reply completes
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("k", [0, 3, "adaptive"])
def test_replies_validate_batched(demo, k):
    """10 schemas x 4 rows (greedy and sampled) in one batch per K: 120 replies over the three Ks."""
    pair, tok = demo
    rows = [(s, p, t) for s in SCHEMAS for p, t in zip(PROMPTS, [0.0, 0.0, 1.0, 1.3])]
    schemas = [s for s, _, _ in rows]
    out = batch_generate(pair, tok, [p for _, p, _ in rows], max_tokens=MAX_TOKENS, num_draft_tokens=k,
                         json_schema=schemas, temperature=[t for _, _, t in rows], seed=list(range(len(rows))))
    check_replies(schemas, out.texts, out.finish_reasons)


def test_replies_validate_single(demo):
    """One row at a time (stream_generate), greedy and sampled: 20 replies."""
    pair, tok = demo
    for i, schema in enumerate(SCHEMAS):
        for temperature in (0.0, 1.0):
            responses = list(stream_generate(pair, tok, PROMPTS[i % 4], max_tokens=MAX_TOKENS, num_draft_tokens=3,
                                             json_schema=schema, temperature=temperature, seed=i))
            check_replies([schema], ["".join(r.text for r in responses)], [responses[-1].finish_reason])


def test_random_miniature_model_replies_validate(loaded):
    """A random model writes valid JSON only because of the grammar; response_format spelled as OpenAI's."""
    pair, tok = loaded("e2b")
    schemas = SCHEMAS[2:5] + SCHEMAS[6:8]
    formats = [{"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": s}} for i, s in enumerate(schemas)]
    out = batch_generate(pair, tok, ["x"] * len(schemas), max_tokens=MAX_TOKENS, num_draft_tokens=3,
                         response_format=formats, temperature=0.0)
    check_replies(schemas, out.texts, out.finish_reasons)


@pytest.mark.parametrize("which", ["demo", "e2b"])
def test_greedy_mtp_equals_greedy_plain(demo, loaded, which):
    pair, tok = demo if which == "demo" else loaded("e2b")
    schemas = SCHEMAS[:6]
    runs = [batch_generate(pair, tok, [PROMPTS[i % 4] for i in range(len(schemas))], max_tokens=MAX_TOKENS,
                           num_draft_tokens=k, json_schema=schemas) for k in (0, 3, 5, "adaptive")]
    assert all(r.tokens == runs[0].tokens for r in runs[1:])
    for r in runs:
        check_replies(schemas, r.texts, r.finish_reasons)


def test_mixed_batch_unconstrained_rows_unchanged(demo):
    """Unconstrained rows decode exactly as alone when constrained rows share their batch."""
    pair, tok = demo
    alone = batch_generate(pair, tok, PROMPTS[:2], max_tokens=24, num_draft_tokens=3).tokens
    mixed = batch_generate(pair, tok, PROMPTS[:2] + PROMPTS[:2], max_tokens=24, num_draft_tokens=3,
                           json_schema=[None, None, SCHEMAS[0], SCHEMAS[2]])
    assert mixed.tokens[:2] == alone
    check_replies([SCHEMAS[0], SCHEMAS[2]], mixed.texts[2:], mixed.finish_reasons[2:])


def test_forced_tokens_replace_drafts_without_changing_output(demo, monkeypatch):
    pair, tok = demo
    grammar = structured.json_schema(SCHEMAS[0], tok, pair.view.args.vocab_size)
    with_replacement = batch_generate(pair, tok, PROMPTS[:2], max_tokens=MAX_TOKENS, num_draft_tokens=4,
                                      grammar=grammar)
    real = engine_module.Constraint.round_masks

    def without_replacement(self, drafts):
        self.replace_forced = False
        return real(self, drafts)

    monkeypatch.setattr(engine_module.Constraint, "round_masks", without_replacement)
    without = batch_generate(pair, tok, PROMPTS[:2], max_tokens=MAX_TOKENS, num_draft_tokens=4, grammar=grammar)
    assert with_replacement.tokens == without.tokens
    check_replies([SCHEMAS[0]] * 2, with_replacement.texts, with_replacement.finish_reasons)
    rounds = lambda r: sum(s.rounds for s in r.stats)  # noqa: E731
    assert rounds(with_replacement) < rounds(without)  # forced keys ({"user":{"id": ...) are never rejected


def test_round_masks_stop_at_the_first_rejected_draft(demo):
    pair, tok = demo
    vocab = pair.view.args.vocab_size
    c = structured.regex("xyz[0-9]", tok, vocab).constraint(tok, vocab, eos_ids=tok.eos_token_ids)
    xyz, one = tok.encode("xyz1", add_special_tokens=False)
    start = c.mask().copy()
    assert single_token(start) == xyz  # the demo's vocabulary has "xyz": the first token is forced
    c.replace_forced = False
    m = c.round_masks([xyz, 5, one])
    assert allowed(m.words[1], one) and not allowed(m.words[1], 5)  # draft 2 is rejected at position 1
    assert (m.words[2:] == -1).all()  # positions after it are never read: all allowed, no empty distribution
    assert (c.mask() == start).all()  # rolled back
    c.replace_forced = True
    m = c.round_masks([5, one, 7])
    assert m.drafts[:2] == [xyz, one] and m.forced[:2] == [xyz, -1] and single_token(m.words[0]) == xyz
    assert m.forced[2] in tok.eos_token_ids  # the grammar is complete: only EOS remains
    assert (c.mask() == start).all()


def test_bad_grammars_raise_naming_the_problem(demo):
    pair, tok = demo
    with pytest.raises(MTPError, match="json_schema"):
        stream_generate(pair, tok, "x", json_schema={"type": "nope"}).__next__()
    with pytest.raises(MTPError, match="regex"):
        batch_generate(pair, tok, ["x"], response_format={"type": "regex", "regex": "("})
    with pytest.raises(MTPError, match="at most one"):
        batch_generate(pair, tok, ["x"], json_schema={}, response_format={"type": "json_object"})


# --- the sampled distribution ----------------------------------------------------------------------


def chi_square_p(observed: np.ndarray, expected: np.ndarray) -> float:
    """p-value of Pearson's test (bins with expected < 5 merged), by Wilson-Hilferty; 0 when a
    token of probability 0 (one the mask forbids) was seen."""
    if observed[expected == 0].any():
        return 0.0
    order = np.argsort(-expected)
    big = [i for i in order if expected[i] >= 5]
    rest = [i for i in order if expected[i] < 5]
    obs = [observed[i] for i in big] + [observed[rest].sum()]
    exp = [expected[i] for i in big] + [expected[rest].sum()]
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0)
    dof = max(1, sum(1 for e in exp if e > 0) - 1)
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def masked_distribution(pair, tok, grammar, ids: list) -> np.ndarray:
    """The masked, renormalized target distribution (temperature 1) of the token after ids."""
    cache = pair.view.make_cache()
    reserve(cache, len(ids))  # (the view's caches need their room reserved, as the engine does)
    hidden = pair.view.hidden(mx.array(ids, mx.uint32)[None], cache)[:, -1:]
    logits = pair.view.logits(hidden)[:, 0]
    c = grammar.constraint(tok, pair.view.args.vocab_size, tok.eos_token_ids)
    prompt_length = len(tok.encode(PROMPT))
    assert c.matcher.consume_tokens(ids[prompt_length:]) if len(ids) > prompt_length else True
    words = c.mask()
    allow = np.array([allowed(words, t) for t in range(logits.shape[-1])])
    logits = mx.where(mx.array(allow)[None], logits, -float("inf"))
    return np.exp(np.array(log_distribution(Sampling(1.0, seed=0), logits)[0], dtype=np.float64))


PROMPT = "Numbers: 1 2 3 4"
N_SAMPLES = {False: 240, True: 120}  # the unmasked case fails by far: fewer rows show it


@pytest.mark.parametrize("skip_draft_masks", [False, True])
def test_sampled_first_draft_keeps_the_masked_distribution(demo, monkeypatch, skip_draft_masks):
    """The first two tokens (the first from the prefill, the second decided by the first draft of
    the first round, K = 1) against their exact joint law p(t1) p(t2 | t1), both masked."""
    pair, tok = demo
    grammar = structured.regex("[0-9]{2,4}", tok, pair.view.args.vocab_size)
    if skip_draft_masks:  # the prefill's first token is masked, the round's verification is not
        real = engine_module.apply_masks
        monkeypatch.setattr(engine_module, "apply_masks", lambda logits, words: logits if logits.ndim == 3 else
                            real(logits, words))
    n = N_SAMPLES[skip_draft_masks]
    out = batch_generate(pair, tok, [PROMPT] * n, max_tokens=3, num_draft_tokens=1, grammar=grammar,
                         temperature=1.0, seed=list(range(n)))
    ids = tok.encode(PROMPT)
    p0 = masked_distribution(pair, tok, grammar, ids)
    firsts = np.flatnonzero(p0 > 0)  # the digit tokens
    joint = np.concatenate([p0[t] * masked_distribution(pair, tok, grammar, ids + [int(t)]) for t in firsts])
    index = {int(t): i for i, t in enumerate(firsts)}
    observed = np.zeros(joint.size)
    for tokens in out.tokens:
        observed[index[tokens[0]] * p0.size + tokens[1]] += 1
    pvalue = chi_square_p(observed, joint * n)
    if skip_draft_masks:
        assert pvalue < 1e-3, pvalue
    else:
        assert pvalue > 1e-3, pvalue


# --- the server ------------------------------------------------------------------------------------


openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from server_process import running_server

    log = tmp_path_factory.mktemp("structured-server") / "server.log"
    with running_server(["--demo", "--num-draft-tokens", "3", "--max-batch", "4", "--log-level", "warning"], log) as port:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=60, max_retries=0)


def test_server_json_schema(client):
    schema = SCHEMAS[0]
    for temperature, stream in ((0.0, False), (1.0, False), (0.7, True)):
        kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "A user as JSON"}], max_tokens=MAX_TOKENS,
                      temperature=temperature, seed=1,
                      response_format={"type": "json_schema", "json_schema": {"name": "u", "schema": schema,
                                                                              "strict": True}})
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                           if c.choices)
        else:
            text = client.chat.completions.create(**kwargs).choices[0].message.content
        jsonschema.validate(json.loads(text), schema)
    # any object: unbounded, so a reply may hit max_tokens (then it is a prefix of an object)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=40,
                                           response_format={"type": "json_object"}, temperature=0)
    text = reply.choices[0].message.content
    assert isinstance(json.loads(text), dict) if reply.choices[0].finish_reason == "stop" else text.startswith("{")


def test_server_bad_schema_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=8,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    assert "nope" in str(e.value) and e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=8,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "x", "schema": {"type": "string", "pattern": "("}}})
    # the server is still up
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": obj(
        {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 7}})}},
    {"type": "function", "function": {"name": "get_time", "parameters": obj({"zone": {"enum": ["UTC", "CET"]}})}},
]


def test_server_tool_choice_required_and_named(client):
    for choice, names in (("required", {"get_weather", "get_time"}),
                          ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})):
        for temperature in (0.0, 1.0):
            reply = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=MAX_TOKENS,
                tools=TOOLS, tool_choice=choice, temperature=temperature, seed=3)
            choice0 = reply.choices[0]
            assert choice0.finish_reason == "tool_calls", choice0
            (call,) = choice0.message.tool_calls
            assert call.function.name in names
            schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
            jsonschema.validate(json.loads(call.function.arguments), schema)


def post(client, path: str, body: dict) -> tuple:
    import http.client
    from urllib.parse import urlparse

    url = urlparse(str(client.base_url))
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_responses_text_format_and_messages_tool_choice(client):
    schema = SCHEMAS[2]
    status, reply = post(client, "/v1/responses", {
        "model": MODEL, "input": "A color as JSON", "max_output_tokens": MAX_TOKENS, "temperature": 0,
        "text": {"format": {"type": "json_schema", "name": "c", "schema": schema, "strict": True}}})
    assert status == 200, reply
    text = "".join(part["text"] for item in reply["output"] if item["type"] == "message" for part in item["content"])
    jsonschema.validate(json.loads(text), schema)
    tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in TOOLS]
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_time"}):
        status, reply = post(client, "/v1/messages", {
            "model": MODEL, "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": "Time?"}],
            "tools": tools, "tool_choice": choice})
        assert status == 200 and reply["stop_reason"] == "tool_use", reply
        (use,) = [b for b in reply["content"] if b["type"] == "tool_use"]
        schema = next(t["input_schema"] for t in tools if t["name"] == use["name"])
        jsonschema.validate(use["input"], schema)
