"""`gemma-mtp generate` and `gemma-mtp chat`, run as the installed command on a miniature e2b pair.

Every run pays ~2 s of imports, so the runs start together in a module fixture (a few at a time)
and each test reads the results it needs.
"""

import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mlx_gemma_mtp.convert import convert

GEMMA_MTP = str(Path(sys.executable).parent / "gemma-mtp")
# Greedy output of the miniature e2b pair for this prompt runs thousands of tokens without an EOS.
LONG = "Once upon a time"
WORKERS = 3


@pytest.fixture(scope="module")
def pair(reference_pair, tmp_path_factory):
    target, draft = reference_pair("e2b")
    out = tmp_path_factory.mktemp("cli") / "e2b-mtp"
    convert(str(target), out, draft=str(draft), dtype="float32", progress=False)
    return out


def run_cli(*args, input=None, env=None, stdin=None):
    """Run the command; stdin is `input`, or empty (never the terminal pytest runs in)."""
    if stdin is not None:
        return subprocess.run([GEMMA_MTP, *map(str, args)], stdin=stdin, capture_output=True, text=True,
                              env=env, timeout=120)
    return subprocess.run([GEMMA_MTP, *map(str, args)], input=input or "", capture_output=True, text=True,
                          env=env, timeout=120)


def run_bytes(*args, input=b""):
    """Run the command with bytes as arguments and stdin (which need not be UTF-8)."""
    result = subprocess.run([GEMMA_MTP, *args], input=input, capture_output=True, timeout=120)
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(errors="replace"),
                                       result.stderr.decode(errors="replace"))


def edited_copy(pair, folder, change):
    """A copy of the pair whose target config.json went through `change`."""
    copy = shutil.copytree(pair, folder)
    path = copy / "target" / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    return copy


def context_of(n):
    return lambda config: config["text_config"].update(max_position_embeddings=n)


BAD_VALUES = {
    "max-tokens": (["--max-tokens", "-1"], "--max-tokens"),
    "temp": (["--temp", "-0.5"], "--temp"),
    "temp-nan": (["--temp", "nan"], "--temp"),
    "top-p": (["--top-p", "1.5"], "--top-p"),
    "top-k": (["--top-k", "-3"], "--top-k"),
    "min-p": (["--min-p", "2"], "--min-p"),
    "repetition-penalty": (["--repetition-penalty", "0"], "--repetition-penalty"),
    "draft-negative": (["--num-draft-tokens", "-2"], "--num-draft-tokens"),
    "draft-word": (["--num-draft-tokens", "lots"], "--num-draft-tokens"),
    "draft-too-many": (["--num-draft-tokens", "17"], "between 0 and 16"),
}


def commands(pair, tmp, reference_pair):
    """name -> (args, stdin text) of every run the tests below read."""
    gen = ("generate", "--model", pair)
    sampled = (*gen, "--prompt", LONG, "--max-tokens", 12, "--temp", 0.8, "--top-p", 0.9, "--top-k", 50,
               "--min-p", 0.05, "--repetition-penalty", 1.1, "--seed", 7, "--num-draft-tokens", 2)  # repeatable at a fixed K
    runs = {
        "verbose": ((*gen, "--prompt", LONG, "--max-tokens", 7, "--verbose", "--num-draft-tokens", 3), None),
        "plain": ((*gen, "--prompt", LONG, "--max-tokens", 7, "--verbose", "--no-draft"), None),
        "stdin": ((*gen, "--max-tokens", 7), LONG + "\n"),
        "dash": ((*gen, "--prompt", "-", "--max-tokens", 7), LONG),
        "hf-folders": (("generate", "--model", reference_pair("e2b")[0], "--draft-model", reference_pair("e2b")[1],
                        "--prompt", LONG, "--max-tokens", 7), None),
        "raw": ((*gen, "--prompt", LONG, "--max-tokens", 7, "--verbose", "--raw"), None),
        "system": ((*gen, "--prompt", LONG, "--max-tokens", 7, "--verbose", "--system", "Be brief."), None),
        "sampled": (sampled, None),
        "sampled-again": (sampled, None),
        "adaptive": ((*gen, "--prompt", LONG, "--max-tokens", 12, "--num-draft-tokens", "adaptive"), None),
        "short-context": (("generate", "--model", edited_copy(pair, tmp / "ctx24", context_of(24)),
                           "--prompt", "Hi", "--max-tokens", 100, "--verbose"), None),
        "chat": (("chat", "--model", pair, "--max-tokens", 6, "--verbose"),
                 "Hello there\n/stats\n\nTell me more\n/quit\nnever read\n"),
        "chat-first": ((*gen, "--prompt", "Hello there", "--max-tokens", 6), None),
        "chat-reset": (("chat", "--model", pair, "--max-tokens", 5, "--verbose"),
                       "Hello there\n/reset\nHello there\n/bogus\n"),  # ends without /quit
        # bad input
        "missing-model": (("generate", "--model", tmp / "nope", "--prompt", "Hi"), None),
        "incompatible": (("generate", "--model", reference_pair("31b")[0], "--draft-model",
                          reference_pair("12b")[1], "--prompt", "Hi"), None),
        "unknown-type": (("generate", "--model", edited_copy(pair, tmp / "llama", lambda c: c.update(model_type="llama")),
                          "--prompt", "Hi"), None),
        "too-long": (("generate", "--model", edited_copy(pair, tmp / "ctx16", context_of(16)),
                      "--prompt", "tell me a story " * 4), None),
        "empty-prompt": ((*gen, "--prompt", "  "), None),
        "empty-stdin": (gen, ""),
        "contradiction": ((*gen, "--no-draft", "--draft-model", pair, "--prompt", "Hi"), None),
        "chat-bad": (("chat", "--model", pair, "--temp", "-1"), ""),
    }
    for name, (args, _) in BAD_VALUES.items():
        runs[f"bad-{name}"] = ((*gen, "--prompt", "Hi", *args), None)
    return runs


