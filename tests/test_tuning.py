"""Paid private hyper-parameter selection: its RDP bound against exact divergences, closed forms and the ledger.

The bound is Papernot & Steinke 2022's (Theorem 2: truncated negative binomial; Theorem 6: Poisson). The exact side
runs "best of K" on small discrete mechanisms through the closed-form generating function of K, independently of
the library's probabilities.
"""
import json
import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import norm

from common.errors import DPImgSynError
from privacy import (ACCOUNTANTS, OS_RANDOM, compute_epsilon, mechanism_entry, privacy_block, require_privacy_block,
                     tuning_entry)
from privacy import tuning
from privacy.accountant import RDP_ORDERS, epsilon_of_rdp, rdp_curve
from privacy.tuning import (POISSON, TRUNCATED_NEGATIVE_BINOMIAL as TNB, RunCount, draw_candidate, draw_run_count,
                            expected_runs, negative_binomial_gamma, noisy_count, run_count_probabilities, run_rdp,
                            score_mechanism, selection_rdp)

DELTA = 1e-5
ORDERS = np.array([1.25, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64])
# Scores 0 < 1 < ... of one run on two neighbouring datasets (randomized responses, rare high scores).
BASES = {
    "randomized_response": ([0.75, 0.25], [0.25, 0.75]),
    "mild": ([0.55, 0.45], [0.45, 0.55]),
    "three_scores": ([0.5, 0.3, 0.2], [0.4, 0.3, 0.3]),
    "rare_best": ([1 - 2e-4, 2e-4], [1 - 1e-4, 1e-4]),
    "rare_three": ([1 - 3e-3, 2e-3, 1e-3], [1 - 1.5e-3, 1e-3, 0.5e-3]),
}
DISTRIBUTIONS = [RunCount(TNB, 10, 1.0), RunCount(TNB, 3, 0.0), RunCount(TNB, 10, -0.9), RunCount(TNB, 100, 1.0),
                 RunCount(POISSON, 10), RunCount(POISSON, 2)]


def renyi(p: np.ndarray, q: np.ndarray, order: float) -> float:
    return float(logsumexp(order * np.log(p) + (1 - order) * np.log(q))) / (order - 1)


