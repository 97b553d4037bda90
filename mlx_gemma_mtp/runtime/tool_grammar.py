"""Grammars for one forced Gemma 4 tool call, in the form the model writes calls itself.

Gemma 4's chat template writes a call as

    <|tool_call>call:NAME{key:VALUE,...}<tool_call|>

with the keys bare and in sorted order (case-insensitive, as Jinja's `dictsort`), strings between
`<|"|>` delimiters, numbers and `true`/`false`/`null` bare, objects `{key:value,...}` and lists
`[a,b]`. Forcing a call in this form keeps the model (and its drafter) on the text it was trained
on; mlx-lm's Gemma 4 parser reads it back. The grammar is built from each tool's parameters
schema: types, `enum`/`const`, `properties`/`required` (no other keys), `items` with
`minItems`/`maxItems`, `anyOf`/`oneOf`, string lengths; numbers, booleans and null go through
llguidance's JSON Schema compiler (bounds included), whose syntax for them is the same. A tool
whose schema uses anything else (`$ref`, `pattern`, `format`, keys that are not words, ...) is
forced in JSON form instead (quoted keys, "strings" without braces), which the parser also reads.
"""

from __future__ import annotations

import json
import re

from mlx_gemma_mtp.runtime.structured import JSON_OPTIONS

TOOL_CALL_START, TOOL_CALL_END, STRING_DELIMITER = "<|tool_call>", "<tool_call|>", '<|"|>'

# schema keywords the native form supports; any other makes the tool fall back to JSON form
NATIVE_KEYWORDS = {
    "type", "enum", "const", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
    "anyOf", "oneOf", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "multipleOf", "nullable", "description", "title", "default", "examples", "$schema", "$comment",
}
SCALAR_TYPES = ("integer", "number", "boolean", "null")
WORD = re.compile(r"\w+")  # mlx-lm's parser quotes bare keys that match \w+


class NotNative(Exception):
    """A schema the native form does not cover."""


def special_token(tokenizer, text: str):
    """The id of `text` where the vocabulary holds it as one token, else None."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    ids = hf.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def lark_literal(tokenizer, text: str) -> str:
    """`text` in Lark: its special token where the vocabulary has one, else the text."""
    token = special_token(tokenizer, text)
    return f"<[{token}]>" if token is not None else json.dumps(text)


class NativeRules:
    """Lark rules for values of a schema in Gemma 4's call syntax."""

    def __init__(self, tokenizer):
        quote = special_token(tokenizer, STRING_DELIMITER)
        self.quote = f"<[{quote}]>" if quote is not None else json.dumps(STRING_DELIMITER)
        self.body_ends_at_token = quote is not None
        self.rules: dict[str, str] = {}
        self.lazy: set[str] = set()  # rules whose lexeme ends as soon as it matches

    def add(self, expansion: str, token: bool = False) -> str:
        """A rule (or with `token`, a lexeme) for `expansion`, shared by equal expansions; its name."""
        name = next((n for n, e in self.rules.items() if e == expansion and n[0].isupper() == token), None)
        if name is None:
            name = f"{'T' if token else 'v'}{len(self.rules)}"
            self.rules[name] = expansion
        return name

    def value(self, schema) -> str:
        if schema is True or schema == {} or (isinstance(schema, dict) and set(schema) <= {"description", "title"}):
            return self.any_value()
        if not isinstance(schema, dict):
            raise NotNative("a boolean schema")
        unknown = set(schema) - NATIVE_KEYWORDS
        if unknown:
            raise NotNative(f"keyword {sorted(unknown)[0]}")
        if "const" in schema:
            return self.constant(schema["const"])
        if "enum" in schema:
            return self.add(" | ".join(self.constant(v) for v in schema["enum"]))
        if "anyOf" in schema or "oneOf" in schema:
            branches = schema.get("anyOf", []) + schema.get("oneOf", [])
            return self.add(" | ".join(self.value({**without(schema, "anyOf", "oneOf"), **b}) for b in branches))
        kind = schema.get("type")
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else None
        if kind is None:
            return self.any_value()
        kinds = list(kind) if isinstance(kind, list) else [kind]
        if schema.get("nullable"):
            kinds.append("null")
        if len(kinds) > 1:
            return self.add(" | ".join(self.value({**schema, "type": k, "nullable": False}) for k in kinds))
        kind = kinds[0]
        if kind == "string":
            return self.string(schema.get("minLength", 0), schema.get("maxLength"))
        if kind in SCALAR_TYPES:
            keep = {k: v for k, v in schema.items() if k in ("type", "minimum", "maximum", "exclusiveMinimum",
                                                              "exclusiveMaximum", "multipleOf")}
            return self.add(f"%json {json.dumps(keep)}")
        if kind == "array":
            return self.array(schema)
        if kind == "object":
            return self.object(schema)
        raise NotNative(f"type {kind!r}")

    def constant(self, value) -> str:
        if isinstance(value, str):
            return f"{self.quote} {json.dumps(value)} {self.quote}" if value else f"{self.quote} {self.quote}"
        if isinstance(value, bool) or value is None or isinstance(value, (int, float)):
            return json.dumps(json.dumps(value))  # true, false, null, 3, 2.5 as literal text
        raise NotNative("an object or list constant")

    def string(self, low: int = 0, high=None) -> str:
        repeat = f"{{{int(low)},{'' if high is None else int(high)}}}"
        delimiter = re.escape(STRING_DELIMITER)
        if self.body_ends_at_token:  # a special token ends any text lexeme; none may hold its text
            token = self.add(f"/(?s:.{repeat})/ & ~/(?s:.*{delimiter}.*)/", token=True)
            return self.add(f"{self.quote} {token} {self.quote}")
        if not low:  # the delimiter as text: the string ends at its first occurrence (a lazy lexeme)
            name = self.add(f"/(?s:.{repeat}){delimiter}/")
            self.lazy.add(name)
            return self.add(f"{self.quote} {name}")
        token = self.add(f"/[^<]{repeat}/", token=True)  # with a minimum length: no '<' (the delimiter's start)
        return self.add(f"{self.quote} {token} {self.quote}")

    def array(self, schema) -> str:
        item = self.value(schema.get("items", True))
        low, high = int(schema.get("minItems", 0)), schema.get("maxItems")
        if high is not None and int(high) == 0:
            return self.add('"[]"')
        more = f"{{{max(low - 1, 0)},{'' if high is None else int(high) - 1}}}"
        items = f'{item} ("," {item}){more}'
        return self.add(f'"[" {items} "]"' if low > 0 else f'"[" ({items})? "]"')

    def object(self, schema) -> str:
        properties = schema.get("properties") or {}
        if not properties:
            if schema.get("additionalProperties") is False:
                return self.add('"{}"')
            return self.any_map()
        for key in properties:
            if not WORD.fullmatch(key):
                raise NotNative(f"key {key!r}")
        required = set(schema.get("required") or ())
        if required - set(properties):
            raise NotNative("a required key without a schema")
        keys = sorted(properties, key=str.lower)  # the template's dictsort order
        pairs = [self.add(f'"{k}:" {self.value(properties[k])}') for k in keys]
        # first[j]: the pairs from j on, none written yet; rest[j]: the same after a written one.
        # Each is a rule, or "" where nothing can follow.
        n = len(keys)
        first, rest = [""] * (n + 1), [""] * (n + 1)
        for j in range(n - 1, -1, -1):
            heads, tails, optional = [], [], True
            for k in range(j, n):
                heads.append(f"{pairs[k]} {rest[k + 1]}".strip())
                tails.append(f'"," {pairs[k]} {rest[k + 1]}'.strip())
                if keys[k] in required:
                    optional = False
                    break
            mark = "?" if optional else ""
            first[j] = self.add(f"({' | '.join(heads)}){mark}")
            rest[j] = self.add(f"({' | '.join(tails)}){mark}")
        return self.add(f'"{{" {first[0]} "}}"')

    def any_value(self) -> str:
        if "anyv" not in self.rules:
            self.rules["anyv"] = ""  # reserved: the rules below refer to it
            key = self.add(r"/\w+/", token=True)
            string = self.string()
            number = self.add(f"%json {json.dumps({'type': 'number'})}")
            pair = f'{key} ":" anyv'
            items = '"[" (anyv ("," anyv)*)? "]"'
            self.rules["anyv"] = f'{string} | {number} | "true" | "false" | "null" | "{{" ({pair} ("," {pair})*)? "}}" | {items}'
        return "anyv"

    def any_map(self) -> str:
        self.any_value()
        key = self.add(r"/\w+/", token=True)
        return self.add(f'"{{" ({key} ":" anyv ("," {key} ":" anyv)*)? "}}"')

    def lark(self) -> str:
        return "\n".join(f"{name}{'[lazy]' if name in self.lazy else ''}: {expansion}"
                         for name, expansion in self.rules.items())


