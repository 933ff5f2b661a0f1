"""Sampler: each parameter's effect, seeded reproducibility, and validation of bad values."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from daemon.errors import InvalidInput
from engines.llm.sampling import Sampler, SamplingParams

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("one_torch_thread")]


@dataclass
class Row:
    params: SamplingParams
    token_ids: list[int]
    num_prompt: int
    generator: torch.Generator | None = None
    stop_ids: frozenset[int] = frozenset()


def row(prompt=(0,), output=(), seed=None, **kw) -> Row:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return Row(SamplingParams(seed=seed, **kw), list(prompt) + list(output), len(prompt), gen)


def logits_from_probs(probs: list[float], batch: int = 1) -> torch.Tensor:
    return torch.tensor(probs).log().expand(batch, -1).clone()   # [B, V]


def draws(probs: list[float], n: int = 2000, **kw) -> list[int]:
    """`n` independent draws: a batch of n identical rows."""
    sampler = Sampler(seed=1234)
    return sampler(logits_from_probs(probs, n), [row(**kw) for _ in range(n)]).token_ids


PROBS = [0.5, 0.3, 0.15, 0.05]


# -- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("param, value", [
    ("max_tokens", 0), ("max_tokens", 1.5), ("max_tokens", True),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", "1"), ("temperature", 1000.0),
    ("top_k", -2), ("top_k", 2.0),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5), ("top_p", float("nan")),
    ("min_p", -0.01), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5), ("presence_penalty", -2.1),
    ("frequency_penalty", 3.0), ("frequency_penalty", float("inf")),
    ("stop_token_ids", [1, -1]), ("stop_token_ids", [1.5]), ("stop_token_ids", "12"),
    ("stop_token_ids", [128]),
    ("ignore_eos", 1), ("logprobs", "yes"),
    ("min_tokens", -1), ("min_tokens", 17), ("min_tokens", 1.0), ("min_tokens", True),
    ("min_tokens", "2"),
    ("seed", 1.5), ("seed", -1), ("seed", "7"), ("seed", 2**64),
])
def test_bad_values_are_rejected_with_the_parameter_named(param, value):
    params = SamplingParams(**{param: value})
    with pytest.raises(InvalidInput) as err:
        params.validate(vocab_size=128)
    assert err.value.param == param
    assert param in err.value.message and err.value.status == 400


def test_defaults_and_edge_values_are_valid():
    SamplingParams().validate(vocab_size=128)
    SamplingParams(max_tokens=1, temperature=0.0, top_k=0, top_p=1.0, min_p=1.0,
                   repetition_penalty=0.5, presence_penalty=-2, frequency_penalty=2,
                   stop_token_ids=[0, 127], seed=0, logprobs=True).validate(vocab_size=128)
    SamplingParams(top_k=-1, seed=2**63 - 1).validate()


# -- greedy, temperature, truncation ---------------------------------------------------------

def test_greedy_takes_the_argmax_and_top_k_1_equals_greedy():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    argmax = logits.argmax(-1).tolist()
    sampler = Sampler(seed=0)
    assert sampler(logits.clone(), [row(temperature=0.0) for _ in range(8)]).token_ids == argmax
    assert sampler(logits.clone(), [row(top_k=1) for _ in range(8)]).token_ids == argmax
    assert sampler(logits.clone(), [row(top_p=1e-6) for _ in range(8)]).token_ids == argmax


def test_sampling_follows_the_distribution():
    counts = [0] * 4
    for t in draws(PROBS, 8000):
        counts[t] += 1
    for c, p in zip(counts, PROBS):
        assert abs(c / 8000 - p) < 0.025


def test_zero_probability_tokens_are_never_drawn():
    assert set(draws([0.5, 0.0, 0.5, 0.0])) == {0, 2}


def test_temperature_sharpens_and_flattens():
    for t in (0.3, 1.0, 3.0):
        tempered = [p ** (1 / t) for p in PROBS]
        expected = tempered[0] / sum(tempered)                # 0.83, 0.5, 0.34
        assert draws(PROBS, temperature=t).count(0) / 2000 == pytest.approx(expected, abs=0.04)


@pytest.mark.parametrize("k, allowed", [(1, {0}), (2, {0, 1}), (3, {0, 1, 2}), (-1, {0, 1, 2, 3}),
                                        (0, {0, 1, 2, 3}), (10, {0, 1, 2, 3})])
def test_top_k_keeps_the_k_most_likely(k, allowed):
    assert set(draws(PROBS, top_k=k)) == allowed


@pytest.mark.parametrize("p, allowed", [(0.4, {0}), (0.7, {0, 1}), (0.85, {0, 1, 2}),
                                        (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_nucleus(p, allowed):
    assert set(draws(PROBS, top_p=p)) == allowed


@pytest.mark.parametrize("vocab, top_p", [(2000, 0.05), (2000, 0.5), (5000, 0.99)])
def test_top_p_matches_a_full_sort_when_the_nucleus_is_wide(vocab, top_p):
    # Flat logits: the nucleus spans tens, hundreds or thousands of tokens. Top-p 0.05 accepts
    # so few draws that the sort fallback decides; the others go through rejection.
    logits = torch.linspace(0.0, -3.0, vocab)
    probs = torch.softmax(logits, -1)
    size = int(((probs.cumsum(-1) - probs) <= top_p).sum())
    n = 1000
    out = Sampler(seed=7)(logits.expand(n, -1).clone(), [row(top_p=top_p)] * n).token_ids
    assert max(out) < size                                  # nothing outside the nucleus
    assert max(out) > size - size // 10 - 5                 # and its tail is reachable


@pytest.mark.parametrize("m, allowed", [(0.0, {0, 1, 2, 3}), (0.2, {0, 1, 2}), (0.5, {0, 1}),
                                        (0.7, {0})])
def test_min_p_drops_tokens_below_a_share_of_the_top_one(m, allowed):
    assert set(draws(PROBS, min_p=m)) == allowed


def test_filters_apply_per_row_in_one_batch():
    sampler = Sampler(seed=3)
    rows = [row(top_k=1), row(), row(min_p=0.5), row(top_p=0.7)] * 500
    out = sampler(logits_from_probs(PROBS, len(rows)), rows).token_ids
    assert set(out[0::4]) == {0}
    assert set(out[1::4]) == {0, 1, 2, 3}
    assert set(out[2::4]) == {0, 1}
    assert set(out[3::4]) == {0, 1}


# -- penalties -------------------------------------------------------------------------------

def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, 1.5, -1.0, -1.2]])
    sampler = Sampler(seed=0)
    assert sampler(logits.clone(), [row(prompt=[0], temperature=0.0)]).token_ids == [0]
    # 2.0 / 2 = 1.0 < 1.5: the seen token loses its lead.
    out = sampler(logits.clone(), [row(prompt=[0], temperature=0.0, repetition_penalty=2.0,
                                       logprobs=True)])
    assert out.token_ids == [1]
    expected = torch.log_softmax(torch.tensor([1.0, 1.5, -1.0, -1.2]), -1)[1].item()
    assert out.logprobs[0] == pytest.approx(expected, abs=1e-6)
    # A negative logit is pushed down: -1.0 * 2 = -2.0 falls below -1.2.
    logits = torch.tensor([[-1.0, -1.2]])
    assert sampler(logits.clone(), [row(prompt=[0], temperature=0.0,
                                        repetition_penalty=2.0)]).token_ids == [1]
    # Generated tokens count too.
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    assert sampler(logits.clone(), [row(prompt=[2], output=[0], temperature=0.0,
                                        repetition_penalty=2.0)]).token_ids == [1]


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    logits = torch.tensor([[1.0, 0.8, 0.0]])
    s = Sampler(seed=0)
    greedy = dict(temperature=0.0, logprobs=True)
    # In the prompt only: no effect.
    assert s(logits.clone(), [row(prompt=[0], presence_penalty=1.0, **greedy)]).token_ids == [0]
    out = s(logits.clone(), [row(prompt=[2], output=[0], presence_penalty=0.5, **greedy)])
    assert out.token_ids == [1]
    assert out.logprobs[0] == pytest.approx(
        torch.log_softmax(torch.tensor([0.5, 0.8, 0.0]), -1)[1].item(), abs=1e-6)
    # Frequency scales with the count: 1.0 - 2 * 0.15 = 0.7 < 0.8, but 1 * 0.15 is not enough.
    assert s(logits.clone(), [row(output=[0], frequency_penalty=0.15, **greedy)]).token_ids == [0]
    assert s(logits.clone(), [row(output=[0, 0], frequency_penalty=0.15,
                                  **greedy)]).token_ids == [1]
    # A negative penalty encourages repetition.
    assert s(logits.clone(), [row(output=[2], presence_penalty=-1.5, **greedy)]).token_ids == [2]


def test_penalties_only_touch_their_own_row():
    logits = torch.tensor([[2.0, 1.5], [2.0, 1.5]])
    rows = [row(prompt=[0], temperature=0.0, repetition_penalty=2.0),
            row(prompt=[0], temperature=0.0)]
    assert Sampler(seed=0)(logits, rows).token_ids == [1, 0]


# -- seeds and logprobs ----------------------------------------------------------------------

def test_seeded_rows_repeat_alone_or_in_any_batch():
    V = 64
    gen = torch.Generator().manual_seed(5)
    steps = [torch.randn(1, V, generator=gen) for _ in range(10)]
    noise = [torch.randn(6, V, generator=gen) for _ in range(10)]

    def run(batched: bool, position: int) -> list[int]:
        target = row(seed=42, top_p=0.9)
        others = [row(seed=i) for i in range(3)] + [row(), row(temperature=0.0)]
        sampler = Sampler()                                  # unseeded engine generator
        out = []
        for logits, extra in zip(steps, noise):
            if not batched:
                out += sampler(logits.clone(), [target]).token_ids
                continue
            rows = others[:position] + [target] + others[position:]
            batch = torch.cat([extra[:position], logits, extra[position:5]])
            out.append(sampler(batch, rows).token_ids[position])
        return out

    alone = run(False, 0)
    assert run(True, 0) == alone
    assert run(True, 3) == alone
    assert len(set(alone)) > 3                                # it does sample, not argmax


def test_same_seed_repeats_and_different_seeds_differ():
    logits = torch.zeros(1, 1000)

    def five(seed: int) -> list[int]:
        r, sampler = row(seed=seed), Sampler()
        return [sampler(logits.clone(), [r]).token_ids[0] for _ in range(5)]

    assert five(1) == five(1)
    assert five(1) != five(2)


def test_logprobs_are_of_the_tempered_distribution_and_only_when_asked():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    sampler = Sampler(seed=0)
    assert sampler(logits.clone(), [row()]).logprobs is None
    out = sampler(logits.clone(), [row(temperature=0.5, top_k=2, logprobs=True)])
    tok = out.token_ids[0]
    assert tok in (1, 2)
    expected = torch.log_softmax(logits[0] / 0.5, -1)[tok].item()
    assert out.logprobs[0] == pytest.approx(expected, abs=1e-5)
    greedy = sampler(logits.clone(), [row(temperature=0.0, logprobs=True)])
    assert greedy.token_ids == [2]
    assert greedy.logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1)[2].item())
    assert all(lp <= 0 and math.isfinite(lp) for lp in out.logprobs + greedy.logprobs)


def test_top_logprobs_are_the_k_likeliest_best_first_per_row():
    sampler = Sampler(seed=3)
    logits = logits_from_probs(PROBS, 3)
    rows = [row(temperature=0.0, logprobs=True, top_logprobs=3),
            row(temperature=1.0, logprobs=True, top_logprobs=1),
            row(temperature=0.0, logprobs=True)]
    out = sampler(logits, rows)
    assert [len(t) for t in out.top] == [3, 1, 0]
    assert [t for t, _ in out.top[0]] == [0, 1, 2]
    for (t, lp), p in zip(out.top[0], PROBS):
        assert lp == pytest.approx(math.log(p), abs=1e-5)
    assert out.top[1][0][0] == 0 and out.token_ids[0] == 0
    assert out.logprobs[0] == pytest.approx(out.top[0][0][1])
    # none asked: no top lists at all, greedy and sampled
    assert sampler(logits_from_probs(PROBS, 2),
                   [row(temperature=0.0, logprobs=True), row(logprobs=True)]).top is None


def test_top_logprobs_out_of_range_are_refused():
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(InvalidInput) as err:
            SamplingParams(top_logprobs=bad).validate()
        assert err.value.param == "top_logprobs"


# -- min_tokens --------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_holds_the_stop_tokens_back_until_that_many_are_out(temperature):
    """Token 0 (eos here) and 1 (a stop id) are the likeliest; a row short of min_tokens draws
    neither, whatever its company, and takes them as soon as it has its floor."""
    sampler = Sampler(seed=7)
    probs = [0.6, 0.3, 0.06, 0.04]
    stops = frozenset({0, 1})
    rows = [Row(SamplingParams(max_tokens=8, min_tokens=3, temperature=temperature), [5] + out,
                1, None, stops) for out in ([], [2], [2, 3], [2, 3, 2])]
    rows.append(Row(SamplingParams(max_tokens=8, temperature=0.0), [5], 1, None, stops))
    picks = [sampler(logits_from_probs(probs, len(rows)), rows).token_ids for _ in range(50)]
    for ids in picks:
        assert ids[0] not in stops and ids[1] not in stops and ids[2] not in stops
    assert any(ids[3] in stops for ids in picks)             # at its floor: free to end
    assert all(ids[4] == 0 for ids in picks)                  # no floor: greedy eos
    if temperature == 0.0:
        assert all(ids[:3] == [2, 2, 2] for ids in picks)      # the best token left, greedily