def symmetric_curve(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Exact RDP at ORDERS: the worse of the two directions, as RDP between neighbours requires."""
    return np.array([max(renyi(p, q, order), renyi(q, p, order)) for order in ORDERS])


def generating_function(distribution: RunCount, x: np.ndarray) -> np.ndarray:
    """E[x^K] in closed form: exp(mu (x - 1)); ((1 - (1 - g) x)^-eta - 1) / (g^-eta - 1); log(1 - (1 - g) x) / log g."""
    if distribution.kind == POISSON:
        return np.exp(distribution.mean * (x - 1))
    eta, gamma = distribution.shape, negative_binomial_gamma(distribution.mean, distribution.shape)
    if eta == 0:
        return np.log1p(-(1 - gamma) * x) / math.log(gamma)
    return np.expm1(-eta * np.log1p(-(1 - gamma) * x)) / math.expm1(-eta * math.log(gamma))


def best_of_k(scores: list[float], distribution: RunCount) -> np.ndarray:
    """Exact output law of the best of K runs: P[nothing] (K = 0), then P[best = score i] = f(F_i) - f(F_{i-1})."""
    cdf = np.concatenate([[0.0], np.cumsum(scores)])
    cdf[-1] = 1.0
    law = np.diff(generating_function(distribution, cdf), prepend=0.0)
    return law if law[0] > 0 else law[1:]


def worst_slack(bound_of) -> float:
    """min over bases, distributions and orders of (bound - exact RDP of the selection)."""
    slacks = []
    for p, q in BASES.values():
        p, q = np.array(p), np.array(q)
        for distribution in DISTRIBUTIONS:
            exact = symmetric_curve(best_of_k(p, distribution), best_of_k(q, distribution))
            slacks.append(np.min(bound_of(symmetric_curve(p, q), distribution) - exact))
    return min(slacks)


def library_bound(curve: np.ndarray, distribution: RunCount) -> np.ndarray:
    return selection_rdp(curve, distribution, ORDERS)


def test_the_bound_is_above_the_exact_divergence_of_best_of_k():
    assert worst_slack(library_bound) >= -1e-9


def test_forgetting_the_log_mean_term_is_caught(monkeypatch):
    """Without log(E[K]) / (lambda - 1) the Poisson bound falls below the exact divergence (the check has teeth)."""
    monkeypatch.setattr(tuning, "expected_runs", lambda distribution: 1.0)
    assert worst_slack(library_bound) < -0.1


def test_forgetting_the_gamma_term_is_caught(monkeypatch):
    """Theorem 2 without (1 + eta) log(1/gamma) / lambda_hat falls below the exact divergence."""
    means = {distribution: expected_runs(distribution) for distribution in DISTRIBUTIONS}
    monkeypatch.setattr(tuning, "expected_runs", means.__getitem__)
    monkeypatch.setattr(tuning, "negative_binomial_gamma", lambda mean, shape: 1.0)
    assert worst_slack(library_bound) < -0.1


def gaussian_curve(sigma: float, orders=RDP_ORDERS) -> np.ndarray:
    return np.asarray(orders) / (2 * sigma**2)


def from_the_right(values: np.ndarray) -> np.ndarray:
    """Every order keeps the smallest value at or above it (RDP grows with the order)."""
    return np.minimum.accumulate(values[::-1])[::-1]


def test_theorem_2_on_a_gaussian_run_matches_its_closed_form():
    """eps(l) = l / (2 s^2): the min over lambda_hat is sqrt(2 log(1/g)) / s - 1 / (2 s^2), at lambda_hat = s sqrt(2
    log(1/g)); geometric K (eta = 1) of mean 10 has gamma = 1/10 and E[K] = 10."""
    sigma, orders = 2.0, np.asarray(RDP_ORDERS)
    distribution = RunCount(TNB, 10, 1.0)
    assert negative_binomial_gamma(10, 1.0) == 0.1 and expected_runs(distribution) == pytest.approx(10, rel=1e-12)
    closed = (gaussian_curve(sigma) + 2 * (math.sqrt(2 * math.log(10)) / sigma - 1 / (2 * sigma**2))
              + math.log(10) / (orders - 1))
    bound = selection_rdp(gaussian_curve(sigma), distribution)
    assert np.all(bound >= from_the_right(closed) - 1e-12)
    assert bound == pytest.approx(from_the_right(closed), rel=1e-3)  # the orders' grid is fine near lambda_hat


def gaussian_delta(sigma: float, epsilon: np.ndarray) -> np.ndarray:
    """Exact delta(epsilon) of the Gaussian mechanism of sensitivity 1 (Balle & Wang 2018, Theorem 8)."""
    return norm.cdf(1 / (2 * sigma) - epsilon * sigma) - np.exp(epsilon) * norm.cdf(-1 / (2 * sigma) - epsilon * sigma)


def test_theorem_6_on_a_gaussian_run_at_given_numbers():
    """Poisson mu = 10, Gaussian sigma = 2: eps'(l) = l/8 + 10 delta_hat + log(10) / (l - 1) with delta_hat the
    run's delta at eps_hat = log(l / (l - 1)); at l = 8 the exact delta_hat is 0.147 (eps' = 2.80), the RDP
    conversion gives 0.238 (eps' = 3.71). The paper's formula with the exact delta is below the bound everywhere."""
    sigma, mean, orders = 2.0, 10, np.asarray(RDP_ORDERS)
    curve = gaussian_curve(sigma)
    bound = selection_rdp(curve, RunCount(POISSON, mean))
    eps_hat = np.log(orders / (orders - 1))
    paper = curve + mean * gaussian_delta(sigma, eps_hat) + math.log(mean) / (orders - 1)
    assert np.all(bound >= from_the_right(paper) - 1e-12)
    at_8 = list(RDP_ORDERS).index(8)
    assert gaussian_delta(sigma, eps_hat[at_8]) == pytest.approx(0.1474, abs=1e-4)
    assert tuning.delta_at(curve, RDP_ORDERS, eps_hat[at_8]) == pytest.approx(0.2380, abs=1e-4)
    assert bound[at_8] == pytest.approx(1 + 10 * 0.23805 + math.log(10) / 7, abs=2e-3)
    assert paper[at_8] == pytest.approx(2.803, abs=1e-3)


def test_one_run_on_average_costs_about_one_run():
    """As the mean of the truncated negative binomial falls to 1 (K = 1 always), the bound falls to the base run's
    curve plus (1 + eta)(1 - 1/lambda_1) eps(lambda_1) at the smallest order lambda_1, all that the grid allows."""
    curve = gaussian_curve(3.0)
    bound = selection_rdp(curve, RunCount(TNB, 1 + 1e-9, 1.0))
    extra = 2 * (1 - 1 / RDP_ORDERS[0]) * curve[0]
    assert np.all(bound >= from_the_right(curve) - 1e-12)
    assert np.all(bound <= curve + extra + 1e-6)
    with pytest.raises(DPImgSynError, match="mean number of runs"):
        RunCount(TNB, 1)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS[:2] + DISTRIBUTIONS[3:] + [RunCount(TNB, 10, -0.5)])
def test_run_count_probabilities_are_the_generating_function(distribution):
    """(Mean 10 at eta = -0.9 has gamma ~ 4e-11: a tail far beyond the terms summed here.)"""
    probabilities = run_count_probabilities(distribution, 50_000)
    powers = np.arange(len(probabilities))
    assert probabilities.sum() == pytest.approx(1, abs=1e-9)
    assert probabilities @ powers == pytest.approx(expected_runs(distribution), rel=1e-6)
    for x in (0.3, 0.9):
        assert probabilities @ x**powers == pytest.approx(generating_function(distribution, np.array(x)), rel=1e-9)
    assert (probabilities[0] == 0) == (distribution.kind == TNB)


@pytest.mark.parametrize("distribution", [RunCount(TNB, 5, 1.0), RunCount(TNB, 5, -0.5), RunCount(POISSON, 3)])
def test_drawn_run_counts_follow_the_distribution(distribution):
    generator = torch.Generator().manual_seed(0)
    draws = np.array([draw_run_count(distribution, generator) for _ in range(4000)])
    probabilities = run_count_probabilities(distribution, 200)
    assert draws.mean() == pytest.approx(expected_runs(distribution), rel=0.06)
    for k in (0, 1, 2):
        assert np.mean(draws == k) == pytest.approx(probabilities[k], abs=0.025)
    again = torch.Generator().manual_seed(0)
    assert [draw_run_count(distribution, again) for _ in range(10)] == list(draws[:10])
    assert draw_run_count(distribution, OS_RANDOM) >= (0 if distribution.kind == POISSON else 1)


def test_candidates_are_drawn_uniformly():
    generator = torch.Generator().manual_seed(1)
    counts = np.bincount([draw_candidate(3, generator) for _ in range(3000)], minlength=3)
    assert counts.min() > 900 and len(counts) == 3
    with pytest.raises(DPImgSynError, match="empty"):
        draw_candidate(0, generator)


def test_the_noisy_score_has_the_stated_noise():
    """Noise std sigma * sensitivity (1): halving the noise or dropping it fails here."""
    generator = torch.Generator().manual_seed(2)
    draws = np.array([noisy_count(100, 4.0, generator) for _ in range(4000)])
    assert draws.mean() == pytest.approx(100, abs=0.3)
    assert draws.std() == pytest.approx(4.0, rel=0.05)
    assert score_mechanism(4.0) == (4.0, 1.0, 1)
    with pytest.raises(DPImgSynError, match="noise multiplier"):
        noisy_count(100, 0.0, generator)


def test_one_run_of_a_random_candidate():
    cheap, dear = [(2.0, 0.05, 100)], [(1.0, 0.05, 200), score_mechanism(5.0)]
    assert run_rdp([cheap]) == pytest.approx(rdp_curve(cheap))
    both = run_rdp([cheap, dear])
    assert np.all(both >= rdp_curve(cheap)) and np.all(both <= rdp_curve(dear) + 1e-12)


def test_the_rdp_curve_converts_like_the_rdp_accountant():
    from opacus.accountants import RDPAccountant

    mechanisms = [(1.0, 0.01, 500), (4.0, 0.02, 50)]
    assert list(RDP_ORDERS) == RDPAccountant.DEFAULT_ALPHAS
    assert epsilon_of_rdp(rdp_curve(mechanisms), DELTA) == compute_epsilon(mechanisms, DELTA, "rdp")
    assert epsilon_of_rdp(rdp_curve([(0.0, 1.0, 1)]), DELTA) == math.inf


N = 4000


def candidate(sigma: float, batch_size: int, epochs: int) -> list[dict]:
    """One candidate's ledger entries: its DP-SGD plan on N public-size records, and the noisy validation score."""
    return [mechanism_entry("dp_sgd", sigma, batch_size / N, epochs * math.ceil(N / batch_size), 1.0),
            mechanism_entry("noisy_score", *score_mechanism(5.0), 1.0)]


CANDIDATES = [candidate(1.0, 256, 10), candidate(1.5, 512, 20)]
STATISTICS = mechanism_entry("dp_statistics", 2.0, 256 / N, 16, 1.0)


@pytest.mark.parametrize("kind", [TNB, POISSON])
def test_the_ledger_counts_the_candidate_runs(kind):
    """A tuned teacher costs more than any one of its runs, and more the more runs it makes on average."""
    one_run = max(privacy_block(runs, DELTA, "rdp")["epsilon"] for runs in CANDIDATES)
    epsilons = [privacy_block([tuning_entry("paid_tuning", RunCount(kind, mean), CANDIDATES), STATISTICS], DELTA,
                              "rdp")["epsilon"] for mean in (2, 5, 20)]
    assert one_run < epsilons[0] < epsilons[1] < epsilons[2]
    single = privacy_block([tuning_entry("paid_tuning", RunCount(kind, 5), CANDIDATES[:1]), STATISTICS], DELTA, "rdp")
    assert single["epsilon"] < epsilons[1]  # the dearer second candidate is counted too


def test_a_tuned_block_round_trips_and_refuses_tampering():
    entry = tuning_entry("paid_tuning", RunCount(TNB, 5, 0.5), CANDIDATES, candidates_file="candidates.yaml")
    block = json.loads(json.dumps(privacy_block([entry, STATISTICS], DELTA, "rdp")))
    assert block["delta"] == DELTA and block["ledger"][0]["shape"] == 0.5
    assert require_privacy_block({"privacy": block}, "teacher.dppt") == block
    fewer_runs = json.loads(json.dumps(block))
    fewer_runs["ledger"][0]["mean_runs"] = 2.0
    with pytest.raises(DPImgSynError, match="altered"):
        require_privacy_block({"privacy": fewer_runs}, "teacher.dppt")
    dropped = json.loads(json.dumps(block))
    dropped["ledger"][0]["candidates"][1] = "none"
    with pytest.raises(DPImgSynError, match="privacy violation.*malformed"):
        require_privacy_block({"privacy": dropped}, "teacher.dppt")


@pytest.mark.parametrize("name", sorted(ACCOUNTANTS))
def test_every_accountant_gives_the_rdp_total_or_says_to_use_rdp(name):
    ledger = [tuning_entry("paid_tuning", RunCount(POISSON, 4), CANDIDATES), STATISTICS]
    if name == "rdp":
        expected = epsilon_of_rdp(rdp_curve([(2.0, 256 / N, 16)]) + selection_rdp(
            run_rdp([[(1.0, 256 / N, 160), (5.0, 1.0, 1)], [(1.5, 512 / N, 160), (5.0, 1.0, 1)]]),
            RunCount(POISSON, 4)), DELTA)
        assert privacy_block(ledger, DELTA, name)["epsilon"] == pytest.approx(expected, rel=1e-12)
        return
    with pytest.raises(DPImgSynError, match="--accountant rdp") as raised:
        privacy_block(ledger, DELTA, name)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("kind, mean, shape, message", [
    ("geometric", 5, 1.0, "unknown distribution"), (TNB, 1, 1.0, "mean number"), (POISSON, 0.5, 1.0, "mean number"),
    (TNB, math.nan, 1.0, "mean number"), (TNB, 5, -1.0, "shape"), (TNB, 5, math.inf, "shape"),
])
def test_bad_distributions_are_user_errors(kind, mean, shape, message):
    with pytest.raises(DPImgSynError, match=message):
        RunCount(kind, mean, shape)


def test_bad_tuning_entries_are_user_errors():
    with pytest.raises(DPImgSynError, match="candidate"):
        tuning_entry("paid_tuning", RunCount(TNB, 5), [])
    with pytest.raises(DPImgSynError, match="only DP mechanism entries"):
        tuning_entry("paid_tuning", RunCount(TNB, 5), [[{"name": "x", "non_private": True}]])
    with pytest.raises(DPImgSynError, match="extras may not set"):
        tuning_entry("paid_tuning", RunCount(TNB, 5), CANDIDATES, paid_tuning=False, claimed_by_source=True)


def test_a_mean_beyond_floats_at_a_shape_near_minus_one_is_a_user_error():
    assert negative_binomial_gamma(1000.0, -0.99) > 0  # 3.7e-301: still a float
    with pytest.raises(DPImgSynError, match="smaller mean"):
        negative_binomial_gamma(1000.0, -0.999)