def without(schema: dict, *keys) -> dict:
    return {k: v for k, v in schema.items() if k not in keys}


def tool_call_lark(tools: list, tokenizer) -> str:
    """Lark for one Gemma 4 tool call to one of `tools` (OpenAI tool dicts) whose arguments match
    the tool's parameters schema: native form where the schema allows it, JSON form otherwise."""
    start, end = lark_literal(tokenizer, TOOL_CALL_START), lark_literal(tokenizer, TOOL_CALL_END)
    native = NativeRules(tokenizer)
    calls, json_rules = [], []
    for i, tool in enumerate(tools):
        function = tool["function"]
        schema = function.get("parameters") or {"type": "object", "properties": {}}
        name = json.dumps("call:" + function["name"])
        try:
            arguments = native.value({**schema, "type": "object", "additionalProperties": False})
            calls.append(f"{name} {arguments}")
        except NotNative:
            json_rules.append(f"j{i}: {name} %json {json.dumps(json_form(schema))}")
            calls.append(f"j{i}")
    return "\n".join([f"start: {start} ({' | '.join(calls)}) {end}", native.lark(), *json_rules]) + "\n"


BRACELESS = "^[^{}]*$"


def json_form(schema: dict) -> dict:
    """The schema for arguments written as JSON: no keys beyond the declared ones, and strings
    free of braces (mlx-lm's parser finds the call's end by balancing braces outside <|"|>)."""
    return {"additionalProperties": False, **no_braces_in_strings(schema), "x-guidance": JSON_OPTIONS}


def no_braces_in_strings(schema):
    """The schema with every string that has no pattern of its own held free of braces."""
    if isinstance(schema, list):
        return [no_braces_in_strings(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: no_braces_in_strings(v) if k not in ("enum", "const", "default", "examples") else v
           for k, v in schema.items()}
    kind = schema.get("type")
    stringy = kind == "string" or (isinstance(kind, list) and "string" in kind)
    if stringy and "pattern" not in schema and "enum" not in schema and "const" not in schema \
            and "format" not in schema:
        out["pattern"] = BRACELESS
    return out
