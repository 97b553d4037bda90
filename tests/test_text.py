"""The text users get: prompt text + generated text decodes as the whole sequence does, on every
surface, streamed or not, with the demo's byte-level tokenizer and a Gemma-style one whose tokens
carry their leading space ("\u2581"). The first generated token keeps its space."""

import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import reference_models
from mlx_gemma_mtp import batch_generate, generate, load, stream_generate
from mlx_gemma_mtp.runtime.detokenize import IncrementalDecoder, generated_text
from mlx_gemma_mtp.errors import MTPError

GEMMA_MTP = str(Path(sys.executable).parent / "gemma-mtp")
PROMPT = "def add(a, b):\n    return"


@pytest.fixture(scope="module", params=["bpe", "spm"])
def folder(request, pair_dir, tmp_path_factory):
    """The miniature e2b pair with each tokenizer style (the weights do not care what a token spells)."""
    folder = shutil.copytree(pair_dir("e2b"), tmp_path_factory.mktemp("text") / request.param)
    reference_models.write_tokenizer(folder / "target", request.param)
    return folder


@pytest.fixture(scope="module")
def pair(folder):
    return load(str(folder))


def spaced_token(tokenizer) -> int:
    """A token that decodes with a leading space after a word ("return" + " a")."""
    for text in (" a", " b", " x"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1:
            return ids[0]
    raise AssertionError("no single-token ' a'")


def forcing(token: int):
    """A logits processor that makes `token` the only choice: every reply starts with a space."""
    def force(tokens, logits):
        keep = mx.broadcast_to(mx.arange(logits.shape[-1]) == token, logits.shape)
        return mx.where(keep, mx.array(0.0, logits.dtype), mx.array(-1e9, logits.dtype))
    return force


def test_incremental_decoding_equals_whole_decoding(pair):
    _, tokenizer = pair
    texts = ["return a, b", "x = 'héllo wörld'\n\tprint(x)  # ok", "  two  spaces", "end\n\n\n  "]
    for prompt_text in ["def add(a, b):\n    return", "import", "<|turn>model\n"]:
        prompt = tokenizer.encode(prompt_text)
        for text in texts:
            generated = tokenizer.encode(text, add_special_tokens=False)
            decoder = IncrementalDecoder(tokenizer, prompt)
            pieces = [decoder.add(t) for t in generated] + [decoder.finish()]
            whole = tokenizer.decode(prompt + generated)
            assert tokenizer.decode(prompt) + "".join(pieces) == whole
            assert generated_text(tokenizer, prompt, generated) == "".join(pieces)


def test_the_first_token_keeps_its_space_in_every_api_call(pair):
    model, tokenizer = pair
    token = spaced_token(tokenizer)
    ids = tokenizer.encode(PROMPT)
    kwargs = dict(max_tokens=6, num_draft_tokens=2, logits_processors=[forcing(token)])
    responses = list(stream_generate(model, tokenizer, PROMPT, **kwargs))
    generated = [r.token for r in responses]
    assert generated == [token] * 6
    expected = tokenizer.decode(ids + generated)[len(tokenizer.decode(ids)):]
    assert expected.startswith(" ")
    assert "".join(r.text for r in responses) == expected
    assert generate(model, tokenizer, PROMPT, **kwargs) == expected
    assert generate(model, tokenizer, ids, **kwargs) == expected  # token ids, not text: the same
    batch = batch_generate(model, tokenizer, [PROMPT, "import"], **kwargs)
    assert batch.texts[0] == expected
    import_ids = tokenizer.encode("import")
    assert "import" + batch.texts[1] == tokenizer.decode(import_ids + batch.tokens[1])[len("<bos>"):]


def test_greedy_text_adds_up_to_the_whole_decode(pair):
    model, tokenizer = pair
    ids = tokenizer.encode(PROMPT)
    for k in (0, 3):
        responses = list(stream_generate(model, tokenizer, ids, max_tokens=40, num_draft_tokens=k))
        generated = [r.token for r in responses if r.token not in tokenizer.eos_token_ids]
        text = "".join(r.text for r in responses)
        assert tokenizer.decode(ids) + text == tokenizer.decode(ids + generated)


def test_a_templated_string_prompt_gets_one_bos(pair):
    model, tokenizer = pair
    templated = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                              tokenize=False)
    assert templated.startswith(tokenizer.bos_token)
    with_ids = generate(model, tokenizer, tokenizer.encode(templated, add_special_tokens=False), max_tokens=8)
    assert generate(model, tokenizer, templated, max_tokens=8) == with_ids


@pytest.mark.parametrize("seed", [-1, 2**32, 2**70, 1.5])
def test_seeds_outside_uint32_are_refused(pair, seed):
    model, tokenizer = pair
    with pytest.raises(MTPError, match="seed must be a whole number in"):
        generate(model, tokenizer, PROMPT, max_tokens=2, temperature=1.0, seed=seed)


def test_the_largest_seed_works(pair):
    model, tokenizer = pair
    generate(model, tokenizer, PROMPT, max_tokens=2, temperature=1.0, seed=2**32 - 1)


def test_cli_keeps_the_first_space_and_refuses_bad_seeds():
    """`gemma-mtp generate --demo --raw --prompt import` echoes the prompt, then the continuation
    exactly as the whole sequence decodes (the demo's first token is " sys"-like: it keeps its space)."""
    from mlx_gemma_mtp.model.demo import load_demo

    model, tokenizer = load_demo()
    ids = tokenizer.encode("import")
    generated = [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=12)]
    generated = [t for t in generated if t not in tokenizer.eos_token_ids]
    expected = tokenizer.decode(ids + generated, skip_special_tokens=True)
    out = subprocess.run([GEMMA_MTP, "generate", "--demo", "--raw", "--prompt", "import", "--max-tokens", "12"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == expected.rstrip("\n")
    assert out.stdout.startswith("import ")
    for seed in ("-1", str(2**32)):
        bad = subprocess.run([GEMMA_MTP, "generate", "--demo", "--seed", seed, "--prompt", "x"],
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode != 0 and "Traceback" not in bad.stderr
        assert "--seed" in bad.stderr and "bad_cast" not in bad.stderr


def test_cli_chat_reply_is_the_decode_of_its_own_tokens(folder, pair):
    model, tokenizer = pair
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi there"}], add_generation_prompt=True)
    generated = [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=12, num_draft_tokens=3)]
    reply = tokenizer.decode([t for t in generated if t not in tokenizer.eos_token_ids])
    out = subprocess.run([GEMMA_MTP, "chat", "--model", str(folder), "--max-tokens", "12", "--num-draft-tokens", "3"],
                         input="hi there\n", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == reply + "\n"
