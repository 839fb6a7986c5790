"""From canary-experiment scores to an epsilon lower bound (the statistics of the audit).

An (epsilon, delta)-DP mechanism M satisfies, for adjacent D, D' and every event S,
``P[M(D') in S] <= e^epsilon P[M(D) in S] + delta``, and the same with D and D' swapped. A test
that reports "canary present" on the event S (true-positive rate TPR, false-positive rate FPR)
therefore gives ``epsilon >= ln((TPR - delta) / FPR)`` and, from its complement with the worlds
swapped, ``epsilon >= ln((1 - FPR - delta) / (1 - TPR))``. The rates are estimated from finitely
many trials, so both use the pessimistic ends TPR_low and FPR_high of their Clopper-Pearson
intervals; both bounds grow with TPR and shrink with FPR, so when the two ends hold (probability
>= 95%) both bounds hold, and their maximum is as valid as either.

The test (threshold and region) is chosen on one half of the trials and evaluated on the other:
choosing it on the trials it is evaluated on would pick the luckiest of thousands of thresholds
and void the confidence statement.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from common.errors import DPImgSynError

CONFIDENCE = 0.95

# Where a test reports "canary present": score above the threshold, or at or below it (for a
# canary that lowers the score).
REGIONS = ("above", "below")


def clopper_pearson(successes: int | np.ndarray, trials: int,
                    confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Exact two-sided binomial interval ``(low, high)`` for ``successes`` out of ``trials``.

    Each end holds with probability ``(1 + confidence) / 2``, so the two ends used by one bound
    (a TPR's low end, an FPR's high end) hold together with probability >= ``confidence``.
    """
    if trials < 1:
        raise DPImgSynError(f"a Clopper-Pearson interval needs at least one trial, got {trials}")
    if not 0 < confidence < 1:
        raise DPImgSynError(f"confidence must be in (0, 1), got {confidence}")
    k = np.asarray(successes, dtype=np.float64)
    if np.any((k < 0) | (k > trials)):
        raise DPImgSynError(f"successes must lie between 0 and {trials}")
    tail = (1.0 - confidence) / 2
    low = np.where(k > 0, stats.beta.ppf(tail, np.maximum(k, 1), trials - k + 1), 0.0)
    high = np.where(k < trials, stats.beta.ppf(1 - tail, k + 1, np.maximum(trials - k, 1)), 1.0)
    return low, high


