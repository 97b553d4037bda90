"""The MTP engine against the transformers reference: drafts, greedy exactness, syncs, stopping."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator

import mlx_gemma_mtp.runtime.pair as decode
import mlx_gemma_mtp.runtime.engine as engine
import reference_models as ref
from mlx_gemma_mtp import load, stream_generate
from mlx_gemma_mtp.bench.run import InjectedAcceptance
from mlx_gemma_mtp.runtime.pair import Stats
from mlx_gemma_mtp.runtime.engine import generate_tokens

VARIANTS = ref.VARIANTS
DRAFT_LENGTHS = (1, 2, 4, 6)


@pytest.fixture(scope="session")
def hf_models(reference_pair):
    cache = {}

    def make(variant):
        if variant not in cache:
            target, draft = reference_pair(variant)
            cache[variant] = (ref.load_reference_target(target), ref.load_reference_drafter(draft))
        return cache[variant]

    return make


def window_of(pair):
    return pair.view.args.sliding_window


def prompt_ids(window, long, seed=0):
    rng = np.random.default_rng(seed)
    n = window + 9 if long else window // 2
    return [2] + rng.integers(110, 512, size=n).tolist()


def run(pair, prompt, max_tokens, k, eos=(), stats=None, draft_filter=None):
    return [t for t, _ in generate_tokens(pair, list(prompt), max_tokens, k, eos, stats, draft_filter=draft_filter)]


def plain_pair(pair):
    return decode.Pair(pair.target)


def injection(continuation, prompt_len, accept_rate, seed=0, vocab=512):
    """A draft filter replacing the drafter's proposals by the target's own continuation, except
    where a seeded draw rejects, so rounds accept 0..K drafts (the real drafter still runs)."""
    return InjectedAcceptance(list(continuation), prompt_len, [accept_rate], vocab, seed)


# --- drafter parity --------------------------------------------------------------------------


def reference_drafts(hf_target, hf_drafter, prefix, bonus, k):
    """The reference generator's drafts after `prefix`, with `bonus` the target's next token.

    The target state is computed fresh from the accepted prefix, so the drafter sees exactly the
    accepted tokens (see the closing note on transformers' assisted loop, which after a rejection
    also hands the drafter the rejected tokens' K/V)."""
    with torch.no_grad():
        out = hf_target(
            input_ids=torch.tensor([prefix]), output_hidden_states=True, return_shared_kv_states=True, use_cache=False
        )
        hf_drafter.generation_config.num_assistant_tokens = k
        gen = SinglePositionMultiTokenCandidateGenerator(
            hf_drafter, hf_target.get_input_embeddings(), hf_target.generation_config
        )
        gen.main_model_max_length = 10**6
        ids, _ = gen.get_candidates(
            torch.tensor([prefix + [bonus]]), {}, out, is_first_iteration=False, n_last_matches=0
        )
    return ids[0, len(prefix) + 1 :].tolist()


@pytest.mark.parametrize("k", DRAFT_LENGTHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_drafts_match_reference_generator(variant, k, loaded, hf_models):
    pair, _ = loaded(variant)
    hf_target, hf_drafter = hf_models(variant)
    prompt = prompt_ids(window_of(pair), long=True)
    stats = Stats()
    tokens = run(pair, prompt, 8 + k, k, stats=stats)

    # Replay the rounds: each starts after the tokens emitted so far, from the last one.
    sequence, emitted = list(prompt), [tokens[0]]
    position = 1
    for drafts, accepted in stats.round_log:
        expected = reference_drafts(hf_target, hf_drafter, sequence + emitted[:-1], emitted[-1], len(drafts))
        assert drafts == expected
        step = tokens[position : position + accepted + 1]
        emitted += step
        position += len(step)
    assert len(stats.round_log) >= 3


# --- greedy exactness ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def hf_greedy(hf_models):
    cache = {}

    def make(variant, prompt, n):
        key = (variant, tuple(prompt), n)
        if key not in cache:
            target, _ = hf_models(variant)
            with torch.no_grad():  # greedy through the reference's own (sliding) cache, past any EOS
                out = target(input_ids=torch.tensor([prompt]), use_cache=True)
                tokens = [int(out.logits[0, -1].argmax())]
                for _ in range(n - 1):
                    out = target(
                        input_ids=torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True
                    )
                    tokens.append(int(out.logits[0, -1].argmax()))
            cache[key] = tokens
        return cache[key]

    return make


@pytest.mark.parametrize("long", [False, True], ids=["short-prompt", "long-prompt"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_mtp_equals_plain_and_reference(variant, long, loaded, hf_greedy):
    pair, _ = loaded(variant)
    window = window_of(pair)
    prompt = prompt_ids(window, long)
    n = 4 * window + 3
    plain = run(plain_pair(pair), prompt, n, 0)
    assert plain == hf_greedy(variant, prompt, n)

    for k in DRAFT_LENGTHS:
        assert run(pair, prompt, n, k) == plain  # the real drafter (random weights: rejections)
    for k in DRAFT_LENGTHS:
        stats = Stats()
        assert run(pair, prompt, n, k, stats=stats, draft_filter=injection(plain, len(prompt), 0.85, seed=k)) == plain
        accepted = [a for _, a in stats.round_log]
        assert 0 in accepted and max(accepted) == k and stats.rounds < n  # rollbacks of every size happened


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_exact_after_4_bit_conversion(variant, loaded):
    pair, _ = loaded(variant, bits=4)
    window = window_of(pair)
    prompt = prompt_ids(window, long=True, seed=1)
    n = 4 * window
    plain = run(plain_pair(pair), prompt, n, 0)
    for k in DRAFT_LENGTHS:
        assert run(pair, prompt, n, k) == plain
        assert run(pair, prompt, n, k, draft_filter=injection(plain, len(prompt), 0.8, seed=k)) == plain


# --- stopping --------------------------------------------------------------------------------


def test_stops_exactly_at_max_tokens_and_eos_inside_accepted_blocks(loaded):
    pair, _ = loaded("31b")
    prompt = prompt_ids(window_of(pair), long=False)
    plain = run(plain_pair(pair), prompt, 40, 0)
    for max_tokens in range(0, 14):
        assert run(pair, prompt, max_tokens, 4, draft_filter=injection(plain, len(prompt), 1.0)) == plain[:max_tokens]
    for j in range(1, 12):
        eos = plain[j]
        first = plain.index(eos)
        stats = Stats()
        inject = injection(plain, len(prompt), 1.0)
        assert run(pair, prompt, 40, 4, eos=[eos], stats=stats, draft_filter=inject) == plain[: first + 1]
        assert stats.generated_tokens == first + 1


# --- one host synchronization per round -------------------------------------------------------


class CountingMx:
    """Stands in for the engine's `mx` and counts evaluations."""

    def __init__(self):
        self.evals = self.async_evals = 0

    def __getattr__(self, name):
        return getattr(mx, name)

    def eval(self, *args):
        self.evals += 1
        return mx.eval(*args)

    def async_eval(self, *args):
        self.async_evals += 1
        return mx.async_eval(*args)


@pytest.mark.parametrize("k", [0, 3])
def test_one_host_sync_per_round(k, loaded, monkeypatch):
    pair, _ = loaded("e2b")
    prompt = prompt_ids(window_of(pair), long=True)
    plain = run(plain_pair(pair), prompt, 30, 0)
    counter = CountingMx()
    monkeypatch.setattr(engine, "mx", counter)
    stats = Stats()
    inject = injection(plain, len(prompt), 0.7)
    assert run(pair if k else plain_pair(pair), prompt, 30, k, stats=stats, draft_filter=inject) == plain
    # one eval for the prompt (short prompts need no intermediate prefill evals), then one per round
    assert counter.evals == 1 + stats.rounds
    assert stats.rounds > 5


# --- the public API --------------------------------------------------------------------------


def test_stream_generate_api(loaded, pair_dir, reference_pair, monkeypatch):
    pair, tokenizer = loaded("e4b")
    prompt = prompt_ids(window_of(pair), long=True)
    plain = run(plain_pair(pair), prompt, 24, 0)
    inject = injection(plain, len(prompt), 0.8)
    responses = list(stream_generate(pair, tokenizer, prompt, max_tokens=24, num_draft_tokens=4, draft_filter=inject))
    assert [r.token for r in responses] == plain
    assert any(r.from_draft for r in responses) and not responses[0].from_draft
    last = responses[-1]
    assert last.finish_reason == "length" and all(r.stats is None for r in responses[:-1])
    stats = last.stats
    assert stats.generated_tokens == 24
    assert stats.rounds == len(stats.round_log)
    assert sum(a for _, a in stats.round_log) + stats.rounds + 1 == 24
    assert stats.accepted_per_position[0] == sum(a >= 1 for _, a in stats.round_log)
    assert stats.tokens_per_second > 0
    # the text is what the generated tokens add to the prompt's decode (the first keeps its space)
    whole, before = tokenizer.decode(prompt + plain), tokenizer.decode(prompt)
    assert "".join(r.text for r in responses) == whole[len(before):]

    # a pair folder, a target with an explicit drafter, and a target alone all load
    target, draft = reference_pair("e4b")
    for p, _ in (load(str(target), draft_path=str(draft)), load(str(pair_dir("e4b") / "target"))):
        assert run(decode.Pair(p.target), prompt, 10, 0) == plain[:10]


def test_string_prompt_and_plain_path(loaded):
    pair, tokenizer = loaded("12b")
    text = "".join(r.text for r in stream_generate(pair, tokenizer, "def f(x):", max_tokens=12, num_draft_tokens=0))
    again = "".join(r.text for r in stream_generate(pair, tokenizer, "def f(x):", max_tokens=12, num_draft_tokens=3))
    assert text == again and len(text) > 0


# --- prompt cache reuse ------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 3])
def test_prompt_cache_reuses_the_conversation(loaded, k):
    pair, _ = loaded("e4b")
    window = window_of(pair)
    first = prompt_ids(window, long=True, seed=3)  # past the sliding window already
    cache = decode.make_prompt_cache(pair)
    reply = run_cached(pair, first, 2 * window, k, cache)
    assert cache.tokens == first + reply[:-1]

    follow_up = first + reply + [120, 121, 122]
    stats = Stats()
    assert run_cached(pair, follow_up, 20, k, cache, stats) == run(pair, follow_up, 20, k)
    assert stats.reused_prompt_tokens == len(first) + len(reply) - 1
    assert stats.prompt_tokens == 4

    # a conversation that shares only its first tokens: the cache cannot roll back that far, so it
    # starts over, and the text is still exactly what a fresh cache gives
    other = first[:5] + [130, 131, 132]
    stats = Stats()
    assert run_cached(pair, other, 20, k, cache, stats) == run(pair, other, 20, k)
    assert stats.reused_prompt_tokens in (0, 5)


def run_cached(pair, prompt, max_tokens, k, cache, stats=None):
    return [t for t, _ in generate_tokens(pair, prompt, max_tokens, k, (), stats, prompt_cache=cache)]


class RecordingPolicy:
    """Draft K from a script; records every choose() call."""

    def __init__(self, script):
        self.script, self.asked, self.observed = list(script), 0, []

    def choose(self, max_k):
        self.asked += 1
        return min(self.script.pop(0) if self.script else 0, max_k)

    def observe(self, k, accepted, seconds):
        self.observed.append(k)


def test_policy_is_asked_once_per_round_and_its_k_is_used(loaded):
    pair, _ = loaded("31b")
    prompt = prompt_ids(window_of(pair), long=False)
    plain = run(plain_pair(pair), prompt, 40, 0)
    script = [0, 0, 3, 0, 0, 0, 1, 0, 2, 2, 0]  # probes in the middle of plain stretches
    policy = RecordingPolicy(script)
    stats = Stats()
    assert run(pair, prompt, 40, policy, stats=stats, draft_filter=injection(plain, len(prompt), 0.5)) == plain
    assert policy.observed[: len(script)] == script  # every chosen K ran, in order
    # asked once per round (rounds are queued before the previous one is read, so once more for
    # the round queued when the last was read, whose tokens are discarded)
    assert stats.rounds <= policy.asked <= stats.rounds + 1 and len(policy.observed) == stats.rounds
