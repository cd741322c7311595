"""Evaluation statistics: win/tie/loss with an interval, a mean with an interval, Monte-Carlo sequence KL,
distinct-n. Imports torch and the standard library only.

Every interval is two-sided at `confidence` (default 0.95) with z = NormalDist().inv_cdf((1 + confidence) / 2)
(1.959964 at 0.95); results are plain Python numbers, ready for eval.json.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from statistics import NormalDist
from typing import NamedTuple

import torch


class WinRateOutput(NamedTuple):
    win_rate: float  # (wins + ties / 2) / n
    low: float  # Wilson score interval of win_rate, n trials
    high: float
    wins: int
    ties: int
    losses: int
    n: int
    tie_rate: float  # ties / n
    loss_rate: float  # losses / n


class MeanOutput(NamedTuple):
    mean: float
    stderr: float  # sample std (n - 1) / sqrt(n); nan when n < 2
    low: float  # mean -/+ z * stderr
    high: float
    n: int


class KLOutput(NamedTuple):
    kl: float  # nats per sequence: mean over samples of sum_t (logp_policy - logp_ref)
    stderr: float
    low: float
    high: float
    n: int


class TextStatsOutput(NamedTuple):
    distinct_1: float  # unique unigrams / all unigrams, over the whole list
    distinct_2: float  # unique bigrams / all bigrams
    mean_length: float  # items per sequence
    eos_rate: float | None  # share of sequences that ended with EOS; None when not given
    n: int


def z_value(confidence: float = 0.95) -> float:
    """Two-sided standard normal quantile: 0.95 -> 1.959964."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf((1 + confidence) / 2)


