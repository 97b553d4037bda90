"""The API boundary: every bad argument is one MTPError line, before anything reaches MLX."""

import pytest

from mlx_gemma_mtp import batch_generate, generate, make_prompt_cache
from mlx_gemma_mtp.api import make_request
from mlx_gemma_mtp.model.demo import load_demo
from mlx_gemma_mtp.errors import MTPError


@pytest.fixture(scope="module")
def demo():
    return load_demo()


@pytest.mark.parametrize(
    "prompt",
    [None, 123, b"def f():", [10**9], [5000], [-1], [1.5], [True], [], ""],
    ids=["None", "int", "bytes", "huge-id", "id-past-vocab", "negative-id", "float-id", "bool-id", "empty-list",
         "empty-text"],
)
def test_bad_prompts(demo, prompt):
    pair, tokenizer = demo
    with pytest.raises(MTPError) as e:
        generate(pair, tokenizer, prompt, max_tokens=4)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature="hot"), dict(seed="x", temperature=0.5), dict(prompt_cache=[]), dict(max_tokens=-1),
     dict(max_tokens=2.5), dict(num_draft_tokens=99), dict(num_draft_tokens="many"), dict(top_k=True),
     dict(repetition_penalty="x"), dict(repetition_penalty=0), dict(logits_processors=5), dict(top_p=float("nan"))],
    ids=lambda kw: "-".join(f"{k}={v!r}" for k, v in kw.items()),
)
def test_bad_arguments(demo, kwargs):
    pair, tokenizer = demo
    with pytest.raises(MTPError) as e:
        generate(pair, tokenizer, "def f():", **{"max_tokens": 4, **kwargs})
    assert "\n" not in str(e.value)


def test_prompt_longer_than_the_context_and_max_tokens_shortened(demo):
    pair, tokenizer = demo
    context = pair.view.args.max_position_embeddings
    with pytest.raises(MTPError, match="context"):
        generate(pair, tokenizer, [5] * context, max_tokens=4)
    # a prompt that leaves 3 tokens of context may generate at most 3
    assert make_request(pair, tokenizer, context - 3, max_tokens=50).max_tokens == 3
    assert make_request(pair, tokenizer, 10, max_tokens=50).max_tokens == 50


def test_batch_arguments(demo):
    pair, tokenizer = demo
    with pytest.raises(MTPError):
        batch_generate(pair, tokenizer, [], max_tokens=4)
    with pytest.raises(MTPError):
        batch_generate(pair, tokenizer, ["a", "b"], max_tokens=[4])  # one value per prompt, or one for all
    with pytest.raises(MTPError):
        batch_generate(pair, tokenizer, ["a", "b"], prompt_cache=make_prompt_cache(pair))
    with pytest.raises(MTPError):
        batch_generate(pair, tokenizer, ["a"], max_batch=0)
