"""core/losses/eval.py against hand-computed values; the KL estimate against the exact KL of a toy policy."""

import itertools
import math

import pytest
import torch

from core.losses.eval import (
    distinct_n,
    mean_interval,
    sequence_kl,
    text_stats,
    wilson_interval,
    win_tie_loss,
    z_value,
)

Z = 1.959963984540054  # NormalDist().inv_cdf(0.975)


def test_z_value():
    assert z_value(0.95) == pytest.approx(Z, abs=1e-12)
    with pytest.raises(ValueError):
        z_value(1.0)


def test_win_tie_loss_counts_rates_and_wilson_interval():
    policy = torch.tensor([0.9, 0.5, 0.7, 0.2, 1.0])
    baseline = torch.tensor([0.1, 0.5, 0.3, 0.6, 0.4])
    out = win_tie_loss(policy, baseline)
    # rows: win, tie, win, loss, win
    assert (out.wins, out.ties, out.losses, out.n) == (3, 1, 1, 5)
    assert out.win_rate == pytest.approx((3 + 1 / 2) / 5)  # 0.7: a tie is half a win
    assert out.tie_rate == pytest.approx(0.2) and out.loss_rate == pytest.approx(0.2)
    # Wilson, p = 0.7, n = 5, z^2 = 3.8414588:
    #   center = (0.7 + 3.8414588 / 10) / (1 + 3.8414588 / 5) = 1.0841459 / 1.7682918 = 0.6131035
    #   half = 1.959964 * sqrt(0.7 * 0.3 / 5 + 3.8414588 / 100) / 1.7682918
    #        = 1.959964 * sqrt(0.042 + 0.0384146) / 1.7682918 = 1.959964 * 0.2835747 / 1.7682918 = 0.3143125
    assert out.low == pytest.approx(0.6131035 - 0.3143125, abs=1e-6)  # 0.2987911
    assert out.high == pytest.approx(0.6131035 + 0.3143125, abs=1e-6)  # 0.9274160


def test_wilson_interval_at_the_edges():
    # 20 wins of 20: center = (1 + 3.8414588/40) / (1 + 3.8414588/20) = 1.0960365 / 1.1920729 = 0.9194374
    # half = 1.959964 * sqrt(0 + 3.8414588/1600) / 1.1920729 = 1.959964 * 0.0489991 / 1.1920729 = 0.0805626
    low, high = wilson_interval(1.0, 20)
    assert low == pytest.approx(0.9194374 - 0.0805626, abs=1e-6) and high == pytest.approx(1.0)
    assert wilson_interval(0.5, 0) == (0.0, 1.0)
    out = win_tie_loss(torch.ones(20), torch.zeros(20))
    assert (out.win_rate, out.wins, out.low) == (1.0, 20, pytest.approx(0.8388748, abs=1e-6))


def test_tie_tolerance():
    policy, baseline = torch.tensor([0.50, 0.52]), torch.tensor([0.51, 0.40])
    exact = win_tie_loss(policy, baseline)  # -0.01 is a loss, +0.12 a win
    assert (exact.wins, exact.ties, exact.losses, exact.win_rate) == (1, 0, 1, 0.5)
    tolerant = win_tie_loss(policy, baseline, tie_tolerance=0.02)  # |-0.01| <= 0.02: a tie
    assert (tolerant.wins, tolerant.ties, tolerant.losses) == (1, 1, 0)
    assert tolerant.win_rate == pytest.approx((1 + 0.5) / 2)
    with pytest.raises(ValueError):
        win_tie_loss(torch.zeros(2), torch.zeros(3))