def wilson_interval(p: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (Wilson 1927) of a proportion p observed over n trials:

    (p + z^2/2n -/+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n). Unlike p -/+ z sqrt(p(1-p)/n) it stays
    inside [0, 1] and does not collapse to a point at p = 0 or 1 (a policy winning 20 of 20 still gets a
    lower bound of 0.84). n = 0 -> (0, 1).
    """
    if n <= 0:
        return 0.0, 1.0
    z2 = z_value(confidence) ** 2
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = math.sqrt(z2) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, center - half), min(1.0, center + half)


def win_tie_loss(
    policy_scores: torch.Tensor, baseline_scores: torch.Tensor, tie_tolerance: float = 0.0,
    confidence: float = 0.95,
) -> WinRateOutput:
    """Win / tie / loss of policy vs baseline from judge scores of paired responses: (b,), (b,).

    Row i is a tie when |policy_i - baseline_i| <= tie_tolerance, else a win or a loss by the sign.
    win_rate = (wins + ties / 2) / n, the convention of AlpacaEval and of pairwise human evaluations (a
    tie is half a win), so 0.5 means "no better, no worse" whatever the tie rate. Its interval is the
    Wilson score interval with n trials: each row's outcome x in {0, 1/2, 1} has mean p and variance
    E[x^2] - p^2 <= E[x] - p^2 = p(1 - p) (x^2 <= x), so the Bernoulli variance the Wilson interval
    assumes is an upper bound: with ties the interval is conservative (wider than needed), without ties it is
    the plain Wilson interval of the win proportion. The true variance is p(1 - p) - tie_rate / 4, so with
    many ties (a judge with discrete scores, such as the oracle) the interval is up to
    sqrt(p(1 - p) / (p(1 - p) - tie_rate / 4)) times wider than needed (1.6x at p = 0.7 with half the pairs
    tied): it errs towards missing a real difference, not towards claiming one. The alternative, Wilson on
    wins / (wins + losses), drops the ties and answers another question (who wins when someone wins).
    """
    if policy_scores.shape != baseline_scores.shape or policy_scores.dim() != 1:
        raise ValueError(f"need two (b,) score tensors, got {tuple(policy_scores.shape)} and "
                         f"{tuple(baseline_scores.shape)}")
    if tie_tolerance < 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
    diff = policy_scores.double() - baseline_scores.double()  # (b,)
    tie = diff.abs() <= tie_tolerance
    wins, ties = int(((diff > 0) & ~tie).sum()), int(tie.sum())
    n = diff.numel()
    losses = n - wins - ties
    if n == 0:
        return WinRateOutput(math.nan, 0.0, 1.0, 0, 0, 0, 0, math.nan, math.nan)
    rate = (wins + ties / 2) / n
    low, high = wilson_interval(rate, n, confidence)
    return WinRateOutput(rate, low, high, wins, ties, losses, n, ties / n, losses / n)


def mean_interval(values: torch.Tensor, confidence: float = 0.95) -> MeanOutput:
    """Mean of (n,) values with a normal-approximation interval: mean -/+ z * s / sqrt(n), s the sample
    standard deviation (n - 1 in the denominator).

    Normal rather than Student t: evaluations average hundreds of prompts, where t and z differ by < 1%
    (t_0.975 is 1.98 at n = 100), and the standard library has no t quantile. With n < 30 the interval is
    somewhat too narrow; with n < 2 stderr and the bounds are nan.
    """
    x = values.double().flatten()
    n = x.numel()
    if n == 0:
        return MeanOutput(math.nan, math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    stderr = float(x.std(correction=1)) / math.sqrt(n) if n > 1 else math.nan
    half = z_value(confidence) * stderr
    return MeanOutput(mean, stderr, mean - half, mean + half, n)


def sequence_kl(
    policy_logps: torch.Tensor, reference_logps: torch.Tensor, mask: torch.Tensor | None = None,
    confidence: float = 0.95,
) -> KLOutput:
    """KL(policy || reference) in nats per sequence, Monte-Carlo from the policy's own samples.

    policy_logps, reference_logps: (b, t) log-probs of each sampled response token under the two models;
    mask: (b, t) true on response tokens (default: all). Per sample, k1 = sum_t (logp_policy - logp_ref) =
    log pi(y|x) - log ref(y|x); its mean over y ~ pi is exactly KL(pi(.|x) || ref(.|x)), so the mean over
    samples is an unbiased estimate of the expected sequence KL (Schulman, "Approximating KL divergence",
    2020: k1). A single sample can be negative; the mean cannot be, in expectation. The interval is
    `mean_interval` of the per-sample values. Samples from another distribution (e.g. the baseline's) give
    a biased number, and so do samples drawn with a different temperature or top-p than the log-probs.
    """
    if policy_logps.shape != reference_logps.shape or policy_logps.dim() != 2:
        raise ValueError(f"need two (b, t) log-prob tensors, got {tuple(policy_logps.shape)} and "
                         f"{tuple(reference_logps.shape)}")
    diff = policy_logps.double() - reference_logps.double()  # (b, t)
    if mask is not None:
        diff = torch.where(mask.bool(), diff, torch.zeros_like(diff))  # where: -inf in padding stays out
    per_sample = diff.sum(-1)  # (b,)
    out = mean_interval(per_sample, confidence)
    return KLOutput(out.mean, out.stderr, out.low, out.high, out.n)


def distinct_n(sequences: Sequence[Sequence[Hashable]], n: int) -> float:
    """Distinct-n (Li et al. 2016, arXiv 1510.03055): unique n-grams / all n-grams, pooled over every
    sequence (corpus level, so a policy that repeats one answer for every prompt scores low). Items are
    tokens or words; a sequence shorter than n adds none. No n-grams at all -> 0."""
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def text_stats(
    sequences: Sequence[Sequence[Hashable]], ended_with_eos: Sequence[bool] | None = None
) -> TextStatsOutput:
    """distinct-1, distinct-2, mean length (items per sequence) and EOS rate of a list of sequences.

    ended_with_eos: per sequence, whether sampling stopped at EOS (not at the length limit or a stop
    string); None -> eos_rate None.
    """
    n = len(sequences)
    if ended_with_eos is not None and len(ended_with_eos) != n:
        raise ValueError(f"{len(ended_with_eos)} EOS flags for {n} sequences")
    eos_rate = None if ended_with_eos is None or n == 0 else sum(map(bool, ended_with_eos)) / n
    mean_length = sum(len(s) for s in sequences) / n if n else 0.0
    return TextStatsOutput(distinct_n(sequences, 1), distinct_n(sequences, 2), mean_length, eos_rate, n)