@pytest.fixture(scope="module")
def results(pair, reference_pair, tmp_path_factory):
    runs = commands(pair, tmp_path_factory.mktemp("cli-runs"), reference_pair)
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {name: pool.submit(run_cli, *args, input=text) for name, (args, text) in runs.items()}
        return {name: future.result() for name, future in futures.items()}


def ok(results, name):
    result = results[name]
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def number(stderr, pattern):
    match = re.search(pattern, stderr)
    assert match, stderr
    return int(match.group(1))


def prompt_tokens(result, how="chat template"):
    return number(result.stderr, rf"prompt: (\d+) tokens \({how}\)")


def generated(result):
    return number(result.stderr, r"generation: (\d+) tokens")


# ---- generate -------------------------------------------------------------------------------


def test_generate_streams_text_and_a_summary(results):
    result = ok(results, "verbose")
    assert result.stdout.strip()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 4, result.stderr  # --verbose adds the first and the last line
    lines = lines[1:3]
    assert re.match(r"prompt: \d+ tokens, [\d.]+ tok/s \| generation: 7 tokens, [\d.]+ tok/s \| "
                    r"[\d.]+ tokens/round \| peak memory [\d.]+ [MG]B$", lines[0]), lines[0]
    assert re.match(r"acceptance per position:( [\d.]+){3}$", lines[1]), lines[1]


def test_prompt_from_stdin(results):
    assert ok(results, "stdin").stdout == ok(results, "dash").stdout == ok(results, "verbose").stdout


def test_unconverted_checkpoints_load(results):
    # Hugging Face folders (as a hub id downloads them) give the converted float32 pair's text
    assert ok(results, "hf-folders").stdout == ok(results, "verbose").stdout


def test_chat_template_and_raw(results):
    chat, raw, system = ok(results, "verbose"), ok(results, "raw"), ok(results, "system")
    assert prompt_tokens(chat) > prompt_tokens(raw, "raw")
    assert prompt_tokens(system) > prompt_tokens(chat)
    assert raw.stdout != chat.stdout


def test_no_draft_gives_the_same_greedy_text(results):
    drafted, plain = ok(results, "verbose"), ok(results, "plain")
    assert drafted.stdout == plain.stdout
    assert "drafter: yes" in drafted.stderr and "drafter: none" in plain.stderr
    assert "acceptance per position" not in plain.stderr and "tokens/round" not in plain.stderr


def test_max_tokens_and_verbose_details(results):
    result = ok(results, "verbose")
    assert generated(result) == 7
    assert re.search(r"rounds: \d+, accepted/drafted per position: \d+/\d+ \d+/\d+ \d+/\d+, finish: length",
                     result.stderr), result.stderr


def test_seeded_sampling_repeats(results):
    assert ok(results, "sampled").stdout == ok(results, "sampled-again").stdout
    assert generated(ok(results, "adaptive")) == 12


def test_context_limit_shortens_max_tokens(results):
    result = ok(results, "short-context")
    assert generated(result) == 24 - prompt_tokens(result)


