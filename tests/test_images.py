"""Images in, MTP on: greedy output with images equals transformers' `generate` on the miniature
checkpoints (one and two images, past the sliding window; E2B's per-layer inputs, a tower without
them, the 12B's bidirectional image blocks), MTP output equals plain output, rows with images in a
mixed batch equal their single-stream output, the prompt cache keys images by content, and bad
images are one-line MTPErrors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import reference_models as rm
from mlx_gemma_mtp import load
from mlx_gemma_mtp.api import batch_generate, stream_generate
from mlx_gemma_mtp.convert import convert
from mlx_gemma_mtp.errors import MTPError
from mlx_gemma_mtp.runtime.pair import make_prompt_cache

# the miniatures' vocabulary is 512 ids: boi / image / eoi are moved onto unused specials
BOI, IMAGE, EOI = 50, 51, 52
# the miniature's chat template, taking content parts as Gemma 4's does: an image part is the
# image placeholder (here <unused_47>, id 51)
PARTS_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}<|turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<unused_47>"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}{% endfor %}{% endif %}<turn|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)
BUDGET = 70
MAX_TOKENS = 40


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rs = np.random.RandomState(seed + width * 7 + height)
    return Image.fromarray((rs.rand(height, width, 3) * 255).astype(np.uint8), "RGB")


IMAGES = [noise_image(300, 200), noise_image(120, 160, seed=1)]


@pytest.fixture(scope="module")
def vision_pair(reference_pair, tmp_path_factory):
    """vision_pair(variant) -> (reference model, our pair, tokenizer): the miniature with its image
    ids inside the vocabulary, converted with its drafter (vision weights kept); its folder in
    `folders[variant]`."""
    cache = {}

    def get(variant):
        if variant not in cache:
            target, draft = reference_pair(variant)
            root = tmp_path_factory.mktemp(f"images-{variant}")
            hf = root / "hf"
            shutil.copytree(target, hf)
            config = json.loads((hf / "config.json").read_text())
            config.update(boi_token_id=BOI, image_token_id=IMAGE, eoi_token_id=EOI)
            (hf / "config.json").write_text(json.dumps(config))
            tokenizer_config = json.loads((hf / "tokenizer_config.json").read_text())
            (hf / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": PARTS_TEMPLATE}))
            convert(str(hf), root / "pair", draft=str(draft), dtype="float32", progress=False)
            pair, tokenizer = load(str(root / "pair"))
            cache[variant] = (rm.load_reference_target(hf), pair, tokenizer)
            folders[variant] = root / "pair"
        return cache[variant]

    return get


folders = {}


def text_ids(n: int, seed: int) -> list:
    return np.random.RandomState(seed).randint(110, rm.VOCAB, size=n).tolist()


def reference_tokens(model, variant: str, prompt: list, images: list) -> list:
    """transformers' greedy generation for `prompt` (one IMAGE placeholder per image)."""
    kwargs = {}
    if images:
        processor = rm.reference_image_processor(variant, BUDGET)
        batch = processor(images, return_tensors="pt")
        counts = iter(batch["num_soft_tokens_per_image"])
        expanded = []
        for t in prompt:
            expanded += [BOI] + [IMAGE] * int(next(counts)) + [EOI] if t == IMAGE else [t]
        prompt = expanded
        kwargs = dict(pixel_values=batch["pixel_values"], image_position_ids=batch["image_position_ids"],
                      mm_token_type_ids=torch.tensor([[int(t == IMAGE) for t in prompt]]))
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=MAX_TOKENS, do_sample=False, **kwargs)
    return until_eos(out[0, len(prompt):].tolist())


def until_eos(tokens: list) -> list:
    for i, t in enumerate(tokens):
        if t in rm.EOS_IDS:
            return tokens[: i + 1]
    return tokens


def ours(pair, tokenizer, prompt, images, k=0, max_tokens=MAX_TOKENS, **kwargs) -> list:
    return [r.token for r in stream_generate(pair, tokenizer, prompt, images=images, max_tokens=max_tokens,
                                             num_draft_tokens=k, max_soft_tokens=BUDGET, **kwargs)]


def one_image_prompt() -> list:
    return [rm.BOS_ID] + text_ids(6, 1) + [IMAGE] + text_ids(20, 2)


def two_image_prompt() -> list:
    return [rm.BOS_ID] + text_ids(5, 3) + [IMAGE] + text_ids(7, 4) + [IMAGE] + text_ids(9, 5)


# --- exactness against the reference -------------------------------------------------------------


@pytest.mark.parametrize("variant", ["e2b", "e4b", "26b", "31b", "12b"])
def test_greedy_with_images_equals_transformers(variant, vision_pair):
    model, pair, tokenizer = vision_pair(variant)
    for prompt, images in ((one_image_prompt(), IMAGES[:1]), (two_image_prompt(), IMAGES)):
        expected = reference_tokens(model, variant, prompt, images)
        got = ours(pair, tokenizer, prompt, images)
        assert got == expected, (variant, len(images))
        # past the window: the prompt (text and 64+ image tokens per image) is longer than the
        # miniature's sliding window (16 or 24), and the output is not empty
        assert got and len(prompt) + 64 > rm.spec_for(variant).sliding_window


