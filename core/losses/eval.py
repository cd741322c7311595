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
    low: float  # Wilson score interval of win_rate over n_effective trials
    high: float
    wins: int
    ties: int
    losses: int
    n: int
    tie_rate: float  # ties / n
    loss_rate: float  # losses / n
    n_effective: float  # n; fewer with K samples per prompt (clusters): the design-effect-adjusted count


class MeanOutput(NamedTuple):
    mean: float
    stderr: float  # sample std (n - 1) / sqrt(n), or clustered_stderr's; nan when n < 2 (or under 2 clusters)
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


def wilson_interval(p: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
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


def clustered_stderr(values: torch.Tensor, clusters: Sequence[Hashable]) -> float:
    """Standard error of the mean of (n,) values that come in clusters (K samples of one prompt are not
    independent): the cluster-robust (CR1) estimate

        se^2 = G / (G - 1) * sum_g (sum_{i in g} (x_i - mean))^2 / n^2,

    G the number of clusters. With clusters of one value each it is the plain s / sqrt(n) (s with n - 1); with K
    equal values per cluster it is s_g / sqrt(G), s_g over the clusters' means: K correlated samples count as one.
    nan with fewer than 2 clusters."""
    x = values.double().flatten()
    if len(clusters) != x.numel():
        raise ValueError(f"{len(clusters)} cluster keys for {x.numel()} values")
    ids: dict = {}
    group = torch.tensor([ids.setdefault(c, len(ids)) for c in clusters], dtype=torch.long)
    g, n = len(ids), x.numel()
    if g < 2:
        return math.nan
    sums = torch.zeros(g, dtype=torch.float64).index_add_(0, group, x - x.mean())  # (G,)
    return math.sqrt(g / (g - 1) * float((sums**2).sum())) / n


def win_tie_loss(
    policy_scores: torch.Tensor, baseline_scores: torch.Tensor, tie_tolerance: float = 0.0,
    confidence: float = 0.95, clusters: Sequence[Hashable] | None = None,
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

    clusters: a key per row (its prompt); when some key repeats (K samples per prompt), the rows are not
    independent trials and Wilson over n rows would be up to sqrt(K) times too narrow. The interval is then
    Wilson's over the effective number of trials (Kish's design effect): n_eff = p(1 - p) / se^2, se the
    clustered_stderr of the outcomes (1, 1/2, 0), kept within [G, n] (G prompts: K perfectly correlated samples
    count once; independent ones n times); G when se is 0 (every prompt's outcomes alike, e.g. all won).
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
        return WinRateOutput(math.nan, 0.0, 1.0, 0, 0, 0, 0, math.nan, math.nan, 0.0)
    rate = (wins + ties / 2) / n
    if clusters is not None and len(clusters) != n:
        raise ValueError(f"{len(clusters)} cluster keys for {n} rows")
    n_eff = float(n)
    groups = len(set(clusters)) if clusters is not None else n
    if groups < n:
        outcome = torch.where(tie, 0.5, (diff > 0).double())  # (b,)
        se = clustered_stderr(outcome, clusters)
        n_eff = float(groups)
        if se > 0 and rate * (1 - rate) > 0:  # nan (one prompt) or 0: the prompts are all there is
            n_eff = min(float(n), max(float(groups), rate * (1 - rate) / se**2))
    low, high = wilson_interval(rate, n_eff, confidence)
    return WinRateOutput(rate, low, high, wins, ties, losses, n, ties / n, losses / n, n_eff)


def mean_interval(values: torch.Tensor, confidence: float = 0.95,
                  clusters: Sequence[Hashable] | None = None) -> MeanOutput:
    """Mean of (n,) values with a normal-approximation interval: mean -/+ z * s / sqrt(n), s the sample
    standard deviation (n - 1 in the denominator).

    Normal rather than Student t: evaluations average hundreds of prompts, where t and z differ by < 1%
    (t_0.975 is 1.98 at n = 100), and the standard library has no t quantile. With n < 30 the interval is
    somewhat too narrow; with n < 2 stderr and the bounds are nan. clusters: a key per value (its prompt); the
    standard error is then clustered_stderr's (equal to s / sqrt(n) when no key repeats).
    """
    x = values.double().flatten()
    n = x.numel()
    if n == 0:
        return MeanOutput(math.nan, math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if clusters is not None:
        stderr = clustered_stderr(x, clusters)
    else:
        stderr = float(x.std(correction=1)) / math.sqrt(n) if n > 1 else math.nan
    half = z_value(confidence) * stderr
    return MeanOutput(mean, stderr, mean - half, mean + half, n)


def sequence_kl(
    policy_logps: torch.Tensor, reference_logps: torch.Tensor, mask: torch.Tensor | None = None,
    confidence: float = 0.95, clusters: Sequence[Hashable] | None = None,
) -> KLOutput:
    """KL(policy || reference) in nats per sequence, Monte-Carlo from the policy's own samples.

    policy_logps, reference_logps: (b, t) log-probs of each sampled response token under the two models;
    mask: (b, t) true on response tokens (default: all). Per sample, k1 = sum_t (logp_policy - logp_ref) =
    log pi(y|x) - log ref(y|x); its mean over y ~ pi is exactly KL(pi(.|x) || ref(.|x)), so the mean over
    samples is an unbiased estimate of the expected sequence KL (Schulman, "Approximating KL divergence",
    2020: k1). A single sample can be negative; the mean cannot be, in expectation. The interval is
    `mean_interval` of the per-sample values. Samples from another distribution (e.g. the baseline's) give
    a biased number, and so do samples drawn with a different temperature or top-p than the log-probs.
    clusters: a key per sample (its prompt), for the clustered standard error (mean_interval).
    """
    if policy_logps.shape != reference_logps.shape or policy_logps.dim() != 2:
        raise ValueError(f"need two (b, t) log-prob tensors, got {tuple(policy_logps.shape)} and "
                         f"{tuple(reference_logps.shape)}")
    diff = policy_logps.double() - reference_logps.double()  # (b, t)
    if mask is not None:
        diff = torch.where(mask.bool(), diff, torch.zeros_like(diff))  # where: -inf in padding stays out
    per_sample = diff.sum(-1)  # (b,)
    out = mean_interval(per_sample, confidence, clusters)
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
