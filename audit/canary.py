"""Canary experiments on the project's own DP mechanisms, and their comparison with the accountant.

Each experiment runs the real code -- :func:`synthesizer.dp_stats.compute_dp_statistics` for the
DP statistics, :class:`training.dp_sgd.DPSGDTrainer` (Opacus ``DPOptimizer``) for DP-SGD -- many
times on a dataset D and on D' = D plus a worst-case canary, and scores each release by its
projection on the canary's (clipped) contribution. :mod:`audit.bounds` turns the two score
samples into an epsilon lower bound, which must stay below the accountant's epsilon for the
configuration that ran. The same experiment on a deliberately broken mechanism must exceed it,
which shows that the audit could catch a broken guarantee.

Trials are batched: one run of the mechanism carries many independent trials. Trial t owns
its own coordinates (channels of the stat layer, input features of the linear model), and each
of its examples is zero outside them, so per-example clipping, per-coordinate Gaussian noise and
independent Poisson sampling act on every trial exactly as in a run of its own; dividing by
the run's expected batch size is a common rescaling, which a threshold test does not see.

With augmentation multiplicity (``augmult`` K) every example enters DP-SGD as K random crops of
itself. The experiment's examples are constant 2 x 2 images (one channel per feature) behind an
average pool, so every crop of an example equals it: the canary then enters K times with its full
gradient, and only clipping the example's mean gradient, not each view's, keeps it within C.

Adjacency is add/remove: D' replaces an all-zero example of D (which contributes nothing to any
clipped sum) by the canary, so both worlds have the same size, sample rate and batch size.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from audit.bounds import CONFIDENCE, audit_bound, max_certifiable_epsilon
from common.errors import DPImgSynError
from privacy import DEFAULT_ACCOUNTANT, DEFAULT_DELTA, compute_epsilon
from synthesizer import dp_stats
from training.dp_sgd import DPSGDConfig, DPSGDTrainer

MECHANISMS = ("dp_statistics", "dp_sgd")

# The canary's raw value: its statistic or gradient is far above any clipping norm used here
# (norm ~1e4 for the statistics, ~70 for the gradient), yet far below UNCLIPPED_NORM.
CANARY_VALUE = 100.0
UNCLIPPED_NORM = 1e6

TRIALS_PER_RUN = 500  # at most this many trials batched into one run; memory grows with its square
QUICK_TRIALS = 4000
LONG_TRIALS = 20000
EXAMPLES_PER_TRIAL = 2  # one ordinary example and one slot (all-zero in D, the canary in D')


def _as_run(noise_multiplier: float, max_norm: float) -> tuple[float, float]:
    """The sound mechanism: exactly what the accountant is told."""
    return noise_multiplier, max_norm


def _without_clipping(noise_multiplier: float, max_norm: float) -> tuple[float, float]:
    """A clipping norm no example reaches, with the noise std (sigma * C) left as accounted."""
    return noise_multiplier * max_norm / UNCLIPPED_NORM, UNCLIPPED_NORM


def _noise_divided_by_10(noise_multiplier: float, max_norm: float) -> tuple[float, float]:
    """A tenth of the accounted noise."""
    return noise_multiplier / 10, max_norm


# What actually runs, as a function of the (noise multiplier, clipping norm) the accountant is told.
BREAKAGES: dict[str, Callable[[float, float], tuple[float, float]]] = {
    "none": _as_run,
    "no_clipping": _without_clipping,
    "noise_div_10": _noise_divided_by_10,
}


@dataclass(frozen=True)
class AuditConfig:
    """One audited configuration; ``trials`` per world, half to choose the test, half to evaluate it."""

    mechanism: str
    noise_multiplier: float
    sample_rate: float = 1.0
    epochs: int = 1
    max_norm: float = 1.0
    breakage: str = "none"
    trials: int = QUICK_TRIALS
    delta: float = DEFAULT_DELTA
    augmult: int = 0  # DP-SGD's augmentation multiplicity (views per example)

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise DPImgSynError(f"unknown mechanism {self.mechanism!r}; use one of {', '.join(MECHANISMS)}")
        if self.breakage not in BREAKAGES:
            raise DPImgSynError(f"unknown breakage {self.breakage!r}; use one of {', '.join(BREAKAGES)}")
        for name in ("noise_multiplier", "max_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise DPImgSynError(f"{name} must be a positive finite number, got {value!r}")
        if not 0 < self.sample_rate <= 1:
            raise DPImgSynError(f"sample rate must be in (0, 1], got {self.sample_rate!r}")
        if self.epochs < 1 or self.trials < 4:
            raise DPImgSynError(f"an audit needs epochs >= 1 and trials >= 4, got {self.epochs} and {self.trials}")
        if self.augmult < 0 or (self.augmult and self.mechanism != "dp_sgd"):
            raise DPImgSynError(f"augmult is DP-SGD's, a whole number >= 0; got {self.augmult!r} for {self.mechanism}")
        if not 0 < self.delta < 1:
            raise DPImgSynError(f"delta must be in (0, 1), got {self.delta!r}")


@dataclass(frozen=True)
class Scores:
    """Per-trial scores of one world, and the mechanism as the code itself counted it."""

    values: np.ndarray
    sample_rate: float
    steps: int


def _run_seed(seed: int, world: int, run: int) -> int:
    """Independent 62-bit seeds per (world, run), so that no two runs share noise or sampling."""
    return int(np.random.SeedSequence([seed, world, run]).generate_state(1, dtype=np.uint64)[0] >> 2)


def _split_into_runs(trials: int) -> tuple[int, int]:
    """(runs, trials per run): equal runs, so that every run has the same size and sample rate."""
    runs = math.ceil(trials / TRIALS_PER_RUN)
    return runs, math.ceil(trials / runs)


def _batch_size(config: AuditConfig, num_examples: int) -> int:
    return max(1, round(config.sample_rate * num_examples))


# --------------------------------------------------------------------------- (a) DP statistics
def _statistics_run(config: AuditConfig, trials: int, with_canary: bool, seed: int) -> tuple[np.ndarray, dict]:
    """One ``compute_dp_statistics`` run carrying ``trials`` trials; returns their scores and its mechanism.

    Trial t owns channels 2t (the canary's) and 2t+1 (its ordinary example's) of a single
    GroupNorm; every example is a 1x1 image. The canary's statistic is (a, a^2) on channel 2t
    (mean, second moment), so the score is the release projected on that direction.
    """
    channels = 2 * trials
    images = torch.zeros(EXAMPLES_PER_TRIAL * trials, channels, 1, 1)
    trial = torch.arange(trials)
    images[2 * trial, 2 * trial + 1] = 1.0
    if with_canary:
        images[2 * trial + 1, 2 * trial] = CANARY_VALUE
    noise_multiplier, max_norm = BREAKAGES[config.breakage](config.noise_multiplier, config.max_norm)
    model = nn.Sequential(nn.GroupNorm(1, channels))
    result = dp_stats.compute_dp_statistics(model, TensorDataset(images, torch.zeros(len(images), dtype=torch.long)),
                                   epochs=config.epochs, batch_size=_batch_size(config, len(images)),
                                   max_norm=max_norm, noise_multiplier=noise_multiplier, seed=seed, device="cpu",
                                   progress=False, max_physical_batch_size=len(images))
    moments = result.moments.to(torch.float64)
    direction = torch.tensor([CANARY_VALUE, CANARY_VALUE ** 2], dtype=torch.float64)
    direction /= torch.linalg.vector_norm(direction)
    scores = direction[0] * moments[2 * trial] + direction[1] * moments[channels + 2 * trial]
    return scores.numpy(), result.mechanism


# --------------------------------------------------------------------------- (b) DP-SGD
def _dp_sgd_run(config: AuditConfig, trials: int, with_canary: bool, seed: int) -> tuple[np.ndarray, dict]:
    """DP-SGD (``DPSGDTrainer``) on a bias-free linear 2-class model; trial t owns input features 2t, 2t+1.

    From zero weights, any gradient of the canary (input a on feature 2t, label 0) is
    ``(p - e_0) a`` on column 2t: a fixed direction (-1, +1)/sqrt(2) whatever the weights, so
    every step adds at most C along it. The ordinary example lives on feature 2t+1, orthogonal.
    Momentum and weight decay are off, so within one epoch (constant learning rate) the release is
    the plain sum of the noisy steps; over several epochs the trainer's schedule weights later
    ones less, which leaves the audit valid but weaker.
    """
    features = 2 * trials
    inputs = torch.zeros(EXAMPLES_PER_TRIAL * trials, features)
    trial = torch.arange(trials)
    inputs[2 * trial, 2 * trial + 1] = 1.0
    if with_canary:
        inputs[2 * trial + 1, 2 * trial] = CANARY_VALUE
    noise_multiplier, max_norm = BREAKAGES[config.breakage](config.noise_multiplier, config.max_norm)
    linear = nn.Linear(features, 2, bias=False)
    nn.init.zeros_(linear.weight)
    model = linear
    if config.augmult:  # constant images: every crop of an example is the example itself
        inputs = inputs[:, :, None, None].expand(-1, -1, 2, 2).contiguous()
        model = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), linear)
    views = max(1, config.augmult)
    train_config = DPSGDConfig(epochs=config.epochs, train_batch_size=_batch_size(config, len(inputs)), lr=1.0,
                               max_norm=max_norm, noise_multiplier=noise_multiplier, momentum=0.0,
                               weight_decay=0.0, max_physical_batch_size=len(inputs) * views,
                               augmult=config.augmult)
    trainer = DPSGDTrainer(model, TensorDataset(inputs, torch.zeros(len(inputs), dtype=torch.long)),
                           train_config, torch.device("cpu"), seed)
    for _ in range(config.epochs):
        trainer.train_epoch(progress=False)
    weight = linear.weight.detach().to(torch.float64)
    scores = (weight[0, 2 * trial] - weight[1, 2 * trial]) / math.sqrt(2.0)
    return scores.numpy(), {"sample_rate": trainer.sample_rate, "steps": trainer.steps_done}


_EXPERIMENTS = {"dp_statistics": _statistics_run, "dp_sgd": _dp_sgd_run}


def canary_scores(config: AuditConfig, with_canary: bool, seed: int) -> Scores:
    """``config.trials`` independent releases of one world, projected on the canary direction."""
    world = int(with_canary)
    runs, trials = _split_into_runs(config.trials)
    values, mechanisms = [], set()
    for run in range(runs):
        run_scores, mechanism = _EXPERIMENTS[config.mechanism](config, trials, with_canary,
                                                               _run_seed(seed, world, run))
        values.append(run_scores)
        mechanisms.add((mechanism["sample_rate"], mechanism["steps"]))
    if len(mechanisms) != 1:
        raise RuntimeError(f"the runs reported different mechanisms {sorted(mechanisms)}; "
                           "their scores cannot be pooled")
    sample_rate, steps = mechanisms.pop()
    return Scores(np.concatenate(values)[:config.trials], float(sample_rate), int(steps))


@dataclass(frozen=True)
class AuditResult:
    config: AuditConfig
    accountant: str
    accountant_epsilon: float  # of the mechanism as configured (sigma, C), whatever the breakage
    epsilon_lower_bound: float
    max_certifiable_epsilon: float  # the most the evaluation trials can show
    sample_rate: float
    steps: int
    details: dict  # the held-out test: threshold, region, counts, Clopper-Pearson ends
    seconds: float

    @property
    def expected(self) -> str:
        """A sound mechanism stays at or below the accountant; a broken one must be caught above it."""
        return "below" if self.config.breakage == "none" else "above"

    @property
    def passed(self) -> bool:
        above = self.epsilon_lower_bound > self.accountant_epsilon
        return above if self.expected == "above" else not above

    def to_dict(self) -> dict:
        return {"config": asdict(self.config), "accountant": self.accountant,
                "accountant_epsilon": self.accountant_epsilon, "epsilon_lower_bound": self.epsilon_lower_bound,
                "max_certifiable_epsilon": self.max_certifiable_epsilon, "sample_rate": self.sample_rate,
                "steps": self.steps, "expected": self.expected, "passed": self.passed, "test": self.details,
                "seconds": self.seconds}


def run_audit(config: AuditConfig, seed: int = 0, accountant: str = DEFAULT_ACCOUNTANT,
              confidence: float = CONFIDENCE) -> AuditResult:
    """Audit one configuration: canary experiment, held-out threshold test, accountant comparison."""
    start = time.perf_counter()
    without = canary_scores(config, with_canary=False, seed=seed)
    with_canary = canary_scores(config, with_canary=True, seed=seed)
    if (without.sample_rate, without.steps) != (with_canary.sample_rate, with_canary.steps):
        raise RuntimeError("the two worlds ran different mechanisms; the audit would compare unlike releases")
    bound = audit_bound(without.values, with_canary.values, config.delta, confidence)
    epsilon = compute_epsilon([(config.noise_multiplier, without.sample_rate, without.steps)], config.delta,
                              accountant=accountant)
    return AuditResult(config=config, accountant=accountant, accountant_epsilon=float(epsilon),
                       epsilon_lower_bound=bound.epsilon_lower_bound,
                       max_certifiable_epsilon=max_certifiable_epsilon(bound.evaluation_trials, config.delta,
                                                                       confidence),
                       sample_rate=without.sample_rate, steps=without.steps, details=bound.to_dict(),
                       seconds=time.perf_counter() - start)


def suite(long: bool, trials: int | None = None) -> list[AuditConfig]:
    """The audited configurations: both mechanisms, sound and broken at each setting.

    sigma = 2 at sample rate 1 for one step is the worst case for the canary (epsilon ~2 with
    PRV at delta 1e-5), low enough for a few thousand trials to catch a broken mechanism.
    ``long`` adds two Poisson-subsampled settings, with more trials: q = 0.5 for 2 steps
    (epsilon ~2.7) and q = 0.1 for 10 steps (epsilon ~1.3), each within one epoch. DP-SGD is also
    audited with augmentation multiplicity 4 at the first setting.
    """
    settings = [dict(noise_multiplier=2.0)]
    if long:
        settings += [dict(noise_multiplier=1.5, sample_rate=0.5), dict(noise_multiplier=1.5, sample_rate=0.1)]
    trials = trials or (LONG_TRIALS if long else QUICK_TRIALS)
    configs = [AuditConfig(mechanism=mechanism, breakage=breakage, trials=trials, **setting)
               for setting in settings for mechanism in MECHANISMS for breakage in BREAKAGES]
    return configs + [AuditConfig(mechanism="dp_sgd", breakage=breakage, trials=trials, augmult=4, **settings[0])
                      for breakage in BREAKAGES]
