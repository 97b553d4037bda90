"""The Python API: `load`, `generate`, `stream_generate`, `batch_generate`, in mlx-lm's conventions.

This is the boundary: every argument a caller passes is checked here, once, and a bad one raises
MTPError with one line; what lies behind it (the engine, the sampling strategies) trusts its input.
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Union

from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.sample_utils import make_repetition_penalty

from mlx_gemma_mtp.runtime.pair import Pair, PromptCache, Stats
from mlx_gemma_mtp.runtime.detokenize import IncrementalDecoder, generated_text
from mlx_gemma_mtp.runtime.engine import PREFILL_STEP, Engine, Request
from mlx_gemma_mtp.runtime.images import ImageSpan
from mlx_gemma_mtp.errors import MTPError
from mlx_gemma_mtp.runtime.housekeeping import generating
from mlx_gemma_mtp.limits import check_draft_tokens, fit_max_tokens
from mlx_gemma_mtp.model.loading import load  # noqa: F401  (the API's `load`)
from mlx_gemma_mtp.runtime.quantized_cache import check_kv_quant
from mlx_gemma_mtp.runtime.sampling import Sampling
from mlx_gemma_mtp.runtime import structured
from mlx_gemma_mtp.runtime.structured import Grammar


@dataclass
class Response:
    """One streamed step: the new text, its token, and whether a draft proposed it."""

    text: str
    token: int
    from_draft: bool
    stats: Optional[Stats] = None  # set on the last response
    finish_reason: Optional[str] = None  # "stop" (EOS) or "length", on the last response


DEFAULT_SOFT_TOKENS = 280  # an image's soft-token budget (vision.DEFAULT_SOFT_TOKENS, the reference's)


def prompt_ids(pair: Pair, tokenizer: TokenizerWrapper, prompt, allowed: frozenset = frozenset()) -> list:
    """The prompt as token ids: a string is encoded as is (with a BOS unless it starts with one), a list (or array) of ids is checked
    against the target's vocabulary (an id outside it would index past the embedding; `allowed`:
    image ids, which never reach the embedding)."""
    if isinstance(prompt, str):
        # a prompt that already starts with the BOS text (a rendered chat template) gets no second one
        bos = tokenizer.bos_token
        ids = tokenizer.encode(prompt, add_special_tokens=not (bos and prompt.startswith(bos))) if prompt else []
    elif isinstance(prompt, (list, tuple)) or hasattr(prompt, "tolist"):
        ids = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)
        vocab = pair.view.args.vocab_size
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not (0 <= t < vocab or t in allowed):
                raise MTPError(f"the prompt's token ids must be whole numbers in [0, {vocab}), got {t!r}")
    else:
        raise MTPError(f"the prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    if not ids:
        raise MTPError("the prompt is empty")
    fit_max_tokens(len(ids), 0, pair.view.args.max_position_embeddings)
    return ids


def prompt_segments(pair: Pair, tokenizer: TokenizerWrapper, prompt, images=None,
                    max_soft_tokens: int = DEFAULT_SOFT_TOKENS) -> tuple:
    """The prompt as (token ids, image spans). Each image (bytes, a path or a PIL image) takes
    the place of the prompt's next image placeholder: a lone image token (what a chat template
    writes for an image part) or a whole `boi image... eoi` run; a prompt without any placeholder
    gets its images at its start (after the BOS), in order. More images than placeholders, or
    fewer, is an MTPError."""
    if images is None or (isinstance(images, (list, tuple)) and not images):
        return prompt_ids(pair, tokenizer, prompt), ()
    if not isinstance(images, (list, tuple)):
        images = [images]
    encoder = pair.images
    if encoder is None:
        raise MTPError("this pair was not loaded from a folder with a vision tower: it takes no images")
    t = encoder.info.token_ids
    ids = prompt_ids(pair, tokenizer, prompt, allowed=frozenset((t.image, t.boi, t.eoi)))
    prepared = [encoder.prepare(image, max_soft_tokens) for image in images]
    places = image_places(ids, t)
    if not places:
        at = 1 if ids[0] == tokenizer.bos_token_id else 0
        places = [(at, at)] * len(prepared)
    if len(places) != len(prepared):
        raise MTPError(f"the prompt has {len(places)} image placeholders for {len(prepared)} images")
    out, spans, done = [], [], 0
    for (start, end), (image, key) in zip(places, prepared):
        out += ids[done:start]
        spans.append(ImageSpan(len(out) + 1, image, key))
        out += [t.boi] + [t.image] * image.num_soft_tokens + [t.eoi]
        done = end
    out += ids[done:]
    fit_max_tokens(len(out), 0, pair.view.args.max_position_embeddings)
    return out, tuple(spans)


def image_places(ids: list, t) -> list:
    """(start, end) of each image placeholder: `boi image... eoi`, or a lone image token."""
    places, i = [], 0
    while i < len(ids):
        if ids[i] == t.boi:
            j = i + 1
            while j < len(ids) and ids[j] == t.image:
                j += 1
            if j > i + 1 and j < len(ids) and ids[j] == t.eoi:
                places.append((i, j + 1))
                i = j + 1
                continue
        if ids[i] == t.image:
            places.append((i, i + 1))
        i += 1
    return places


def make_request(
    pair: Pair,
    tokenizer: TokenizerWrapper,
    prompt_length: int,
    max_tokens: int = 256,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: int = 20,
    seed: Optional[int] = None,
    sampler: Optional[Callable] = None,
    logits_processors: Optional[list] = None,
    prompt_cache: Optional[PromptCache] = None,
    draft_filter: Optional[Callable] = None,
    response_format: Optional[dict] = None,
    json_schema=None,
    grammar: Optional[Grammar] = None,
) -> Request:
    """One row's settings, checked; max_tokens is shortened to what the context leaves.

    Structured output (at most one of): `response_format` as OpenAI's ({"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name", "schema"}}, or this project's {"type":
    "grammar", "lark": ...} / {"type": "regex", "regex": ...}); `json_schema` (a schema dict or
    its JSON text); `grammar` (a `structured.Grammar`, compiled once for many rows)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise MTPError(f"max_tokens must be a whole number >= 0, got {max_tokens!r}")
    max_tokens = fit_max_tokens(prompt_length, max_tokens, pair.view.args.max_position_embeddings)
    if prompt_cache is not None and not isinstance(prompt_cache, PromptCache):
        raise MTPError(f"prompt_cache must come from make_prompt_cache(pair), got {type(prompt_cache).__name__}")
    if logits_processors is not None and not isinstance(logits_processors, (list, tuple)):
        raise MTPError("logits_processors must be a list of callables")
    processors = list(logits_processors or [])
    if repetition_penalty is not None:
        if isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, (int, float)) \
                or not 0 < repetition_penalty < float("inf"):
            raise MTPError(f"repetition_penalty must be a number > 0, got {repetition_penalty!r}")
        if isinstance(repetition_context_size, bool) or not isinstance(repetition_context_size, int) \
                or repetition_context_size < 1:
            raise MTPError(f"repetition_context_size must be a whole number >= 1, got {repetition_context_size!r}")
        processors.append(make_repetition_penalty(repetition_penalty, repetition_context_size))
    sampling = Sampling(temperature, top_p, top_k, min_p, sampler=sampler, logits_processors=processors, seed=seed)
    eos_ids = frozenset(tokenizer.eos_token_ids or ())
    request = Request(max_tokens, sampling, eos_ids, prompt_cache, draft_filter)
    grammar = structured_grammar(pair, tokenizer, response_format, json_schema, grammar)
    if grammar is not None:
        request.constraint = grammar.constraint(tokenizer, pair.view.args.vocab_size, eos_ids)
    return request


