"""Paid private hyper-parameter selection: random stopping over public candidates (Papernot & Steinke, ICLR 2022).

Tuning on the private data is a mechanism too: picking the best of several trainings by a score that read the
private data leaks more than one training does. Papernot & Steinke ("Hyperparameter Tuning with Renyi
Differential Privacy") bound that leak when the number of runs is itself random and data-independent:

1. draw K from a public distribution with a public mean (:func:`draw_run_count`), before any private data is read;
2. K times: draw a candidate uniformly from a public list (:func:`draw_candidate`), train it with DP-SGD and score
   it through a DP mechanism (:func:`noisy_count`: the count of correct validation predictions plus Gaussian noise;
   one record changes that count by at most 1, the validation part is disjoint from the training part);
3. release only the best run's output (its model and which candidate it was) -- never K, the other runs or scores.

If one run is (lambda, eps(lambda))-RDP, :func:`selection_rdp` bounds the RDP of the whole selection:

- K from the truncated negative binomial D_{eta, gamma} (eta > -1, 0 < gamma < 1; P[K = 0] = 0; eta = 1 is the
  geometric distribution, eta = 0 the logarithmic one), their Theorem 2: for every lambda_hat >= 1,
  eps'(lambda) = eps(lambda) + (1 + eta) (1 - 1/lambda_hat) eps(lambda_hat) + (1 + eta) log(1/gamma) / lambda_hat
  + log(E[K]) / (lambda - 1);
- K from Poisson(mu) (K = 0 releases nothing), their Theorem 6: if one run is (eps_hat, delta_hat)-DP with
  exp(eps_hat) <= 1 + 1/(lambda - 1), eps'(lambda) = eps(lambda) + mu delta_hat + log(mu) / (lambda - 1).

The bound is in RDP only, so ledgers holding a selection are accounted with the RDP accountant (see
``privacy.ledger``). The candidate list, the distribution and its mean are public settings; K is not released.
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy.special import logsumexp

from common.errors import DPImgSynError
from privacy.accountant import RDP_ORDERS, Mechanism, rdp_curve
from privacy.noise import RandomSource, gaussian, is_os_random

TRUNCATED_NEGATIVE_BINOMIAL = "truncated_negative_binomial"
POISSON = "poisson"
DISTRIBUTIONS = (TRUNCATED_NEGATIVE_BINOMIAL, POISSON)

MAX_MEAN_RUNS = 1000.0  # Poisson's P[K = 0] = exp(-mean) must not underflow; nobody tunes with more runs
SCORE_SENSITIVITY = 1  # adding or removing one record changes a count of correct predictions by at most 1


@dataclass(frozen=True)
class RunCount:
    """The public distribution of the number of runs K: its kind, its mean, and the shape eta (negative binomial)."""

    kind: str
    mean: float
    shape: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in DISTRIBUTIONS:
            raise DPImgSynError(f"unknown distribution of the number of runs {self.kind!r}; choose one of "
                                f"{', '.join(DISTRIBUTIONS)}")
        if (isinstance(self.mean, bool) or not isinstance(self.mean, numbers.Real) or not math.isfinite(self.mean)
                or not 1 < self.mean <= MAX_MEAN_RUNS):
            raise DPImgSynError(f"the mean number of runs must be a number in (1, {MAX_MEAN_RUNS:g}] (1 run is "
                                f"plain training), got {self.mean!r}")
        if (isinstance(self.shape, bool) or not isinstance(self.shape, numbers.Real)
                or not math.isfinite(self.shape) or self.shape <= -1):
            raise DPImgSynError(f"the shape eta of the truncated negative binomial must be a number > -1, "
                                f"got {self.shape!r}")


def _expm1_over_x(x: float) -> float:
    return math.expm1(x) / x if x != 0 else 1.0


def negative_binomial_mean(gamma: float, shape: float) -> float:
    """E[K] under D_{eta, gamma}: eta (1 - gamma) / (gamma (1 - gamma^eta)); (1 - gamma) / (gamma log(1/gamma)) at 0."""
    log_gamma = math.log(gamma)
    exponent = shape * log_gamma
    # 1 - gamma^eta = -eta log(gamma) * expm1(eta log gamma) / (eta log gamma), which also covers eta = 0; for
    # eta < 0 and a tiny gamma, gamma * expm1(x) / x = exp(log(gamma) + x - log(x)) to float precision.
    scaled = (math.exp(log_gamma + exponent - math.log(exponent)) if exponent > 700
              else gamma * _expm1_over_x(exponent))
    return (1 - gamma) / (-log_gamma * scaled)


@functools.lru_cache(maxsize=64)
def negative_binomial_gamma(mean: float, shape: float) -> float:
    """The gamma whose D_{eta, gamma} has mean ``mean`` (bisection; the mean of the answer is >= ``mean``).

    Sampling and accounting both call this, so they use the same gamma to the last bit.
    """
    if shape == 1:
        return 1 / mean
    low, high = 0.0, 1.0  # mean(gamma) falls from inf at 0 to 1 at 1
    while high - low > 1e-15 * high:
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if negative_binomial_mean(middle, shape) < mean:
            high = middle
        else:
            low = middle
    if low == 0:
        raise DPImgSynError(f"a mean of {mean:g} runs needs a gamma below the smallest float at shape {shape:g}; "
                            "use a larger shape or a smaller mean")
    return low


def expected_runs(distribution: RunCount) -> float:
    """E[K]: the mean itself for Poisson; for the negative binomial, the exact mean of the gamma used."""
    if distribution.kind == POISSON:
        return float(distribution.mean)
    return negative_binomial_mean(negative_binomial_gamma(distribution.mean, distribution.shape), distribution.shape)


def run_count_probabilities(distribution: RunCount, count: int) -> np.ndarray:
    """P[K = k] for k = 0 .. count - 1, by the ratio P[K = k + 1] / P[K = k] of each distribution."""
    probabilities = np.zeros(count)
    if distribution.kind == POISSON:
        mean = distribution.mean
        probabilities[0] = math.exp(-mean)
        for k in range(1, count):
            probabilities[k] = probabilities[k - 1] * mean / k
        return probabilities
    shape = distribution.shape
    gamma = negative_binomial_gamma(distribution.mean, shape)
    log_gamma = math.log(gamma)
    if count > 1:  # P[K = 1] = eta (1 - gamma) gamma^eta / (1 - gamma^eta), (1 - gamma) / log(1/gamma) at eta = 0
        probabilities[1] = (1 - gamma) * math.exp(shape * log_gamma) / (-log_gamma * _expm1_over_x(shape * log_gamma))
    for k in range(2, count):
        probabilities[k] = probabilities[k - 1] * (1 - gamma) * (k - 1 + shape) / k
    return probabilities


def _uniform(source: RandomSource) -> float:
    """One uniform on [0, 1) with 53 random bits, so that the drawn laws are the analysed ones to ~1e-16."""
    if is_os_random(source):
        return float(source.uniform(1)[0])
    return float(torch.rand(1, generator=source, dtype=torch.float64)[0])


def draw_run_count(distribution: RunCount, source: RandomSource) -> int:
    """K, drawn by inverting the distribution's CDF at one uniform from ``source`` (seeded or secure)."""
    target = _uniform(source)
    probabilities = run_count_probabilities(distribution, 64)
    while True:
        cumulative = np.cumsum(probabilities)
        above = np.nonzero(cumulative > target)[0]
        if above.size:
            return int(above[0])
        if len(probabilities) >= 2**24:  # the tail below 2^-53 that float64 rounding can leave unreached
            raise DPImgSynError("the number of runs drawn exceeds 2^24 (a tail this heavy comes from a shape near -1 "
                                "with a large mean); use a larger shape or a smaller mean")
        probabilities = run_count_probabilities(distribution, 2 * len(probabilities))