def test_ctrl_c_stops_with_stats(pair):
    proc = subprocess.Popen(
        [GEMMA_MTP, "generate", "--model", str(pair), "--prompt", LONG, "--max-tokens", "100000"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # a shell's background job ignores SIGINT and children inherit that: give Ctrl-C its default back
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout.read(1), "no output before the interrupt"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    stderr = stderr.decode()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert re.fullmatch(r"interrupted: \d+ tokens \(\d+ from drafts\) in [\d.]+ s including the prompt, "
                        r"[\d.]+ tok/s\n", stderr), stderr


# ---- bad input: one line, non-zero exit, no traceback ---------------------------------------


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("name", BAD_VALUES)
def test_bad_values(results, name):
    result = results[f"bad-{name}"]
    assert_one_line_error(result, BAD_VALUES[name][1])
    assert not result.stdout


@pytest.mark.parametrize(
    "name,fragment",
    [
        ("missing-model", "neither a folder nor a Hugging Face repo id"),
        ("incompatible", "incompatible pair"),
        ("unknown-type", "llama"),
        ("too-long", "the model's context is 16"),
        ("empty-prompt", "the prompt is empty"),
        ("empty-stdin", "the prompt is empty"),
        ("contradiction", "--no-draft"),
        ("chat-bad", "--temp"),
    ],
)
def test_bad_input(results, name, fragment):
    assert_one_line_error(results[name], fragment)


def test_draft_length_beyond_the_limit_fails_before_loading():
    # refused while the command line is parsed: the demo pair is neither loaded nor its prompt echoed
    result = run_cli("generate", "--demo", "--prompt", "x", "--num-draft-tokens", "99")
    assert result.returncode == 2
    assert_one_line_error(result, "--num-draft-tokens", "between 0 and 16", "99")
    assert result.stdout == ""


def test_stdin_that_is_not_utf8():
    result = run_bytes("generate", "--demo", input=b"caf\xe9")
    assert_one_line_error(result, "stdin is not UTF-8", "0xe9", "offset 3")
    assert result.stdout == ""


def test_prompt_argument_that_is_not_utf8():
    # Python decodes argv with surrogateescape: the bytes reach the command as lone surrogates
    result = run_bytes("generate", "--demo", "--prompt", b"def caf\xe9():")
    assert_one_line_error(result, "--prompt is not UTF-8", "0xe9", "offset 7")
    assert result.stdout == ""


def test_chat_stdin_that_is_not_utf8(pair):
    # blank lines are skipped, but their bytes count toward the offset
    result = run_bytes("chat", "--model", str(pair), "--max-tokens", "3", input=b"\n\ncaf\xe9 au lait\n")
    assert_one_line_error(result, "stdin is not UTF-8", "0xe9", "offset 5")
    assert result.stdout == ""


def test_uncached_hub_id_offline(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = run_cli("generate", "--model", "nobody/no-such-model", "--prompt", "Hi", env=env)
    assert_one_line_error(result, "'nobody/no-such-model'", "not in the local Hugging Face cache")


def test_no_prompt_at_a_terminal(pair):
    leader, follower = pty.openpty()
    try:
        result = run_cli("generate", "--model", pair, stdin=follower)
    finally:
        os.close(leader)
        os.close(follower)
    assert_one_line_error(result, "no prompt")


# ---- chat -----------------------------------------------------------------------------------


def test_chat_keeps_the_cache_between_turns(results):
    result = ok(results, "chat")
    turns = re.findall(r"prompt: (\d+) tokens, (\d+) processed, (\d+) reused from the cache", result.stderr)
    assert len(turns) == 2, result.stderr
    (total1, processed1, reused1), (total2, processed2, reused2) = [tuple(map(int, t)) for t in turns]
    assert (processed1, reused1) == (total1, 0)
    assert reused2 >= total1  # the whole first prompt, at least, is not recomputed
    assert processed2 == total2 - reused2
    # a summary per reply, plus the one /stats printed
    assert result.stderr.count("generation: 6 tokens") == 3
    # the first reply is what `generate` answers to the same first message
    first = ok(results, "chat-first").stdout
    assert result.stdout.startswith(first) and len(result.stdout) > len(first)
    assert "> " not in result.stdout  # no prompt marker when stdin is not a terminal


def test_chat_reset_and_end_of_input(results):
    result = ok(results, "chat-reset")
    reused = [int(t) for t in re.findall(r"processed, (\d+) reused", result.stderr)]
    assert reused == [0, 0]  # /reset starts from a fresh cache
    assert "unknown command '/bogus'" in result.stderr
    half = len(result.stdout) // 2
    assert result.stdout[:half] == result.stdout[half:]  # the same reply to the same fresh conversation