def structured_grammar(pair: Pair, tokenizer, response_format=None, json_schema=None, grammar=None):
    """The one Grammar the structured-output arguments ask for, or None."""
    given = [name for name, v in (("response_format", response_format), ("json_schema", json_schema),
                                  ("grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise MTPError(f"give at most one of response_format, json_schema and grammar, got {', '.join(given)}")
    vocab = pair.view.args.vocab_size
    if response_format is not None:
        return structured.response_format(response_format, tokenizer, vocab)
    if json_schema is not None:
        return structured.json_schema(json_schema, tokenizer, vocab)
    if grammar is not None and not isinstance(grammar, Grammar):
        raise MTPError(f"grammar must be a structured.Grammar, got {type(grammar).__name__}")
    return grammar


def make_engine(pair: Pair, num_draft_tokens, kv_bits=None, kv_group_size=64, quantized_kv_start=0,
            prefill_step_size=PREFILL_STEP) -> Engine:
    """The engine for one call. kv_bits (4 or 8) quantizes the KV cache in groups of
    kv_group_size along the head dimension, once the context passes quantized_kv_start tokens
    (0: from the first); prefill_step_size bounds the tokens of one prefill forward."""
    if not isinstance(pair, Pair):
        raise MTPError(f"pair must be a Pair from load(), got {type(pair).__name__}")
    kv_quant = check_kv_quant(kv_bits, kv_group_size, quantized_kv_start, pair.view.args)
    if isinstance(prefill_step_size, bool) or not isinstance(prefill_step_size, int) or prefill_step_size < 1:
        raise MTPError(f"prefill_step_size must be a whole number >= 1, got {prefill_step_size!r}")
    return Engine(pair, check_draft_tokens(num_draft_tokens) if pair.drafter is not None else 0,
                  prefill_step=prefill_step_size, kv_quant=kv_quant)


def stream_generate(
    pair: Pair,
    tokenizer: TokenizerWrapper,
    prompt: Union[str, list],
    max_tokens: int = 256,
    num_draft_tokens: Union[int, str] = "adaptive",
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
    prefill_step_size: int = PREFILL_STEP,
    prefill_progress: Optional[Callable] = None,
    images: Optional[list] = None,
    max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
    **kwargs,
) -> Iterator[Response]:
    """Yield a Response per generated token; the last one carries `stats` and `finish_reason`.

    Keyword arguments (see `make_request`): temperature, top_p, top_k, min_p,
    repetition_penalty, repetition_context_size, seed, sampler, logits_processors, prompt_cache,
    and structured output: response_format, json_schema or grammar.
    Sampling arguments mean what they mean in mlx-lm (`sampler` / `logits_processors` built with
    mlx_lm.sample_utils are accepted too); temperature 0 is greedy. With a drafter, the output
    follows the target's own distribution exactly. `prompt_cache` (from `make_prompt_cache`) keeps
    the KV cache between calls: pass the whole conversation each time and only what the cache does
    not already hold is computed.

    `kv_bits` (4 or 8; None: float) quantizes the KV cache (groups of `kv_group_size` along the
    head dimension) once the context passes `quantized_kv_start` tokens (0: from the first), as
    mlx-lm's arguments of those names; `prefill_step_size` is the most prompt tokens one forward
    takes. `prefill_progress(done, total)` is called as the prompt is prefilled.

    `images` (bytes, paths or PIL images; see `prompt_segments` for where they go) each cost
    about `max_soft_tokens` (70, 140, 280, 560 or 1120) prompt tokens, plus two.
    """
    engine = make_engine(pair, num_draft_tokens, kv_bits, kv_group_size, quantized_kv_start, prefill_step_size)
    ids, spans = prompt_segments(pair, tokenizer, prompt, images, max_soft_tokens)
    request = make_request(pair, tokenizer, len(ids), max_tokens, **kwargs)
    if request.max_tokens == 0:
        return
    uid = engine.insert(ids, request, spans)
    stats = engine.rows[uid].stats
    row = engine.rows[uid]
    decoder = IncrementalDecoder(tokenizer, ids)
    last = None
    try:
        with generating(pair.target):
            while engine.busy:
                events = engine.step()
                if prefill_progress is not None and not row.emitted:
                    prefill_progress(row.offset, len(ids))
                for event in events:
                    if event.finish_reason == "error":
                        raise MTPError(f"generation failed: {event.error}")
                    for token, from_draft in zip(event.tokens, event.from_draft):
                        if last is not None:
                            yield last
                        if token in request.eos_ids:
                            last = Response("", token, from_draft)
                            continue
                        last = Response(decoder.add(token), token, from_draft)
                    if event.finish_reason:
                        last.text += decoder.finish()
                        last.finish_reason, last.stats = event.finish_reason, stats
    finally:
        engine.remove(uid)  # a caller that stops early: the prompt cache keeps what was computed
    yield last


def generate(pair: Pair, tokenizer: TokenizerWrapper, prompt: Union[str, list], **kwargs) -> str:
    """The whole text of `stream_generate` (same arguments)."""
    return "".join(r.text for r in stream_generate(pair, tokenizer, prompt, **kwargs))


@dataclass
class BatchResponse:
    texts: list  # per prompt
    tokens: list  # token ids per prompt (an EOS id that stopped a row is included)
    finish_reasons: list
    stats: list  # a Stats per prompt
    total: dict = field(default_factory=dict)  # generated_tokens, seconds, tokens_per_second, rounds


def batch_generate(
    pair: Pair,
    tokenizer: TokenizerWrapper,
    prompts: list,
    max_tokens: Union[int, list] = 256,
    num_draft_tokens: Union[int, str] = "adaptive",
    max_batch: Optional[int] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
    prefill_step_size: int = PREFILL_STEP,
    images: Optional[list] = None,
    max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
    **kwargs,
) -> BatchResponse:
    """Generate for several prompts as rows of one batch (each row's output is what
    `generate` gives it alone). `max_tokens` and every keyword of `make_request` may be one value
    for all rows or a list with one per prompt; `prompt_cache` is per prompt (a list). At most
    `max_batch` rows decode at once (default: all); the others join as rows finish. The KV cache
    and prefill settings are `stream_generate`'s, for the whole batch. `images`: one list of
    images per prompt (an empty list or None for a prompt without)."""
    engine = make_engine(pair, num_draft_tokens, kv_bits, kv_group_size, quantized_kv_start, prefill_step_size)
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise MTPError("prompts must be a non-empty list of prompts")
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise MTPError(f"max_batch must be a whole number >= 1, got {max_batch!r}")
    n = len(prompts)

    def per_row(name, value):
        if name != "logits_processors" and isinstance(value, (list, tuple)) or \
                name == "logits_processors" and value and isinstance(value[0], (list, tuple)):
            if len(value) != n:
                raise MTPError(f"{name} lists {len(value)} values for {n} prompts")
            return list(value)
        if name == "prompt_cache" and value is not None:
            raise MTPError("prompt_cache must be a list with one per prompt")
        return [value] * n

    if images is not None and (not isinstance(images, (list, tuple)) or len(images) != n):
        raise MTPError(f"images must be a list with one list of images per prompt ({n})")
    segments = [prompt_segments(pair, tokenizer, p, images[i] if images else None, max_soft_tokens)
                for i, p in enumerate(prompts)]
    ids = [i for i, _ in segments]
    for name in ("response_format", "json_schema"):  # one grammar for every row: compiled once
        if kwargs.get(name) is not None and not isinstance(kwargs[name], (list, tuple)) and "grammar" not in kwargs:
            kwargs["grammar"] = structured_grammar(pair, tokenizer, **{name: kwargs.pop(name)})
    columns = {name: per_row(name, v) for name, v in {"max_tokens": max_tokens, **kwargs}.items()}
    requests = [
        make_request(pair, tokenizer, len(ids[i]), **{name: col[i] for name, col in columns.items()})
        for i in range(n)
    ]
    tokens, finish, stats = [[] for _ in range(n)], [None] * n, [Stats() for _ in range(n)]
    row_of, pending = {}, list(range(n))
    limit = max_batch or n
    start = time.perf_counter()
    with generating(pair.target):
        while pending or engine.busy:
            while pending and len(engine.rows) < limit:
                i = pending.pop(0)
                if requests[i].max_tokens == 0:
                    finish[i] = "length"
                    continue
                uid = engine.insert(ids[i], requests[i], segments[i][1])
                row_of[uid], stats[i] = i, engine.rows[uid].stats
            for event in engine.step():
                i = row_of[event.uid]
                tokens[i] += event.tokens
                finish[i] = event.finish_reason or finish[i]
    seconds = time.perf_counter() - start
    texts = [generated_text(tokenizer, ids[i], [t for t in row if t not in requests[i].eos_ids])
             for i, row in enumerate(tokens)]
    generated = sum(len(t) for t in tokens)
    total = {"generated_tokens": generated, "seconds": seconds,
             "tokens_per_second": generated / seconds if seconds else 0.0, "rounds": engine.rounds}
    return BatchResponse(texts, tokens, finish, stats, total)
