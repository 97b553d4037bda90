"""`gemma-mtp generate` and `gemma-mtp chat`, run as the installed command on a miniature e2b pair."""

import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_gemma_mtp.convert import convert

GEMMA_MTP = str(Path(sys.executable).parent / "gemma-mtp")
# Greedy output of the miniature e2b pair for this prompt runs thousands of tokens without an EOS.
LONG_PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def pair(reference_pair, tmp_path_factory):
    target, draft = reference_pair("e2b")
    out = tmp_path_factory.mktemp("cli") / "e2b-mtp"
    convert(str(target), out, draft=str(draft), dtype="float32", progress=False)
    return out


def run_cli(*args, input=None, env=None):
    """Run the command; stdin is `input`, or empty (never the terminal pytest runs in)."""
    return subprocess.run([GEMMA_MTP, *map(str, args)], input=input or "", capture_output=True, text=True,
                          env=env, timeout=120)


def assert_ok(result):
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


def summary_value(stderr, pattern):
    match = re.search(pattern, stderr)
    assert match, stderr
    return int(match.group(1))


def generated(stderr):
    return summary_value(stderr, r"generation: (\d+) tokens")


# ---- generate -------------------------------------------------------------------------------


def test_generate_streams_text_and_summary(pair):
    result = run_cli("generate", "--model", pair, "--prompt", "Hello there", "--max-tokens", 8)
    assert_ok(result)
    assert result.stdout.strip()
    lines = result.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2, result.stderr
    assert "prompt:" in lines[0] and "generation: 8 tokens" in lines[0] and "peak memory" in lines[0]
    assert "tokens/round" in lines[0]
    assert lines[1].startswith("acceptance per position: ")


def test_prompt_from_stdin_equals_prompt_flag(pair):
    flag = run_cli("generate", "--model", pair, "--prompt", "Hello there", "--max-tokens", 8)
    piped = run_cli("generate", "--model", pair, "--max-tokens", 8, input="Hello there\n")
    dash = run_cli("generate", "--model", pair, "--prompt", "-", "--max-tokens", 8, input="Hello there")
    for result in (flag, piped, dash):
        assert_ok(result)
    assert piped.stdout == flag.stdout == dash.stdout


def test_raw_skips_the_chat_template(pair):
    chat = run_cli("generate", "--model", pair, "--prompt", "Hello there", "--max-tokens", 4, "--verbose")
    raw = run_cli("generate", "--model", pair, "--prompt", "Hello there", "--max-tokens", 4, "--verbose", "--raw")
    assert_ok(chat)
    assert_ok(raw)
    chat_tokens = summary_value(chat.stderr, r"prompt: (\d+) tokens \(chat template\)")
    raw_tokens = summary_value(raw.stderr, r"prompt: (\d+) tokens \(raw\)")
    assert chat_tokens > raw_tokens
    system = run_cli("generate", "--model", pair, "--prompt", "Hello there", "--max-tokens", 4, "--verbose",
                     "--system", "Be brief.")
    assert_ok(system)
    assert summary_value(system.stderr, r"prompt: (\d+) tokens \(chat template\)") > chat_tokens


def test_no_draft_gives_the_same_greedy_text(pair):
    drafted = run_cli("generate", "--model", pair, "--prompt", LONG_PROMPT, "--max-tokens", 40, "--verbose")
    plain = run_cli("generate", "--model", pair, "--prompt", LONG_PROMPT, "--max-tokens", 40, "--verbose",
                    "--no-draft")
    assert_ok(drafted)
    assert_ok(plain)
    assert drafted.stdout == plain.stdout
    assert "drafter: yes" in drafted.stderr and "drafter: none" in plain.stderr
    assert "acceptance per position" not in plain.stderr


def test_max_tokens_is_respected(pair):
    result = run_cli("generate", "--model", pair, "--prompt", LONG_PROMPT, "--max-tokens", 7, "--verbose")
    assert_ok(result)
    assert generated(result.stderr) == 7
    assert "finish: length" in result.stderr


def test_verbose_details(pair):
    result = run_cli("generate", "--model", pair, "--prompt", LONG_PROMPT, "--max-tokens", 12, "--verbose",
                     "--num-draft-tokens", 3)
    assert_ok(result)
    assert re.search(r"rounds: \d+, accepted/drafted per position: \d+/\d+ \d+/\d+ \d+/\d+, finish: length",
                     result.stderr), result.stderr


def test_adaptive_and_seeded_sampling(pair):
    args = ("generate", "--model", pair, "--prompt", LONG_PROMPT, "--max-tokens", 12, "--temp", 0.8,
            "--top-p", 0.9, "--top-k", 50, "--min-p", 0.05, "--repetition-penalty", 1.1, "--seed", 7,
            "--num-draft-tokens", "adaptive")
    first, second = run_cli(*args), run_cli(*args)
    assert_ok(first)
    assert first.stdout == second.stdout


def test_context_limit_shortens_max_tokens(pair, tmp_path):
    short = shorten_context(pair, tmp_path, 24)
    result = run_cli("generate", "--model", short, "--prompt", "Hi", "--max-tokens", 100, "--verbose")
    assert_ok(result)
    prompt = summary_value(result.stderr, r"prompt: (\d+) tokens \(chat template\)")
    assert generated(result.stderr) == 24 - prompt


def shorten_context(pair, tmp_path, context):
    short = shutil.copytree(pair, tmp_path / "short")
    config_path = short / "target" / "config.json"
    config = json.loads(config_path.read_text())
    config["text_config"]["max_position_embeddings"] = context
    config_path.write_text(json.dumps(config))
    return short


