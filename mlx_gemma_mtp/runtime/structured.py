"""Structured output: grammars (JSON Schema, JSON, Lark, regex; Gemma 4 tool calls come as Lark from
`tool_grammar`) compiled with llguidance into per-row constraints (runtime.grammar.Constraint).

A `Grammar` is compiled once and checked against the tokenizer (a bad one raises MTPError naming
what is wrong); each row gets its own matcher from it (`Grammar.constraint`), since a matcher's
state is its row's tokens. llguidance's tokenizer is built once per (tokenizer, vocabulary) and
cached: it takes ~1 s for a real vocabulary.
"""

import json
import threading
from dataclasses import dataclass, field
from typing import Optional

from mlx_gemma_mtp.errors import MTPError
from mlx_gemma_mtp.runtime.grammar import Constraint

# JSON as one line with compact separators: whitespace a grammar leaves free lets a weak model
# wander (spaces forever); the text is valid JSON either way
JSON_OPTIONS = {"whitespace_flexible": False}

_tokenizers: dict = {}
_lock = threading.Lock()


def llg_tokenizer(tokenizer, vocab_size: int):
    """llguidance's tokenizer for an HF (or mlx-lm wrapped) tokenizer, cached per tokenizer."""
    import llguidance.hf

    hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's TokenizerWrapper holds the HF one
    key = (id(hf), vocab_size)
    with _lock:
        entry = _tokenizers.get(key)
        if entry is None or entry[0] is not hf:
            entry = (hf, llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size))
            _tokenizers[key] = entry  # keeps hf alive, so its id is not reused
        return entry[1]


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar, checked against a tokenizer: `matcher` is its start state, which each
    row copies (building it is the costly part: lexers; copying is cheap)."""

    text: str  # llguidance's serialized form
    what: str  # e.g. "json_schema": for messages
    matcher: object = field(default=None, compare=False, repr=False)
    eos: int = 0  # the grammar tokenizer's EOS

    def constraint(self, tokenizer, vocab_size: int, eos_ids=()) -> Constraint:
        """A fresh matcher for one row."""
        grammar = self if self.matcher is not None else check(self, tokenizer, vocab_size)
        return Constraint(grammar.matcher.deep_copy(), vocab_size, grammar.eos, frozenset(eos_ids))


def first_line(message: str) -> str:
    return " ".join(message.strip().splitlines()[:3])[:500]


def check(grammar: Grammar, tokenizer, vocab_size: int) -> Grammar:
    """The grammar, if llguidance can build a matcher for it; else MTPError naming the error."""
    import llguidance

    lt = llg_tokenizer(tokenizer, vocab_size)
    matcher = llguidance.LLMatcher(lt, grammar.text)
    if matcher.is_error():
        raise MTPError(f"{grammar.what}: {first_line(matcher.get_error())}")
    return Grammar(grammar.text, grammar.what, matcher, lt.eos_token)


def compiled(build, source, tokenizer, vocab_size: int, what: str) -> Grammar:
    """`build(source)` (one of llguidance's grammar_from_* functions) as a checked Grammar; its
    errors as one-line MTPErrors naming `what`."""
    try:
        text = build(source)
    except (ValueError, TypeError, RuntimeError) as e:
        raise MTPError(f"{what}: {first_line(str(e))}") from None
    return check(Grammar(text, what), tokenizer, vocab_size)


def json_schema(schema, tokenizer, vocab_size: int, what: str = "json_schema") -> Grammar:
    """A JSON Schema (a dict, or its JSON text) as a checked Grammar."""
    import llguidance

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise MTPError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise MTPError(f"{what} must be a JSON Schema object, got {type(schema).__name__}")
    build = lambda s: llguidance.LLMatcher.grammar_from_json_schema(s, defaults=JSON_OPTIONS)  # noqa: E731
    return compiled(build, schema, tokenizer, vocab_size, what)


def lark(source: str, tokenizer, vocab_size: int, what: str = "grammar") -> Grammar:
    import llguidance

    if not isinstance(source, str):
        raise MTPError(f"{what} must be a string of Lark grammar")
    return compiled(llguidance.LLMatcher.grammar_from_lark, source, tokenizer, vocab_size, what)


def regex(pattern: str, tokenizer, vocab_size: int, what: str = "regex") -> Grammar:
    import llguidance

    if not isinstance(pattern, str):
        raise MTPError(f"{what} must be a string")
    return compiled(llguidance.LLMatcher.grammar_from_regex, pattern, tokenizer, vocab_size, what)


def response_format(fmt, tokenizer, vocab_size: int, what: str = "response_format") -> Optional[Grammar]:
    """OpenAI's response_format (and this project's grammar/regex extension) as a Grammar; None
    for {"type": "text"}."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise MTPError(f"{what} must be an object")
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return json_schema({"type": "object"}, tokenizer, vocab_size, what)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise MTPError(f"{what}.json_schema must be an object with 'name' and 'schema'")
        if not isinstance(spec.get("name"), str):
            raise MTPError(f"{what}.json_schema.name must be a string")
        schema = spec.get("schema", {})
        return json_schema(schema, tokenizer, vocab_size, f"{what}.json_schema.schema")
    if kind == "grammar":  # this project's extension: {"type": "grammar", "lark": "..."}
        return lark(fmt.get("lark"), tokenizer, vocab_size, f"{what}.lark")
    if kind == "regex":  # {"type": "regex", "regex": "..."}
        return regex(fmt.get("regex"), tokenizer, vocab_size, f"{what}.regex")
    raise MTPError(f"{what}.type must be 'text', 'json_object', 'json_schema', 'grammar' or 'regex', got {kind!r}")
