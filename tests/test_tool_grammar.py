"""Forced Gemma 4 tool calls in the model's own form: the grammar accepts exactly the calls Gemma 4's
chat template writes for arguments that satisfy the schema (with `<|"|>` as a special token, as in
Gemma's vocabulary, and as plain text); mlx-lm's parser reads them back; generation under it is
exact with MTP and every call validates."""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import jsonschema
import llguidance
import llguidance.hf
import pytest
from mlx_lm.tool_parsers import gemma4 as gemma4_parser

from mlx_gemma_mtp import batch_generate
from mlx_gemma_mtp.model.demo import load_demo
from mlx_gemma_mtp.runtime import structured
from mlx_gemma_mtp.runtime.tool_grammar import tool_call_lark

Q = '<|"|>'


def obj(properties: dict, required=None) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required}


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": obj({
        "city": {"type": "string", "maxLength": 24},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "Units": {"enum": ["C", "F"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
        "options": obj({"precise": {"type": "boolean"}, "radius": {"type": ["number", "null"]}, "extra": {}},
                       ["precise"]),
    }, ["city", "days"])}},
    {"type": "function", "function": {"name": "run_code", "parameters": obj({"source": {"type": "string"}})}},
    {"type": "function", "function": {"name": "no_args", "parameters": {"type": "object", "properties": {}}}},
    # outside the native form (a format): this tool is forced in JSON form
    {"type": "function", "function": {"name": "on_date", "parameters": obj({"day": {"type": "string", "format": "date"}})}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

VALID = [
    ("get_weather", {"city": "Paris", "days": 3}),
    ("get_weather", {"city": "São Paulo, {BR} <x>", "days": 7, "Units": "F", "tags": ["a", "b"],
                     "options": {"precise": True, "radius": 2.5, "extra": {"k": [1, "two", None, False]}}}),
    ("get_weather", {"city": "", "days": 1, "options": {"precise": False, "radius": None}}),
    ("run_code", {"source": "def f(x):\n    return {x: [x]}  # braces, quotes \" and newlines\n"}),
    ("no_args", {}),
]
INVALID = [
    ('get_weather{city:<|"|>Paris<|"|>,days:8}', "a bound"),
    ('get_weather{days:3,city:<|"|>Paris<|"|>}', "keys out of the template's order"),
    ('get_weather{city:<|"|>Paris<|"|>}', "a required key missing"),
    ('get_weather{city:<|"|>Paris<|"|>,days:3,zone:<|"|>x<|"|>}', "an undeclared key"),
    ('get_weather{city:<|"|>Paris<|"|>,days:3,Units:<|"|>K<|"|>}', "outside the enum"),
    ('get_weather{city:<|"|>Paris<|"|>,days:3,tags:[<|"|>a<|"|>,<|"|>b<|"|>,<|"|>c<|"|>]}', "too many items"),
    ('get_weather{city:<|"|>' + "x" * 25 + '<|"|>,days:3}', "a string too long"),
    ('get_weather{"city":"Paris","days":3}', "JSON form for a native tool"),
    ('get_weather{city:"Paris",days:3}', "a JSON string"),
    ('get_weather{city:<|"|>Paris<|"|>,days:3,options:{radius:1}}', "a nested required key missing"),
]


def format_value(value) -> str:
    """A value as Gemma 4's chat template writes a call's argument (its format_argument with bare
    keys): strings between <|"|>, keys sorted case-insensitively."""
    if isinstance(value, str):
        return Q + value + Q
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(value[k])}" for k in sorted(value, key=str.lower)) + "}"
    if isinstance(value, list):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


def call_text(name: str, arguments) -> str:
    body = format_value(arguments) if isinstance(arguments, dict) else arguments
    return f"<|tool_call>call:{name}{body}<tool_call|>"


@pytest.fixture(scope="module")
def tokenizers():
    """The demo's tokenizer (the markers are plain text) and a copy with Gemma's special tokens."""
    pair, tok = load_demo()
    gemma = copy.deepcopy(tok._tokenizer)
    gemma.add_special_tokens({"additional_special_tokens": ["<|tool_call>", "<tool_call|>", Q]})
    assert len(gemma.encode(Q, add_special_tokens=False)) == 1
    return {"text markers": tok._tokenizer, "special tokens": gemma}


def accepts(tokenizer, grammar: str, text: str) -> bool:
    lt = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer))
    matcher = llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_lark(grammar))
    assert not matcher.is_error(), matcher.get_error()
    return all(matcher.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False)) \
        and matcher.is_accepting()


@pytest.mark.parametrize("which", ["text markers", "special tokens"])
def test_grammar_accepts_the_templates_calls_and_nothing_else(tokenizers, which):
    tokenizer = tokenizers[which]
    grammar = tool_call_lark(TOOLS, SimpleNamespace(_tokenizer=tokenizer))  # as mlx-lm's wrapper holds it
    for name, arguments in VALID:
        jsonschema.validate(arguments, SCHEMAS[name])
        text = call_text(name, arguments)
        assert accepts(tokenizer, grammar, text), text
        assert gemma4_parser.parse_tool_call(text[len("<|tool_call>"):-len("<tool_call|>")]) == \
            {"name": name, "arguments": arguments}
    for body, why in INVALID:
        assert not accepts(tokenizer, grammar, "<|tool_call>call:" + body + "<tool_call|>"), why
    # the tool outside the native form takes JSON arguments, and only those
    assert accepts(tokenizer, grammar, call_text("on_date", '{"day":"2026-12-05"}'))
    assert not accepts(tokenizer, grammar, call_text("on_date", {"day": "2026-12-05"}))


def test_forced_calls_are_exact_with_mtp_and_validate():
    pair, tok = load_demo()
    bounded = {"type": "function", "function": {"name": "run_code", "parameters": obj(
        {"source": {"type": "string", "maxLength": 60}})}}  # the demo writes code on and on
    tools = [TOOLS[0], bounded, TOOLS[2]]
    grammar = structured.lark(tool_call_lark(tools, tok), tok, pair.view.args.vocab_size, "tool_choice")
    prompts = ["Weather in Paris?", "def main():", "Run this:", "x"]
    plain = batch_generate(pair, tok, prompts, max_tokens=120, num_draft_tokens=0, grammar=grammar)
    for k in (3, "adaptive"):
        assert batch_generate(pair, tok, prompts, max_tokens=120, num_draft_tokens=k, grammar=grammar).texts == \
            plain.texts, k
    sampled = batch_generate(pair, tok, prompts * 3, max_tokens=120, num_draft_tokens=3, grammar=grammar,
                             temperature=1.0, seed=list(range(12)))
    for text, reason in zip(plain.texts + sampled.texts, plain.finish_reasons + sampled.finish_reasons):
        assert reason == "stop" and text.startswith("<|tool_call>call:") and text.endswith("<tool_call|>"), text
        call = gemma4_parser.parse_tool_call(text[len("<|tool_call>"):-len("<tool_call|>")])
        jsonschema.validate(call["arguments"], next(t for t in tools if t["function"]["name"] == call["name"])
                            ["function"]["parameters"])
        # the native form: no quote outside the <|"|> strings (JSON would quote keys and strings)
        assert '"' not in re.sub(r'<\|"\|>.*?<\|"\|>', "", text, flags=re.DOTALL), text