def test_ctrl_c_stops_with_stats(pair):
    proc = subprocess.Popen(
        [GEMMA_MTP, "generate", "--model", str(pair), "--prompt", LONG_PROMPT, "--max-tokens", "100000"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
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
    assert re.search(r"interrupted: \d+ tokens \(\d+ from drafts\) in [\d.]+ s", stderr), stderr


# ---- bad input: one line, non-zero exit, no traceback ---------------------------------------


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


BAD_VALUES = [
    (["--max-tokens", "-1"], "--max-tokens"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--temp", "-0.5"], "--temp"),
    (["--temp", "nan"], "--temp"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-p", "0"], "--top-p"),
    (["--top-k", "-3"], "--top-k"),
    (["--min-p", "2"], "--min-p"),
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--num-draft-tokens", "-2"], "--num-draft-tokens"),
    (["--num-draft-tokens", "lots"], "--num-draft-tokens"),
    (["--num-draft-tokens", "99"], "num_draft_tokens"),
    (["--seed", "x"], "--seed"),
]


@pytest.mark.parametrize("args,fragment", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_values(pair, args, fragment):
    result = run_cli("generate", "--model", pair, "--prompt", "Hi", *args)
    assert_one_line_error(result, fragment)
    assert not result.stdout


def test_missing_model(tmp_path):
    assert_one_line_error(run_cli("generate", "--model", tmp_path / "nope", "--prompt", "Hi"), "neither a folder")


def test_uncached_hub_id_offline(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = run_cli("generate", "--model", "nobody/no-such-model", "--prompt", "Hi", env=env)
    assert_one_line_error(result, "nobody/no-such-model", "not in the local Hugging Face cache")


def test_incompatible_pair(reference_pair):
    target, _ = reference_pair("31b")
    _, drafter = reference_pair("12b")
    result = run_cli("generate", "--model", target, "--draft-model", drafter, "--prompt", "Hi")
    assert_one_line_error(result, "incompatible pair")


def test_unknown_model_type(pair, tmp_path):
    copy = shutil.copytree(pair, tmp_path / "llama")
    config_path = copy / "target" / "config.json"
    config_path.write_text(json.dumps(dict(json.loads(config_path.read_text()), model_type="llama")))
    assert_one_line_error(run_cli("generate", "--model", copy, "--prompt", "Hi"), "llama")


def test_prompt_longer_than_context(pair, tmp_path):
    short = shorten_context(pair, tmp_path, 16)
    result = run_cli("generate", "--model", short, "--prompt", "tell me a story " * 4)
    assert_one_line_error(result, "context is 16")


def test_empty_prompt(pair):
    assert_one_line_error(run_cli("generate", "--model", pair, "--prompt", "  "), "empty")
    assert_one_line_error(run_cli("generate", "--model", pair, input=""), "empty")


def test_no_prompt_at_a_terminal(pair):
    leader, follower = pty.openpty()
    try:
        result = subprocess.run([GEMMA_MTP, "generate", "--model", str(pair)], stdin=follower,
                                capture_output=True, text=True, timeout=120)
    finally:
        os.close(leader)
        os.close(follower)
    assert_one_line_error(result, "no prompt")


def test_contradicting_flags(pair):
    result = run_cli("generate", "--model", pair, "--no-draft", "--draft-model", pair, "--prompt", "Hi")
    assert_one_line_error(result, "--no-draft")


# ---- chat -----------------------------------------------------------------------------------


def test_chat_keeps_the_cache_between_turns(pair):
    script = "Hello there\n/stats\n\nTell me more\n/quit\nnever read\n"
    result = run_cli("chat", "--model", pair, "--max-tokens", 6, "--verbose", input=script)
    assert_ok(result)
    turns = re.findall(r"prompt: (\d+) tokens, (\d+) processed, (\d+) reused from the cache", result.stderr)
    assert len(turns) == 2, result.stderr
    (total1, processed1, reused1), (total2, processed2, reused2) = [tuple(map(int, t)) for t in turns]
    assert (processed1, reused1) == (total1, 0)
    assert reused2 > 0 and processed2 == total2 - reused2
    assert reused2 >= total1  # at least the whole first prompt
    # two replies and /stats: a summary per turn plus the one /stats printed
    assert result.stderr.count("generation: 6 tokens") == 3
    # the first reply is what `generate` says to the same first message
    first = run_cli("generate", "--model", pair, "--prompt", "Hello there", "--max-tokens", 6)
    assert result.stdout.startswith(first.stdout)
    assert len(result.stdout) > len(first.stdout)
    assert "> " not in result.stdout  # no prompt marker when stdin is not a terminal


def test_chat_reset_and_eof(pair):
    script = "Hello there\n/reset\nHello there\n/bogus\n"  # ends without /quit
    result = run_cli("chat", "--model", pair, "--max-tokens", 5, "--verbose", input=script)
    assert_ok(result)
    turns = re.findall(r"prompt: (\d+) tokens, (\d+) processed, (\d+) reused", result.stderr)
    assert [int(t[2]) for t in turns] == [0, 0]  # a fresh cache after /reset
    assert "unknown command '/bogus'" in result.stderr
    half = len(result.stdout) // 2
    assert result.stdout[:half] == result.stdout[half:]  # the same reply to the same fresh conversation


def test_chat_bad_input(pair, tmp_path):
    assert_one_line_error(run_cli("chat", "--model", pair, "--temp", "-1", input=""), "--temp")
    assert_one_line_error(run_cli("chat", "--model", tmp_path / "nope", input=""), "neither a folder")
