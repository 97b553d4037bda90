"""`gemma-mtp serve` over 2 processes (mlx.launch, ring backend over 127.0.0.1): rank 0 serves HTTP,
rank 1 replays its engine operations. Through the official client, replies equal the single
process's `generate` on the same pair: concurrent greedy requests (streamed and not, of different
lengths, with a fixed K, with logit bias and penalties), a request cancelled midway beside another,
seeded sampling, a JSON Schema reply, and long concurrent requests with adaptive K while rank 1's clock is skewed (its K
must still be rank 0's). SIGTERM to rank 0 stops both ranks cleanly; a killed rank 0 leaves no rank
behind."""

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

openai = pytest.importorskip("openai")

from mlx_lm.sample_utils import make_logits_processors  # noqa: E402

from mlx_gemma_mtp import generate  # noqa: E402
from server_process import free_port, health, wait_healthy  # noqa: E402
from test_distributed import LONG_TOKENS, RUNNER, free_ports  # noqa: E402

VARIANT = "26b"
K = 3
MODEL = "fixture"
START_TIMEOUT = 240  # two ranks loading on a small shared machine
PROMPTS = ["The quick brown fox jumps over", "Once upon a time there was", "def main(argv):",
           "Roses are red, violets are"]

pytestmark = pytest.mark.usefixtures("launch_lock")  # one file of rings at a time


def rank_pids(launcher: int) -> dict:
    """rank -> pid of the processes mlx.launch started (its children carry MLX_RANK)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            env = dict(v.split("=", 1) for v in (entry / "environ").read_text().split("\0") if "=" in v)
        except (OSError, IndexError, ValueError):
            continue
        if "MLX_RANK" in env:
            ranks[int(env["MLX_RANK"])] = int(entry.name)
    return ranks


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def launched_server(pair: Path, args: list, log: Path, hooks: dict = None):
    """`mlx.launch -n 2 -- gemma-mtp serve --model PAIR ARGS` (through the test runner with its
    `hooks` in the environment, if any); yields (launcher, client) once /health answers; the
    launcher's process group (it and both ranks) is always killed."""
    ring = free_ports()
    port = free_port()
    while ring <= port <= ring + 1:
        port = free_port()
    gemma_mtp = [str(RUNNER), "--cli"] if hooks else ["-m", "mlx_gemma_mtp.cli"]
    cmd = [str(Path(sys.executable).with_name("mlx.launch")), "--backend", "ring", "-n", "2", "--hosts", "127.0.0.1",
           "--starting-port", str(ring), "--", sys.executable, *gemma_mtp, "serve",
           "--model", str(pair), "--model-id", MODEL, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(hooks or {})})
    try:
        wait_healthy(proc, port, log, START_TIMEOUT)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=120, max_retries=0)
        client.port, client.log = port, log
        yield proc, client
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def wait_idle(client, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if health(client.port)["running"] == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"rows still running after {timeout} s: {health(client.port)}")


def complete(client, prompt: str, max_tokens: int, stream: bool = False, **kwargs) -> str:
    if not stream:
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, **kwargs).choices[0].text
    chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, stream=True, **kwargs)
    return "".join(c.choices[0].text for c in chunks if c.choices)


def concurrently(*calls) -> list:
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


@pytest.fixture(scope="module")
def group(launch_lock, pair_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("group-serve") / "launch.log"
    with launched_server(pair_dir(VARIANT), ["--num-draft-tokens", str(K), "--max-batch", "4"], log) as (proc, c):
        c.proc = proc
        yield c


def test_concurrent_greedy_equal_generate(group, loaded):
    pair, tokenizer = loaded(VARIANT)
    bias = {5: -100.0, 300: 5.0}
    processors = make_logits_processors(bias, presence_penalty=0.5, presence_context_size=20)
    messages = [{"role": "user", "content": "Name three colours."}]
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    want = [generate(pair, tokenizer, PROMPTS[0], max_tokens=24, num_draft_tokens=K),
            generate(pair, tokenizer, PROMPTS[1], max_tokens=16, num_draft_tokens=K),
            generate(pair, tokenizer, ids, max_tokens=20, num_draft_tokens=K),
            generate(pair, tokenizer, PROMPTS[2], max_tokens=12, num_draft_tokens=K, logits_processors=processors)]
    got = concurrently(
        lambda: complete(group, PROMPTS[0], 24, temperature=0),
        lambda: complete(group, PROMPTS[1], 16, stream=True, temperature=0, extra_body={"num_draft_tokens": K}),
        lambda: group.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                              temperature=0).choices[0].message.content,
        lambda: complete(group, PROMPTS[2], 12, stream=True, temperature=0, presence_penalty=0.5,
                         logit_bias={str(t): v for t, v in bias.items()}),
    )
    assert all(len(w) > 5 for w in want)
    assert got == want