def test_images_change_the_output(vision_pair):
    _, pair, tokenizer = vision_pair("e2b")
    prompt = one_image_prompt()
    assert ours(pair, tokenizer, prompt, IMAGES[:1]) != ours(pair, tokenizer, prompt, IMAGES[1:])


# --- MTP and batches -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["e2b", "12b"])
def test_mtp_equals_plain_with_images(variant, vision_pair):
    _, pair, tokenizer = vision_pair(variant)
    prompt = two_image_prompt()
    plain = ours(pair, tokenizer, prompt, IMAGES)
    for k in (2, 4, "adaptive"):
        assert ours(pair, tokenizer, prompt, IMAGES, k=k) == plain, k


def test_image_rows_in_a_mixed_batch_equal_their_single_stream(vision_pair):
    _, pair, tokenizer = vision_pair("e2b")
    prompts = [one_image_prompt(), [rm.BOS_ID] + text_ids(30, 7), two_image_prompt(), [rm.BOS_ID] + text_ids(30, 8)]
    images = [IMAGES[:1], None, IMAGES, []]
    alone = [ours(pair, tokenizer, p, im, k=4) for p, im in zip(prompts, images)]
    out = batch_generate(pair, tokenizer, prompts, images=images, max_tokens=MAX_TOKENS, num_draft_tokens=4,
                         max_soft_tokens=BUDGET)
    assert out.tokens == alone


def test_small_prefill_chunks_never_split_an_image(vision_pair):
    _, pair, tokenizer = vision_pair("12b")
    prompt = two_image_prompt()
    assert ours(pair, tokenizer, prompt, IMAGES, prefill_step_size=8) == ours(pair, tokenizer, prompt, IMAGES)


# --- where images go, and the prompt cache -------------------------------------------------------


def test_images_without_placeholders_go_first(vision_pair):
    _, pair, tokenizer = vision_pair("e2b")
    text = text_ids(10, 9)
    assert ours(pair, tokenizer, [rm.BOS_ID] + text, IMAGES[:1]) == ours(pair, tokenizer, [rm.BOS_ID, IMAGE] + text,
                                                                          IMAGES[:1])
    # a pre-expanded boi image... eoi run is one placeholder too
    assert ours(pair, tokenizer, [rm.BOS_ID, BOI, IMAGE, IMAGE, EOI] + text, IMAGES[:1]) == \
        ours(pair, tokenizer, [rm.BOS_ID, IMAGE] + text, IMAGES[:1])


def test_prompt_cache_reuses_the_same_image_only(vision_pair):
    _, pair, tokenizer = vision_pair("e2b")
    first = one_image_prompt()
    cache = make_prompt_cache(pair)
    reply = ours(pair, tokenizer, first, IMAGES[:1], prompt_cache=cache)
    second = first + reply + text_ids(5, 11)
    responses = list(stream_generate(pair, tokenizer, second, images=IMAGES[:1], max_tokens=MAX_TOKENS,
                                     num_draft_tokens=0, max_soft_tokens=BUDGET, prompt_cache=cache))
    stats = responses[-1].stats
    expanded = len(first) + 64 + 1  # at least past the image
    assert stats.reused_prompt_tokens >= expanded - 1
    assert [r.token for r in responses] == ours(pair, tokenizer, second, IMAGES[:1])
    # another picture at the same place: the ids are the same, the content keys are not, so the
    # cache is not reused past the text before it (here: not at all, since an image's 64 tokens
    # are more than a cache may move back) and the output is the other picture's
    responses = list(stream_generate(pair, tokenizer, second, images=IMAGES[1:], max_tokens=MAX_TOKENS,
                                     num_draft_tokens=0, max_soft_tokens=BUDGET, prompt_cache=cache))
    assert responses[-1].stats.reused_prompt_tokens <= first.index(IMAGE) + 1
    assert [r.token for r in responses] == ours(pair, tokenizer, second, IMAGES[1:])


# --- bad input -----------------------------------------------------------------------------------


def test_bad_images_are_one_line_errors(vision_pair):
    _, pair, tokenizer = vision_pair("e2b")
    prompt = one_image_prompt()
    cases = {
        "truncated": ([b"\x89PNG\r\n\x1a\n" + b"\x00" * 20], "corrupt"),
        "not an image": ([b"hello world, no pixels here"], "not an image"),
        "more images than placeholders": (IMAGES, "1 image placeholders for 2 images"),
    }
    for name, (images, fragment) in cases.items():
        with pytest.raises(MTPError) as info:
            ours(pair, tokenizer, prompt, images)
        assert fragment in str(info.value) and "\n" not in str(info.value), (name, str(info.value))


def test_an_image_too_large_for_the_context(vision_pair, monkeypatch):
    _, pair, tokenizer = vision_pair("e2b")
    monkeypatch.setattr(pair.view.args, "max_position_embeddings", 64)
    with pytest.raises(MTPError, match="the model's context is 64 tokens"):
        ours(pair, tokenizer, one_image_prompt(), IMAGES[:1])


