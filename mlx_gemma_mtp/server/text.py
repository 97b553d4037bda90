"""A row's tokens as the text of a response: what `gemma-mtp serve` (server.py) sends.

In the engine thread, `TextStream` turns each row's tokens into text: incremental detokenization, stop
strings (text that could begin one is held back; a found stop ends the row at once, even inside a
multi-token block the drafter got accepted) and log-probabilities. On the event loop, tool calls are
split out of the released text with the tokenizer's tool parser (mlx-lm picks Gemma 4's from the chat
template), and log-probability entries are formatted as OpenAI's chat and completion responses have
them. Nothing here calls MLX.
"""

import json
import uuid
from collections import deque
from typing import Callable, Optional

from mlx_gemma_mtp.runtime.detokenize import IncrementalDecoder


# --- text: detokenization, stop strings, log-probabilities (engine thread) -----------------------


def held_suffix(text: str, stops: list) -> int:
    """The length of the longest end of `text` that is the beginning of a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class TextStream:
    """One row's tokens as released text.

    Text that could be the beginning of a stop string is held back until it cannot; a stop string
    is looked for after every token, so it is found across token boundaries and inside a block of
    several accepted tokens, and neither it nor anything after it is released. Each token's
    log-probability entry is released with the text where its token begins.
    """

    def __init__(self, decoder: IncrementalDecoder, stops: list, eos_ids, token_text: Optional[Callable] = None):
        self.decoder = decoder
        self.stops, self.eos_ids, self.token_text = stops, eos_ids, token_text
        self.sent = 0  # characters of the decoder's text released
        self.entries = deque()  # (start character, log-probability entry) not yet released
        self.count = 0  # tokens consumed (an EOS and a token that completes a stop included)
        self.matched: Optional[str] = None  # the stop string that ended the row (Messages reports it)

    @property
    def text(self) -> str:
        return self.decoder.text

    def feed(self, tokens: list, logprobs: Optional[list] = None) -> tuple:
        """-> (released text, released log-probability entries, stopped at a stop string)."""
        for j, t in enumerate(tokens):
            self.count += 1
            if t in self.eos_ids:
                continue  # an end-of-turn token is not text (the engine finishes the row)
            start = len(self.text)
            piece = self.decoder.add(t)
            if logprobs is not None and self.token_text is not None:
                # the chosen token's text is what it added to the reply, so the entries add up to the text
                chosen, top = logprobs[j]
                self.entries.append((start, (piece, chosen,
                                             [(self.token_text(i), v) for i, v in top])))
            at = self._find_stop()
            if at is not None:
                return (*self._release(at), True)
        return (*self._release(len(self.text) - held_suffix(self.text[self.sent:], self.stops)), False)

    def finish(self) -> tuple:
        """At the row's end: flush the decoder -> (text, entries, stopped)."""
        self.decoder.finish()
        at = self._find_stop()
        if at is not None:
            return (*self._release(at), True)
        return (*self._release(len(self.text), everything=True), False)

    def _find_stop(self) -> Optional[int]:
        found = [(i, s) for i, s in ((self.text.find(s, self.sent), s) for s in self.stops) if i >= 0]
        if not found:
            return None
        at, self.matched = min(found)
        return at

    def _release(self, end: int, everything: bool = False) -> tuple:
        """Text up to `end`, and the entries of the tokens that begin before it (all: at the end)."""
        text, self.sent = self.text[self.sent:end], max(self.sent, end)
        released = []
        while self.entries and (everything or self.entries[0][0] < end):
            released.append(self.entries.popleft()[1])
        return text, released


# --- tool calls (event loop) ---------------------------------------------------------------------


def openai_tool_calls(parsed, index: int = 0) -> list:
    """mlx-lm tool parser output (a {"name", "arguments"} dict or a list of them) as OpenAI
    tool_calls, numbered from `index`."""
    calls = parsed if isinstance(parsed, list) else [parsed]
    out = []
    for n, call in enumerate(calls):
        arguments = call.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        out.append({"index": index + n, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                    "function": {"name": call["name"], "arguments": arguments}})
    return out


class ToolCallSplitter:
    """Splits released text into content and tool calls: the text between the tokenizer's
    `tool_call_start` and `tool_call_end` markers, parsed with its `tool_parser` (for Gemma 4,
    `<|tool_call>call:name{key:<|"|>value<|"|>}<tool_call|>`). Text that could begin a start
    marker is held back. A call that does not parse is passed on as content, markers included."""

    def __init__(self, start: Optional[str], end: Optional[str], parser: Optional[Callable], tools=None):
        self.start, self.end, self.parser, self.tools = start, end, parser, tools
        self.enabled = bool(start and end and parser)
        self.buffer, self.inside, self.calls = "", False, 0

    def feed(self, text: str) -> list:
        """-> [("content", str) | ("tool_calls", [OpenAI tool call, ...])]"""
        if not self.enabled:
            return [("content", text)] if text else []
        self.buffer += text
        out = []
        while True:
            if not self.inside:
                i = self.buffer.find(self.start)
                if i < 0:
                    keep = held_suffix(self.buffer, [self.start])
                    self._content(out, self.buffer[: len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    return out
                self._content(out, self.buffer[:i])
                self.buffer, self.inside = self.buffer[i + len(self.start):], True
            j = self.buffer.find(self.end)
            if j < 0:
                return out
            self._call(out, self.buffer[:j], self.start + self.buffer[: j + len(self.end)])
            self.buffer, self.inside = self.buffer[j + len(self.end):], False

    def finish(self) -> list:
        out, rest, self.buffer = [], self.buffer, ""
        if self.inside:  # a call the model did not close (it may have stopped right after it)
            self._call(out, rest, self.start + rest)
        else:
            self._content(out, rest)
        return out

    def _content(self, out: list, text: str) -> None:
        if text:
            out.append(("content", text))

    def _call(self, out: list, inner: str, raw: str) -> None:
        try:
            calls = openai_tool_calls(self.parser(inner, self.tools), self.calls)
        except Exception:
            self._content(out, raw)
            return
        self.calls += len(calls)
        out.append(("tool_calls", calls))


def split_tool_calls(text: str, tokenizer, tools) -> tuple:
    """A whole reply -> (content or None, tool_calls list)."""
    splitter = ToolCallSplitter(tokenizer.tool_call_start, tokenizer.tool_call_end, tokenizer.tool_parser, tools)
    parts = splitter.feed(text) + splitter.finish()
    content = "".join(p for kind, p in parts if kind == "content")
    calls = [c for kind, p in parts if kind == "tool_calls" for c in p]
    if calls and not content.strip():
        content = None
    return content, calls


# --- log-probabilities as OpenAI responses have them (event loop) --------------------------------


def chat_logprobs(entries: list) -> list:
    def one(text, lp):
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return [{**one(text, lp), "top_logprobs": [one(t, v) for t, v in top]} for text, lp, top in entries]


def completion_logprobs(entries: list, offset: int) -> dict:
    tokens, values, tops, offsets = [], [], [], []
    for text, lp, top in entries:
        tokens.append(text)
        values.append(lp)
        top_map = {}
        for t, v in top:
            top_map.setdefault(t, v)
        tops.append(top_map)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