def test_mean_interval():
    out = mean_interval(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    # mean 2.5; s^2 = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; stderr = sqrt(5/3) / sqrt(4) = 1.2909944 / 2
    assert out.mean == 2.5 and out.n == 4
    assert out.stderr == pytest.approx(0.6454972, abs=1e-6)
    assert out.low == pytest.approx(2.5 - Z * 0.6454972, abs=1e-6)  # 1.2348569
    assert out.high == pytest.approx(2.5 + Z * 0.6454972, abs=1e-6)  # 3.7651431
    one = mean_interval(torch.tensor([3.0]))
    assert one.mean == 3.0 and math.isnan(one.stderr)


def test_sequence_kl_sums_masked_tokens():
    policy = torch.tensor([[-1.0, -2.0, -5.0], [-0.5, -0.5, 0.0]])
    reference = torch.tensor([[-1.5, -1.0, -float("inf")], [-1.0, -0.25, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = sequence_kl(policy, reference, mask)
    # row 0: (-1 + 1.5) + (-2 + 1) = -0.5 (the masked -inf stays out); row 1: 0.5 - 0.25 + 0 = 0.25
    # mean -0.125; two values: s = |0.25 - (-0.5)| / sqrt(2), stderr = s / sqrt(2) = 0.75 / 2 = 0.375
    assert out.kl == pytest.approx(-0.125) and out.stderr == pytest.approx(0.375) and out.n == 2
    assert out.low == pytest.approx(-0.125 - Z * 0.375)


def _toy(first: list[float], transitions: list[list[list[float]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of an autoregressive model over 3 tokens, length 3: first token (3,), then per position
    t = 1, 2 a (3, 3) table p(x_t | x_{t-1}) (rows: previous token)."""
    return torch.tensor(first).log(), torch.tensor(transitions).log()  # (3,), (2, 3, 3)


def _token_logps(model, seqs: torch.Tensor) -> torch.Tensor:
    """(n, 3) sequences -> (n, 3) per-token log-probs under a toy model."""
    first, trans = model
    cols = [first[seqs[:, 0]]] + [trans[t - 1][seqs[:, t - 1], seqs[:, t]] for t in (1, 2)]
    return torch.stack(cols, dim=1)


def test_sequence_kl_estimate_matches_exact_kl_of_a_toy_policy():
    policy = _toy([0.6, 0.3, 0.1], [[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]],
                                    [[0.5, 0.4, 0.1], [0.2, 0.2, 0.6], [0.1, 0.1, 0.8]]])
    reference = _toy([0.3, 0.4, 0.3], [[[0.4, 0.3, 0.3], [0.3, 0.4, 0.3], [0.3, 0.3, 0.4]],
                                       [[0.3, 0.4, 0.3], [0.3, 0.3, 0.4], [0.4, 0.3, 0.3]]])
    # exact: sum over all 27 sequences of p(x) (log p(x) - log q(x))
    every = torch.tensor(list(itertools.product(range(3), repeat=3)))  # (27, 3)
    logp, logq = _token_logps(policy, every).sum(1), _token_logps(reference, every).sum(1)
    assert logp.exp().sum() == pytest.approx(1.0)
    exact = float((logp.exp() * (logp - logq)).sum())
    assert exact > 0.3  # far enough from 0 that the test can fail

    # 4000 sequences sampled from the policy, token by token
    g, n = torch.Generator().manual_seed(0), 4000
    first, trans = policy
    x0 = torch.multinomial(first.exp().expand(n, 3), 1, generator=g).squeeze(1)
    x1 = torch.multinomial(trans[0].exp()[x0], 1, generator=g).squeeze(1)
    x2 = torch.multinomial(trans[1].exp()[x1], 1, generator=g).squeeze(1)
    samples = torch.stack([x0, x1, x2], dim=1)  # (n, 3)
    out = sequence_kl(_token_logps(policy, samples), _token_logps(reference, samples))
    assert out.n == n and out.stderr < 0.05
    assert abs(out.kl - exact) < 3 * out.stderr, (out.kl, exact, out.stderr)
    # the same samples scored against the policy itself: KL exactly 0
    assert sequence_kl(_token_logps(policy, samples), _token_logps(policy, samples)).kl == 0.0


def test_distinct_n_and_text_stats():
    seqs = [["a", "b", "a"], ["a", "b"]]
    # unigrams a b a a b: 2 unique of 5; bigrams (a,b) (b,a) (a,b): 2 unique of 3
    assert distinct_n(seqs, 1) == pytest.approx(2 / 5)
    assert distinct_n(seqs, 2) == pytest.approx(2 / 3)
    assert distinct_n([["a"]], 2) == 0.0  # no bigram at all
    out = text_stats(seqs, [True, False])
    assert out == (pytest.approx(0.4), pytest.approx(2 / 3), 2.5, 0.5, 2)
    assert text_stats(seqs).eos_rate is None


# ---- K samples per prompt: clustered standard errors ----

def test_clustered_stderr_by_hand():
    from core.losses.eval import clustered_stderr

    # two prompts, two samples each: mean 0.5, cluster sums of deviations +1 and -1, G = 2, n = 4:
    # se^2 = 2 / 1 * (1 + 1) / 16 = 0.25 (= the cluster means' s / sqrt(G): sqrt(0.5) / sqrt(2))
    assert clustered_stderr(torch.tensor([1.0, 1.0, 0.0, 0.0]), ["a", "a", "b", "b"]) == pytest.approx(0.5)
    # no key repeats: the plain s / sqrt(n): deviations -1.5 -0.5 0.5 1.5, 4/3 * 5 / 16 = 0.416667 = (1.290994 / 2)^2
    assert clustered_stderr(torch.tensor([1.0, 2.0, 3.0, 4.0]), "abcd") == pytest.approx(math.sqrt(4 / 3 * 5 / 16))
    assert mean_interval(torch.tensor([1.0, 2.0, 3.0, 4.0]), clusters="abcd").stderr == pytest.approx(
        mean_interval(torch.tensor([1.0, 2.0, 3.0, 4.0])).stderr)
    assert math.isnan(clustered_stderr(torch.tensor([1.0, 2.0]), ["a", "a"]))  # one cluster: no spread to see
    with pytest.raises(ValueError, match="3 cluster keys for 2 values"):
        clustered_stderr(torch.tensor([1.0, 2.0]), "abc")


def test_win_rate_of_k_samples_per_prompt_gets_the_clustered_interval():
    # 10 prompts x 4 samples; each prompt is won (or lost) on all four: 5 prompts won. rate 0.5;
    # cluster sums of outcome deviations +-2, sum of squares 40: se^2 = 10/9 * 40 / 40^2 = 1/36;
    # n_eff = p(1 - p) / se^2 = 0.25 * 36 = 9, kept within [G, n] = [10, 40]: 10, the number of prompts
    policy = torch.tensor([1.0] * 20 + [0.0] * 20)
    clusters = [i // 4 for i in range(40)]
    out = win_tie_loss(policy, torch.full((40,), 0.5), clusters=clusters)
    assert out.win_rate == 0.5 and out.n == 40 and out.n_effective == 10
    assert (out.low, out.high) == pytest.approx(wilson_interval(0.5, 10))  # [0.2366, 0.7634]
    naive = win_tie_loss(policy, torch.full((40,), 0.5))  # Wilson over 40 "independent" rows: too narrow
    assert naive.n_effective == 40 and naive.high - naive.low < (out.high - out.low) / 1.7
    # one sample per prompt: the same Wilson interval as without clusters
    assert win_tie_loss(policy, torch.full((40,), 0.5), clusters=range(40)) == naive
    # samples of a prompt that disagree: 4 prompts x 2 samples, outcomes (1, 0) (1, 0) (1, 1) (0, 0): rate 0.5;
    # cluster sums of deviations 0, 0, +1, -1: se^2 = 4/3 * 2 / 64 = 1/24, n_eff = 0.25 * 24 = 6, within [4, 8]
    mixed = win_tie_loss(torch.tensor([1.0, 0, 1, 0, 1, 1, 0, 0]), torch.full((8,), 0.5), clusters=[0, 0, 1, 1,
                                                                                                    2, 2, 3, 3])
    assert mixed.n_effective == pytest.approx(6.0) and (mixed.low, mixed.high) == pytest.approx(
        wilson_interval(0.5, 6))
    # all won: no spread to measure; the prompts count once each
    assert win_tie_loss(torch.ones(6), torch.zeros(6), clusters=[0, 0, 1, 1, 2, 2]).low == pytest.approx(
        wilson_interval(1.0, 3)[0])
