"""Generated tokens as text, exactly as the tokenizer decodes them after the prompt.

The rule every surface keeps: prompt text + generated text == `tokenizer.decode(prompt + generated)`,
and text streamed piece by piece equals the text given whole. Streaming detokenizers that decode the
generated tokens on their own trim the first token's leading space (right after a chat turn marker,
wrong for a completion: "return" + " a" must not become "returna"). Here each new token is decoded in
a short window that starts inside the prompt, and only what the window's text gained is released, so
spaces, merged characters and multi-byte characters come out as the whole sequence's decode has them.
"""

CONTEXT = 6  # prompt tokens before the first generated one: enough for any merge across the boundary


class IncrementalDecoder:
    """`add(token)` -> the text it completes ("" while a multi-byte character is unfinished);
    `finish()` -> what is still held. `text` is everything released."""

    def __init__(self, tokenizer, context=()):
        self.decode = tokenizer.decode
        self.tokens = list(context)[-CONTEXT:]
        self.start = 0  # the window: tokens[start:] decodes the text since tokens[start]
        self.done = len(self.tokens)  # tokens[:done] are released
        self.text = ""

    def add(self, token: int) -> str:
        self.tokens.append(token)
        before = self.decode(self.tokens[self.start : self.done])
        after = self.decode(self.tokens[self.start :])
        if after.endswith("\ufffd") or not after.startswith(before):
            return ""  # an unfinished character (or a merge still open): wait for the next token
        new = after[len(before) :]
        self.start, self.done = self.done, len(self.tokens)
        if len(self.tokens) > 4 * CONTEXT:  # keep the list short: the window never reaches back further
            drop = self.start
            self.tokens, self.start, self.done = self.tokens[drop:], 0, self.done - drop
        self.text += new
        return new

    def finish(self) -> str:
        if self.done == len(self.tokens):
            return ""
        before = self.decode(self.tokens[self.start : self.done])
        after = self.decode(self.tokens[self.start :])
        new = after[len(before) :] if after.startswith(before) else after
        self.start = self.done = len(self.tokens)
        self.text += new
        return new


def generated_text(tokenizer, prompt: list, generated: list) -> str:
    """The text of `generated` after `prompt`, whole."""
    decoder = IncrementalDecoder(tokenizer, prompt)
    return "".join(decoder.add(t) for t in generated) + decoder.finish()