def test_cancelled_request_beside_another(group, loaded):
    pair, tokenizer = loaded(VARIANT)
    stream = group.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=400, temperature=0, stream=True)
    chunks = iter(stream)
    next(chunks)  # decoding
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        beside = pool.submit(complete, group, PROMPTS[1], 20, temperature=0)
        for _ in range(3):
            next(chunks)
        stream.close()  # the client goes away midway
        assert beside.result() == generate(pair, tokenizer, PROMPTS[1], max_tokens=20, num_draft_tokens=K)
    wait_idle(group, timeout=30)  # the cancelled row left (400 tokens take minutes here)
    after = group.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=16, temperature=0)
    assert after.choices[0].text == generate(pair, tokenizer, PROMPTS[3], max_tokens=16, num_draft_tokens=K)
    assert after.usage.prompt_tokens_details.cached_tokens > 0  # every rank reused the cancelled row's cache


def test_seeded_sampling_equals_generate(group, loaded):
    pair, tokenizer = loaded(VARIANT)
    settings = dict(temperature=0.8, top_p=0.95, seed=7)
    want = generate(pair, tokenizer, PROMPTS[0], max_tokens=20, num_draft_tokens=K, **settings)
    assert complete(group, PROMPTS[0], 20, **settings) == want


def test_structured_output_equals_generate(group, loaded):
    """A JSON Schema reply (every rank masks its row the same way) beside a free one."""
    pair, tokenizer = loaded(VARIANT)
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "n"],
              "properties": {"name": {"type": "string", "maxLength": 12}, "n": {"type": "integer", "maximum": 99}}}
    messages = [{"role": "user", "content": "A record as JSON"}]
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    want = [generate(pair, tokenizer, ids, max_tokens=48, num_draft_tokens=K, json_schema=schema),
            generate(pair, tokenizer, PROMPTS[1], max_tokens=16, num_draft_tokens=K)]
    got = concurrently(
        lambda: group.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=48, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
        ).choices[0].message.content,
        lambda: complete(group, PROMPTS[1], 16, temperature=0),
    )
    assert got == want
    jsonschema.validate(json.loads(want[0]), schema)


def test_bad_requests_leave_the_group_serving(group, loaded):
    pair, tokenizer = loaded(VARIANT)
    for kwargs, param in [(dict(max_tokens=0), "max_tokens"), (dict(logit_bias={"99999": 1}), "logit_bias"),
                          (dict(extra_body={"num_draft_tokens": 5}), "num_draft_tokens")]:
        with pytest.raises(openai.BadRequestError) as e:
            group.completions.create(model=MODEL, prompt=PROMPTS[2], **{"max_tokens": 8, **kwargs})
        assert e.value.body["param"] == param
    assert complete(group, PROMPTS[2], 8, temperature=0) == generate(pair, tokenizer, PROMPTS[2], max_tokens=8,
                                                                      num_draft_tokens=K)


def test_sigterm_stops_every_rank(group):
    ranks = rank_pids(group.proc.pid)
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[0], signal.SIGTERM)
    group.proc.wait(timeout=60)  # the launcher returns once both ranks have exited
    log = group.log.read_text()
    assert "exited with code" not in log and "was killed" not in log, log[-3000:]


def test_long_concurrent_requests_with_adaptive_k_and_a_skewed_clock_then_a_killed_rank0(pair_dir, loaded,
                                                                                           tmp_path):
    """Three rows of different lengths (the batch shrinks from 3 to 1: each batch size gets its
    own adaptive policy) over many rounds, rank 1 timing its rounds 3x fast with jitter: replies
    equal the single process's, and the group serves on. Then a killed rank 0 leaves no rank behind."""
    pair, tokenizer = loaded(VARIANT)
    lengths = (LONG_TOKENS, LONG_TOKENS + 8, LONG_TOKENS + 16)
    want = [generate(pair, tokenizer, PROMPTS[i], max_tokens=n) for i, n in enumerate(lengths)]
    hooks = {"MTP_TEST_SKEWED_CLOCK": "1"}
    with launched_server(pair_dir(VARIANT), [], tmp_path / "launch.log", hooks) as (proc, client):
        got = concurrently(lambda: complete(client, PROMPTS[0], lengths[0], temperature=0),
                           lambda: complete(client, PROMPTS[1], lengths[1], stream=True, temperature=0),
                           lambda: complete(client, PROMPTS[2], lengths[2], temperature=0))
        assert got == want
        usage = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=8, temperature=0).usage
        assert usage.completion_tokens == 8  # the group still serves
        ranks = rank_pids(proc.pid)
        os.kill(ranks[0], signal.SIGKILL)
        proc.wait(timeout=60)  # rank 1 does not wait forever for the rank that died
        assert not alive(ranks[1])