def draw_candidate(count: int, source: RandomSource) -> int:
    """A candidate index drawn uniformly from ``range(count)``: the public list's order does not matter."""
    if count < 1:
        raise DPImgSynError("the candidate list is empty; list at least one candidate")
    return min(int(_uniform(source) * count), count - 1)


def noisy_count(count: int, noise_multiplier: float, source: RandomSource) -> float:
    """``count`` plus N(0, (noise_multiplier * SCORE_SENSITIVITY)^2): the Gaussian mechanism on a count.

    Its privacy is that of :func:`score_mechanism` (one unsampled Gaussian step), composed into every run.
    """
    if not math.isfinite(noise_multiplier) or noise_multiplier <= 0:
        raise DPImgSynError(f"the score's noise multiplier must be a finite number > 0, got {noise_multiplier!r}")
    return float(count) + float(gaussian((1,), noise_multiplier * SCORE_SENSITIVITY, source)[0])


def score_mechanism(noise_multiplier: float) -> Mechanism:
    """The noisy score as a ledger mechanism: a Gaussian of noise multiplier sigma on the whole set, one step."""
    return (float(noise_multiplier), 1.0, 1)


def run_rdp(candidates: Sequence[Sequence[Mechanism]]) -> np.ndarray:
    """RDP over ``RDP_ORDERS`` of one run: a candidate drawn uniformly (and revealed), then its mechanisms.

    Its output is (candidate, result); with candidate c's RDP eps_c, the divergence of the pair is exactly
    log(mean_c exp((lambda - 1) eps_c(lambda))) / (lambda - 1), at most the largest eps_c.
    """
    if not candidates:
        raise DPImgSynError("the candidate list is empty; list at least one candidate")
    curves = np.stack([rdp_curve(list(mechanisms)) for mechanisms in candidates])
    scale = np.asarray(RDP_ORDERS) - 1
    with np.errstate(over="ignore"):
        return logsumexp(curves * scale, axis=0, b=1 / len(candidates)) / scale


