"""`gemma-mtp serve --model PAIR` on a converted fixture pair (the 26B-A4B's MoE layout, its own
tokenizer and chat template): greedy output through the official client equals `generate`'s."""

import http.client

import pytest

openai = pytest.importorskip("openai")

from mlx_gemma_mtp import generate  # noqa: E402
from server_process import running_server  # noqa: E402

VARIANT = "26b"
K = 3
TOKENS = 40


@pytest.fixture(scope="module")
def fixture_server(pair_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("fixture-server") / "server.log"
    args = ["--model", str(pair_dir(VARIANT)), "--num-draft-tokens", str(K), "--model-id", "fixture",
            "--log-level", "warning", "--allow-origin", "https://ui.example"]
    with running_server(args, log) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=60, max_retries=0)
        client.port = port
        yield client


def test_completions_equal_generate(fixture_server, loaded):
    pair, tokenizer = loaded(VARIANT)
    prompt = "The quick brown fox jumps over the lazy dog and then"
    expected = generate(pair, tokenizer, prompt, max_tokens=TOKENS, num_draft_tokens=K)
    assert len(expected) > 20  # the comparison has something to compare
    whole = fixture_server.completions.create(model="fixture", prompt=prompt, max_tokens=TOKENS, temperature=0)
    assert whole.choices[0].text == expected
    streamed = fixture_server.completions.create(model="fixture", prompt=prompt, max_tokens=TOKENS, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage is not None and not chunks[-1].choices  # the usage chunk comes last
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_equals_generate_on_the_template(fixture_server, loaded):
    pair, tokenizer = loaded(VARIANT)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name three colours."}]
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    expected = generate(pair, tokenizer, ids, max_tokens=TOKENS, num_draft_tokens=K)
    assert len(expected) > 20
    reply = fixture_server.chat.completions.create(model="fixture", messages=messages, max_tokens=TOKENS,
                                                   temperature=0)
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("origin, allowed", [
    ("http://localhost:3000", True), ("http://127.0.0.1:8501", True), ("https://ui.example", True),
    ("https://elsewhere.example", False), ("http://localhost.elsewhere.example", False),
])
def test_cors(fixture_server, origin, allowed):
    """Browser chat UIs on this machine (and origins named with --allow-origin) may call the API."""
    conn = http.client.HTTPConnection("127.0.0.1", fixture_server.port, timeout=10)
    conn.request("OPTIONS", "/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization"})
    preflight = conn.getresponse()
    preflight.read()
    assert (preflight.status == 200) == allowed
    assert (preflight.getheader("access-control-allow-origin") == origin) == allowed
    conn.request("GET", "/v1/models", headers={"Origin": origin})
    models = conn.getresponse()
    models.read()
    assert models.status == 200
    assert (models.getheader("access-control-allow-origin") == origin) == allowed
    conn.close()