def _log_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``ln(numerator / denominator)`` floored at 0: a bound below 0 says nothing."""
    with np.errstate(divide="ignore"):
        return np.log(np.maximum(numerator / denominator, 1.0))


def epsilon_from_rates(tpr_low: np.ndarray | float, fpr_high: np.ndarray | float, delta: float) -> np.ndarray:
    """``max(ln((TPR_low - delta) / FPR_high), ln((1 - FPR_high - delta) / (1 - TPR_low)))``, floored at 0."""
    tpr_low = np.asarray(tpr_low, dtype=np.float64)
    fpr_high = np.asarray(fpr_high, dtype=np.float64)
    return np.maximum(_log_ratio(tpr_low - delta, fpr_high), _log_ratio(1.0 - fpr_high - delta, 1.0 - tpr_low))


def max_certifiable_epsilon(trials: int, delta: float, confidence: float = CONFIDENCE) -> float:
    """The largest bound ``trials`` evaluation trials per world can give (perfect separation): about ln(n/3.7)."""
    low, _ = clopper_pearson(trials, trials, confidence)
    _, high = clopper_pearson(0, trials, confidence)
    return float(epsilon_from_rates(low, high, delta))


@dataclass(frozen=True)
class ThresholdTest:
    """"Canary present" iff score > threshold (region ``above``) or score <= threshold (``below``)."""

    threshold: float
    region: str


@dataclass(frozen=True)
class AuditBound:
    """A held-out evaluation of one test: counts, Clopper-Pearson ends and the resulting bound."""

    epsilon_lower_bound: float
    threshold: float
    region: str
    evaluation_trials: int  # per world
    true_positives: int  # canary world, score in the region
    false_positives: int  # canary-free world, score in the region
    tpr_low: float
    fpr_high: float
    confidence: float

    def to_dict(self) -> dict:
        return asdict(self)


def _counts(scores: np.ndarray, thresholds: np.ndarray, region: str) -> np.ndarray:
    """Number of scores in the region of each threshold."""
    ordered = np.sort(scores)
    at_or_below = np.searchsorted(ordered, thresholds, side="right")
    return len(ordered) - at_or_below if region == "above" else at_or_below


def _evaluate(without: np.ndarray, with_canary: np.ndarray, thresholds: np.ndarray, region: str, delta: float,
              confidence: float) -> tuple[np.ndarray, ...]:
    """(epsilon bound, TPR low end, FPR high end, true positives, false positives) at every threshold."""
    true_positives = _counts(with_canary, thresholds, region)
    false_positives = _counts(without, thresholds, region)
    tpr_low, _ = clopper_pearson(true_positives, len(with_canary), confidence)
    _, fpr_high = clopper_pearson(false_positives, len(without), confidence)
    return epsilon_from_rates(tpr_low, fpr_high, delta), tpr_low, fpr_high, true_positives, false_positives


def choose_test(without: np.ndarray, with_canary: np.ndarray, delta: float,
                confidence: float = CONFIDENCE) -> ThresholdTest:
    """The threshold and region with the largest bound ON THESE TRIALS (use calibration trials only)."""
    without, with_canary = _checked(without, with_canary)
    values = np.unique(np.concatenate([without, with_canary]))
    thresholds = (values[:-1] + values[1:]) / 2 if len(values) > 1 else values  # midway: robust to fresh trials
    candidates = []
    for region in REGIONS:
        epsilon = _evaluate(without, with_canary, thresholds, region, delta, confidence)[0]
        index = int(np.argmax(epsilon))
        candidates.append((float(epsilon[index]), ThresholdTest(float(thresholds[index]), region)))
    return max(candidates, key=lambda candidate: candidate[0])[1]


def evaluate_test(test: ThresholdTest, without: np.ndarray, with_canary: np.ndarray, delta: float,
                  confidence: float = CONFIDENCE) -> AuditBound:
    """The bound that one fixed test gives on fresh trials."""
    without, with_canary = _checked(without, with_canary)
    if test.region not in REGIONS:
        raise DPImgSynError(f"unknown test region {test.region!r}; use one of {', '.join(REGIONS)}")
    values = _evaluate(without, with_canary, np.array([test.threshold]), test.region, delta, confidence)
    epsilon, tpr_low, fpr_high, true_positives, false_positives = (value[0] for value in values)
    return AuditBound(epsilon_lower_bound=float(epsilon), threshold=test.threshold, region=test.region,
                      evaluation_trials=len(without), true_positives=int(true_positives),
                      false_positives=int(false_positives), tpr_low=float(tpr_low), fpr_high=float(fpr_high),
                      confidence=confidence)


def split_halves(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, evaluation): the first and the second half of the trials, never overlapping."""
    half = len(scores) // 2
    return scores[:half], scores[half:2 * half]


def audit_bound(without: np.ndarray, with_canary: np.ndarray, delta: float,
                confidence: float = CONFIDENCE) -> AuditBound:
    """Epsilon lower bound from scores of independent trials without and with the canary.

    The test is chosen on the first half of each world's trials and evaluated on the second.
    """
    without, with_canary = _checked(without, with_canary)
    if len(without) < 4:
        raise DPImgSynError(f"an audit needs at least 4 trials per world, got {len(without)}")
    calibration_without, evaluation_without = split_halves(without)
    calibration_with, evaluation_with = split_halves(with_canary)
    test = choose_test(calibration_without, calibration_with, delta, confidence)
    return evaluate_test(test, evaluation_without, evaluation_with, delta, confidence)


def _checked(without: np.ndarray, with_canary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    without = np.asarray(without, dtype=np.float64).ravel()
    with_canary = np.asarray(with_canary, dtype=np.float64).ravel()
    if len(without) != len(with_canary) or len(without) == 0:
        raise DPImgSynError(f"both worlds need the same positive number of trials, got {len(without)} "
                            f"and {len(with_canary)}")
    if not (np.isfinite(without).all() and np.isfinite(with_canary).all()):
        raise DPImgSynError("audit scores must be finite")
    return without, with_canary