def _check_curve(run_curve: Sequence[float], orders: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    curve, orders = np.asarray(run_curve, dtype=np.float64), np.asarray(orders, dtype=np.float64)
    if orders.ndim != 1 or curve.shape != orders.shape or not (orders > 1).all() or (np.diff(orders) <= 0).any():
        raise DPImgSynError("an RDP curve needs increasing orders > 1 and one value per order")
    if np.isnan(curve).any() or (curve < 0).any():
        raise DPImgSynError(f"an RDP curve's values must be >= 0, got {curve!r}")
    return curve, orders


def delta_at(run_curve: Sequence[float], orders: Sequence[float], epsilon: float) -> float:
    """delta of an (epsilon, delta)-DP guarantee implied by an RDP curve (the RDP accountant's conversion, inverted).

    (lambda, r)-RDP implies (epsilon, delta)-DP with log delta = (lambda - 1)(r - epsilon + log(1 - 1/lambda))
    - log(lambda) (Balle et al. 2020, Theorem 21); the smallest delta over the orders.
    """
    curve, orders = _check_curve(run_curve, orders)
    with np.errstate(invalid="ignore"):
        log_delta = (orders - 1) * (curve - epsilon + np.log1p(-1 / orders)) - np.log(orders)
    return float(min(1.0, math.exp(np.nanmin(log_delta)))) if not np.isnan(log_delta).all() else 1.0


def selection_rdp(run_curve: Sequence[float], distribution: RunCount,
                  orders: Sequence[float] = RDP_ORDERS) -> np.ndarray:
    """RDP, at ``orders``, of releasing the best of K runs, each ``run_curve``-RDP (Theorem 2 or 6 above).

    Theorem 2's free order lambda_hat ranges over ``orders``; at the end, since RDP grows with the order, every
    order keeps the smallest bound of the orders at or above it.
    """
    curve, orders = _check_curve(run_curve, orders)
    log_mean_runs = math.log(expected_runs(distribution))
    if distribution.kind == POISSON:
        mean = distribution.mean
        delta_hats = np.array([delta_at(curve, orders, math.log1p(1 / (order - 1))) for order in orders])
        bound = curve + mean * delta_hats + log_mean_runs / (orders - 1)
    else:
        shape = distribution.shape
        log_inverse_gamma = -math.log(negative_binomial_gamma(distribution.mean, shape))
        with np.errstate(invalid="ignore"):
            hat_terms = (1 - 1 / orders) * curve + log_inverse_gamma / orders
        bound = curve + (1 + shape) * np.min(hat_terms) + log_mean_runs / (orders - 1)
    return np.minimum.accumulate(bound[::-1])[::-1]
