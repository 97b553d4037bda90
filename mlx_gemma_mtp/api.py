"""The Python API: `load`, `generate`, `stream_generate`, in mlx-lm's conventions."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.sample_utils import make_repetition_penalty
from mlx_lm.utils import load_model, load_tokenizer

from .adaptive import AdaptiveDraft
from .config import normalize_draft_config, normalize_target_config, validate_pair
from .convert.sources import resolve_source
from .drafter import load_drafter
from .errors import MTPError
from .sampling import Sampling
from .decode import Pair, PromptCache, Stats, generate_tokens
from .limits import check_draft_tokens

MANIFEST = "mtp.json"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MTPError(f"cannot read '{path}': {e}") from None


def _pair_folders(path: str, draft_path: Optional[str]) -> tuple[Path, Optional[Path]]:
    folder = resolve_source(path, "model")
    manifest = folder / MANIFEST
    if manifest.is_file():
        parts = _read_json(manifest)
        target = folder / parts["target"]["path"]
        draft = folder / parts["draft"]["path"] if parts.get("draft") else None
    else:
        target, draft = folder, None
    if draft_path is not None:
        draft = resolve_source(draft_path, "drafter")
    return target, draft


def target_folder(path: str) -> Path:
    """The target's folder inside a pair folder, or the folder itself."""
    return _pair_folders(path, None)[0]


def check_pair(target_config: dict, draft_config: dict) -> None:
    """MTPError unless the drafter (raw config) fits the target (raw config)."""
    validate_pair(normalize_target_config(target_config), normalize_draft_config(draft_config))


def load(path: str, draft_path: Optional[str] = None) -> tuple[Pair, TokenizerWrapper]:
    """Load a converted pair folder, or a target (mlx-lm or Hugging Face folder, or hub id) and
    optionally its drafter. Without a drafter, generation is plain decoding."""
    target_dir, draft_dir = _pair_folders(path, draft_path)
    if not (target_dir / "config.json").is_file():
        raise MTPError(f"'{target_dir}' has no config.json: not a model folder")
    target_config = normalize_target_config(_read_json(target_dir / "config.json"))
    try:
        # Our normalized config fixes the fields mlx-lm would otherwise default differently.
        model, _ = load_model(target_dir, model_config=target_config)
    except (ValueError, FileNotFoundError) as e:
        raise MTPError(f"cannot load target '{target_dir}': {' '.join(str(e).split())[:300]}") from None
    tokenizer = load_tokenizer(target_dir, eos_token_ids=_eos_ids(target_dir, target_config))
    drafter = None
    if draft_dir is not None:
        draft_config = normalize_draft_config(_read_json(draft_dir / "config.json"))
        validate_pair(target_config, draft_config)
        drafter, _ = load_drafter(draft_dir)
    return Pair(model, drafter), tokenizer


def _eos_ids(folder: Path, config: dict) -> list:
    eos = config.get("eos_token_id") or config.get("text_config", {}).get("eos_token_id")
    generation = folder / "generation_config.json"
    if generation.is_file():
        eos = _read_json(generation).get("eos_token_id", eos)
    if eos is None:
        return None
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


@dataclass
class Response:
    """One streamed step: the new text, its token, and whether a draft proposed it."""

    text: str
    token: int
    from_draft: bool
    stats: Optional[Stats] = None  # set on the last response
    finish_reason: Optional[str] = None  # "stop" (EOS) or "length", on the last response


def _prompt_ids(pair: Pair, tokenizer: TokenizerWrapper, prompt: Union[str, list]) -> list:
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
        raise MTPError("the prompt is empty")
    context = pair.view.args.max_position_embeddings
    if len(ids) >= context:
        raise MTPError(f"the prompt has {len(ids)} tokens; the model's context is {context}")
    return ids


def _draft_policy(pair: Pair, num_draft_tokens):
    if num_draft_tokens == "adaptive":
        # one controller per pair: what it learnt of costs and acceptance carries over between calls
        if pair.adaptive is None:
            pair.adaptive = AdaptiveDraft(max_k=8)
        return pair.adaptive
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int):
        raise MTPError(f"num_draft_tokens must be a whole number or 'adaptive', got {num_draft_tokens!r}")
    check_draft_tokens(num_draft_tokens)
    return num_draft_tokens


def stream_generate(
    pair: Pair,
    tokenizer: TokenizerWrapper,
    prompt: Union[str, list],
    max_tokens: int = 256,
    num_draft_tokens: Union[int, str] = "adaptive",
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
) -> Iterator[Response]:
    """Yield a Response per generated token; the last one carries `stats` and `finish_reason`.

    Sampling arguments mean what they mean in mlx-lm (`sampler` / `logits_processors` built with
    mlx_lm.sample_utils are accepted too); temperature 0 is greedy. With a drafter, the output
    follows the target's own distribution exactly. `prompt_cache` (from `make_prompt_cache`) keeps
    the KV cache between calls: pass the whole conversation each time and only what the cache does
    not already hold is computed.
    """
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise MTPError(f"max_tokens must be a whole number >= 0, got {max_tokens!r}")
    policy = _draft_policy(pair, num_draft_tokens)
    processors = list(logits_processors or [])
    if repetition_penalty is not None:
        if not repetition_penalty > 0:
            raise MTPError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        processors.append(make_repetition_penalty(repetition_penalty, repetition_context_size))
    sampling = Sampling(temperature, top_p, top_k, min_p, sampler=sampler, logits_processors=processors, seed=seed)
    ids = _prompt_ids(pair, tokenizer, prompt)
    eos = set(tokenizer.eos_token_ids)
    stats = Stats()
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    last = None
    tokens = generate_tokens(pair, ids, max_tokens, policy, eos, stats, sampling, prompt_cache)
    for token, from_draft in tokens:
        if last is not None:
            yield last
        if token in eos:
            last = Response("", token, from_draft, finish_reason="stop")
            break
        detokenizer.add_token(token)
        last = Response(detokenizer.last_segment, token, from_draft)
    tokens.close()  # settles the prompt cache before the caller sees the last response
    if last is None:
        return
    detokenizer.finalize()
    last.text += detokenizer.last_segment
    last.finish_reason = last.finish_reason or "length"
    last.stats = stats
    yield last


def generate(pair: Pair, tokenizer: TokenizerWrapper, prompt: Union[str, list], **kwargs) -> str:
    """The whole text of `stream_generate` (same arguments)."""
    return "".join(r.text for r in stream_generate(pair, tokenizer, prompt, **kwargs))