def test_text_only_pair_use_loads_no_vision(vision_pair):
    vision_pair("26b")  # its folder, with vision weights; a pair of its own, which no image has touched
    pair, tokenizer = load(str(folders["26b"]))
    ours(pair, tokenizer, [rm.BOS_ID] + text_ids(10, 12), None)
    assert pair.images.load_seconds is None


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_generate_and_chat_with_images(vision_pair, tmp_path):
    from test_cli import run_cli

    _, pair, tokenizer = vision_pair("e2b")
    path, bad = tmp_path / "a.png", tmp_path / "bad.png"
    IMAGES[0].save(path)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    folder = folders["e2b"]
    common = ["--model", folder, "--max-tokens", 8, "--num-draft-tokens", 2]
    result = run_cli("generate", *common, "--prompt", "Hello", "--image", path)
    assert result.returncode == 0, result.stderr
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hello"}]}]
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    assert IMAGE in ids
    from mlx_gemma_mtp.api import generate
    assert result.stdout.rstrip("\n") == generate(pair, tokenizer, ids, images=[path], max_tokens=8)
    result = run_cli("generate", *common, "--prompt", "Hello", "--image", bad)
    assert result.returncode != 0 and result.stderr.strip().count("\n") == 0 and "corrupt" in result.stderr
    result = run_cli("chat", *common, "--verbose", input=f"/image {path}\nHello\nAnd again\n")
    assert result.returncode == 0, result.stderr
    reused = [line for line in result.stderr.splitlines() if "reused from the cache" in line]
    assert len(reused) == 2 and int(reused[1].split(", ")[2].split()[0]) > 64  # the image came from the cache


# --- the server ----------------------------------------------------------------------------------


def data_url(image: Image.Image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def image_host(tmp_path_factory):
    """A tiny http server on 127.0.0.1 serving a folder (a.png and a large file)."""
    import functools
    import http.server
    import threading

    folder = tmp_path_factory.mktemp("http")
    IMAGES[0].save(folder / "a.png")
    (folder / "big.png").write_bytes(b"\x00" * 300_000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_server_takes_image_urls_and_reuses_the_image(vision_pair, image_host, tmp_path):
    import openai
    from server_process import running_server

    _, pair, tokenizer = vision_pair("e2b")
    folder = folders["e2b"]
    args = ["--model", folder, "--num-draft-tokens", "2", "--max-image-bytes", "200000"]
    with running_server(args, tmp_path / "log") as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id

        def ask(messages, **kwargs):
            return client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                                  **kwargs)

        image = {"type": "image_url", "image_url": {"url": data_url(IMAGES[0])}}
        turn = [{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}]
        first = ask(turn)
        template = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
        ids = list(tokenizer.apply_chat_template(template, add_generation_prompt=True))
        from mlx_gemma_mtp.api import generate

        expected = generate(pair, tokenizer, ids, images=[IMAGES[0]], max_tokens=12)
        assert first.choices[0].message.content == expected
        assert first.usage.prompt_tokens > 64
        streamed = "".join(c.choices[0].delta.content or "" for c in ask(turn, stream=True) if c.choices)
        assert streamed == expected
        # the next turn about the same picture reuses the cached prefix, image included
        second = turn + [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "And now?"}]
        again = ask(second)
        assert again.usage.prompt_tokens_details.cached_tokens > 64
        # the same picture from a URL: the same reply
        by_url = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{image_host}/a.png"}},
                                               {"type": "text", "text": "What is this?"}]}]
        assert ask(by_url).choices[0].message.content == expected
        # bad input: one 400 each, and the server goes on
        bad_urls = {
            "data:image/png;base64,iVBORw0KGgo=": "corrupt",
            "data:image/png;base64,@@@": "not valid base64",
            f"{image_host}/big.png": "over 200000 bytes",
            f"{image_host}/missing.png": "HTTP 404",
            "http://127.0.0.1:9/x.png": "could not be fetched",
            str(tmp_path / "log"): "--allow-local-images",
        }
        for url, fragment in bad_urls.items():
            with pytest.raises(openai.BadRequestError) as info:
                ask([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
            assert fragment in info.value.message, (url, info.value.message)
        assert ask(turn).choices[0].message.content == expected

        # the agents' APIs take the same picture: Responses' input_image, Anthropic's image block
        reply = client.responses.create(model=model, max_output_tokens=12, temperature=0, input=[
            {"role": "user", "content": [{"type": "input_image", "image_url": data_url(IMAGES[0])},
                                         {"type": "input_text", "text": "What is this?"}]}])
        assert reply.output_text == expected
        import anthropic

        claude = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="none", max_retries=0)
        encoded = data_url(IMAGES[0]).split(",", 1)[1]
        message = claude.messages.create(model=model, max_tokens=12, extra_body={"temperature": 0}, messages=[
            {"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": encoded}},
                {"type": "text", "text": "What is this?"}]}])
        assert "".join(b.text for b in message.content if b.type == "text") == expected
