"""Epsilon of a whole pipeline and noise calibration, behind one table of accountants.

Every DP step of DP-ImgSyn (DP-SGD on the teacher, the DP normalization statistics) is a
Poisson-subsampled Gaussian mechanism, so one Opacus accountant composes them all: its
``history`` is exactly a list of ``(noise_multiplier, sample_rate, steps)``.
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import warnings
from typing import Iterator

import numpy as np
from threadpoolctl import threadpool_limits

from common.errors import DPImgSynError
from common.tables import unique_table
from privacy.sampling import steps_per_epoch

Mechanism = tuple[float, float, int]
"""``(noise_multiplier, sample_rate, steps)`` of one Poisson-subsampled Gaussian mechanism."""

DEFAULT_DELTA = 1e-5
DEFAULT_ACCOUNTANT = "prv"

# PRV discretizes the privacy loss on a grid whose size grows with epsilon and sqrt(steps), and
# peaks at about 200 bytes per point: the ImageNette row of Table 1 needs 2.6e7 points (~5 GB),
# sigma 0.1 over a few thousand steps 1.4e8 (the process gets killed). Refuse beyond ~6.5 GB.
MAX_PRV_GRID_POINTS = 2**25

# Calibration searches noise multipliers in this range and stops at this relative precision.
MIN_CALIBRATED_SIGMA = 1e-3
MAX_CALIBRATED_SIGMA = 1e4
CALIBRATION_REL_TOL = 1e-3


@functools.lru_cache(maxsize=4096)
def _rdp_of_one_step(rate: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    """Opacus's RDP curve of one step (read-only). At fractional orders each value is a Python sum of
    thousands of terms, and every epsilon of the same (rate, sigma) asks for it again: the PRV accountant
    bounds its grid through RDP, twice per call, for each epoch's diagnostic epsilon and each ledger check."""
    curve = np.asarray(_cached_compute_rdp.opacus(q=rate, noise_multiplier=sigma, steps=1, orders=list(orders)))
    curve.flags.writeable = False
    return curve


def _cached_compute_rdp(*, q: float, noise_multiplier: float, steps: int, orders) -> np.ndarray | float:
    """Opacus's ``compute_rdp`` (saved as ``.opacus`` by :func:`_cached_rdp`) bit for bit, cached: it, too,
    multiplies the one-step curve by ``steps``."""
    if isinstance(orders, float):
        return _cached_compute_rdp.opacus(q=q, noise_multiplier=noise_multiplier, steps=steps, orders=orders)
    return _rdp_of_one_step(float(q), float(noise_multiplier), tuple(orders)) * steps


@contextlib.contextmanager
def _cached_rdp() -> Iterator[None]:
    """Opacus's accountants with their RDP curves computed once per (rate, sigma, orders) in this process."""
    from opacus.accountants.analysis import rdp

    if rdp.compute_rdp is _cached_compute_rdp:  # already inside
        yield
        return
    _cached_compute_rdp.opacus = rdp.compute_rdp  # type: ignore[attr-defined]
    rdp.compute_rdp = _cached_compute_rdp
    try:
        yield
    finally:
        rdp.compute_rdp = _cached_compute_rdp.opacus  # type: ignore[attr-defined]


# Opacus is imported on first use: importing it takes seconds, and `--help` should not wait.
def _prv_accountant():
    from opacus.accountants import PRVAccountant

    return PRVAccountant()


def _rdp_accountant():
    from opacus.accountants import RDPAccountant

    return RDPAccountant()


ACCOUNTANTS = unique_table("accountant", (("prv", _prv_accountant), ("rdp", _rdp_accountant)))


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise DPImgSynError(f"unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise DPImgSynError(f"delta must be a number in (0, 1), got {delta!r}")


def _check_int(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise DPImgSynError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_sample_rate(sample_rate, where: str) -> float:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) or not 0 < sample_rate <= 1:
        raise DPImgSynError(f"{where}: sample rate must be in (0, 1], got {sample_rate!r}")
    return float(sample_rate)


def _check_noise_multiplier(noise_multiplier, where: str) -> float:
    """Zero is allowed (a noiseless, non-private mechanism); negative or non-finite is a mistake."""
    if (isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, numbers.Real)
            or not math.isfinite(noise_multiplier) or noise_multiplier < 0):
        raise DPImgSynError(
            f"{where}: noise multiplier must be a finite number > 0 (0 = no noise, not private), "
            f"got {noise_multiplier!r}"
        )
    return float(noise_multiplier)


def validate_mechanism(mechanism, where: str = "mechanism") -> Mechanism:
    """A checked ``(noise_multiplier, sample_rate, steps)``; ``where`` names it in the error."""
    if not isinstance(mechanism, (tuple, list)) or len(mechanism) != 3:
        raise DPImgSynError(f"{where} must be (noise_multiplier, sample_rate, steps), got {mechanism!r}")
    return (_check_noise_multiplier(mechanism[0], where), _check_sample_rate(mechanism[1], where),
            _check_int(mechanism[2], f"{where}: steps", 0))


def _merge(mechanisms: list[Mechanism]) -> tuple[Mechanism, ...]:
    """Validate, drop empty mechanisms, and merge identical ones.

    Composition is commutative, so k steps of one mechanism followed later by m more steps are
    k + m self-compositions; merging gives the same epsilon and halves the PRV work on Table 1.
    """
    steps_by_mechanism: dict[tuple[float, float], int] = {}
    for index, mechanism in enumerate(mechanisms):
        sigma, rate, steps = validate_mechanism(mechanism, f"mechanism {index}")
        if steps:
            steps_by_mechanism[sigma, rate] = steps_by_mechanism.get((sigma, rate), 0) + steps
    return tuple((sigma, rate, steps) for (sigma, rate), steps in steps_by_mechanism.items())


def _prv_grid_points(history: tuple[Mechanism, ...], delta: float) -> int:
    """Grid size Opacus's PRV accountant would allocate, computed cheaply (through RDP).

    Uses the errors that ``PRVAccountant.get_epsilon`` defaults to (eps 0.01, delta / 1000).
    """
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    prvs = [PoissonSubsampledGaussianPRV(rate, sigma) for sigma, rate, _ in history]
    return _prv_accountant()._get_domain(
        prvs=prvs, num_self_compositions=[steps for *_, steps in history],
        eps_error=0.01, delta_error=delta / 1000,
    ).size


@functools.lru_cache(maxsize=256)
def _epsilon_of_history(history: tuple[Mechanism, ...], delta: float, accountant: str) -> float:
    """One accountant call over an already validated, merged history (cached: PRV can take seconds)."""
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    with _cached_rdp():
        return _epsilon_of_checked_history(history, delta, accountant)


def _epsilon_of_checked_history(history: tuple[Mechanism, ...], delta: float, accountant: str) -> float:
    """The accountant's epsilon of a history of noisy mechanisms; its numerical failures as user errors."""
    try:
        if accountant == "prv":
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                grid_points = _prv_grid_points(history, delta)
            if grid_points > MAX_PRV_GRID_POINTS:
                raise DPImgSynError(
                    f"the PRV accountant would need {grid_points:,} grid points (too much memory) for this "
                    "weak a guarantee; use a larger noise multiplier, fewer steps, or accountant 'rdp'"
                )
        tracker = ACCOUNTANTS[accountant]()
        tracker.history = list(history)
        # One BLAS thread: PRV's sums round differently with more (sigma calibrated for epsilon 10 moved by
        # 1e-10 between 1 and 2 threads), and a rerun on another thread count would then refuse to resume
        # a stage whose recorded sigma no longer matches.
        with np.errstate(all="ignore"), warnings.catch_warnings(), threadpool_limits(limits=1):
            warnings.simplefilter("ignore")  # Opacus warns about alpha ranges and numpy overflows it handles
            epsilon = float(tracker.get_epsilon(delta=delta))
    except (ArithmeticError, ValueError, RuntimeError) as error:
        # The accountants' numerics give up on extreme inputs (a delta near 0 or 1, far too little noise).
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise DPImgSynError(
            f"accountant {accountant!r} cannot compute epsilon at delta {delta:g} for {list(history)} ({reason}); "
            "use a delta such as 1e-5, more noise or fewer steps, or another accountant"
        ) from None
    # RDP's conversion goes below 0 for a delta near 1; (eps < 0, delta)-DP is (0, delta)-DP.
    return max(epsilon, 0.0) if not math.isnan(epsilon) else math.inf


def compute_epsilon(mechanisms: list[Mechanism], delta: float, accountant: str = DEFAULT_ACCOUNTANT) -> float:
    """Epsilon of the composition of all ``mechanisms`` at ``delta``, in one accountant call.

    A mechanism with noise multiplier 0 adds no noise, so the result is ``math.inf``.
    Mechanisms with 0 steps contribute nothing; an empty list gives 0.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    if not isinstance(mechanisms, (list, tuple)):
        raise DPImgSynError(f"mechanisms must be a list of (noise_multiplier, sample_rate, steps), got {mechanisms!r}")
    return _epsilon_of_history(_merge(list(mechanisms)), float(delta), accountant)


RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
"""Opacus's RDP accountant's orders, so that a curve over them converts to exactly that accountant's epsilon."""


def rdp_curve(mechanisms: list[Mechanism]) -> np.ndarray:
    """Renyi DP of the composition of ``mechanisms`` at every order of ``RDP_ORDERS`` (inf if one is noiseless).

    For bounds that are stated in RDP and have no PRV form (paid hyper-parameter tuning, ``privacy.tuning``).
    """
    curve = np.zeros(len(RDP_ORDERS))
    for sigma, rate, steps in _merge(list(mechanisms)):
        curve += _rdp_of_mechanism(sigma, rate, steps)
    return curve


@functools.lru_cache(maxsize=256)
def _rdp_of_mechanism(sigma: float, rate: float, steps: int) -> np.ndarray:
    """One validated mechanism's RDP curve (cached: ledgers are recomputed whenever an artifact is read)."""
    from opacus.accountants.analysis import rdp

    if sigma == 0:
        curve = np.full(len(RDP_ORDERS), math.inf)
    else:
        with np.errstate(all="ignore"), warnings.catch_warnings(), _cached_rdp():
            warnings.simplefilter("ignore")
            curve = np.asarray(rdp.compute_rdp(q=rate, noise_multiplier=sigma, steps=steps, orders=list(RDP_ORDERS)),
                               dtype=np.float64)
    curve.flags.writeable = False
    return curve


def epsilon_of_rdp(curve: np.ndarray, delta: float) -> float:
    """Epsilon at ``delta`` of an RDP curve over ``RDP_ORDERS``, by the RDP accountant's own conversion."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    _check_delta(delta)
    curve = np.asarray(curve, dtype=np.float64)
    if curve.shape != (len(RDP_ORDERS),) or np.isnan(curve).any() or (curve < 0).any():
        raise DPImgSynError(f"an RDP curve needs one value >= 0 per order ({len(RDP_ORDERS)}), got {curve!r}")
    if np.isinf(curve).all():
        return math.inf
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns when the best order is at an end of the range
        epsilon, _ = get_privacy_spent(orders=list(RDP_ORDERS), rdp=curve, delta=delta)
    return max(float(epsilon), 0.0)


def _check_target(target_epsilon: float) -> None:
    if (isinstance(target_epsilon, bool) or not isinstance(target_epsilon, numbers.Real)
            or not math.isfinite(target_epsilon) or target_epsilon <= 0):
        raise DPImgSynError(f"target epsilon must be a finite number > 0, got {target_epsilon!r}")


def _check_plan(plan: list[tuple[float, int]], ratios: list[float] | None) -> list[float]:
    if not isinstance(plan, (list, tuple)) or not plan:
        raise DPImgSynError("the plan must list (sample_rate, steps) for every DP mechanism of the pipeline")
    for index, item in enumerate(plan):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DPImgSynError(f"plan entry {index} must be (sample_rate, steps), got {item!r}")
        _check_sample_rate(item[0], f"plan entry {index}")
        _check_int(item[1], f"plan entry {index}: steps", 0)
    if not any(steps for _, steps in plan):
        raise DPImgSynError("the plan has no steps, so no noise is needed; check epochs and batch sizes")
    if ratios is None:
        return [1.0] * len(plan)
    if len(ratios) != len(plan):
        raise DPImgSynError(f"got {len(ratios)} noise ratios for {len(plan)} planned mechanisms; give one per mechanism")
    for ratio in ratios:
        if (isinstance(ratio, bool) or not isinstance(ratio, numbers.Real)
                or not math.isfinite(ratio) or ratio <= 0):
            raise DPImgSynError(f"noise ratios must be finite numbers > 0, got {ratio!r}")
    return [float(r) for r in ratios]


def calibrate_noise_multiplier(target_epsilon: float, delta: float, plan: list[tuple[float, int]],
                               accountant: str = DEFAULT_ACCOUNTANT, ratios: list[float] | None = None
                               ) -> float | list[float]:
    """Smallest noise multiplier whose composed epsilon over the whole ``plan`` meets the target.

    ``plan`` lists ``(sample_rate, steps)`` of every DP mechanism of the pipeline (DP-SGD and the
    DP statistics), because the budget covers the release, not one stage. One shared sigma by
    default (as in the paper's Table 1, returned as a float); with ``ratios`` mechanism i gets
    ``ratios[i] * s`` and the list of those sigmas is returned. A bracketed search on a log
    scale; the answer meets the target and is within ``CALIBRATION_REL_TOL`` of the smallest that does.
    """
    _check_target(target_epsilon)
    _check_delta(delta)
    _check_accountant(accountant)
    scales = _check_plan(plan, ratios)

    def sigmas(scale: float) -> list[float]:
        return [ratio * scale for ratio in scales]

    def excess(scale: float) -> float:
        """log(epsilon / target): <= 0 where the target is met; decreasing in ``scale``."""
        mechanisms = [(sigma, rate, steps) for sigma, (rate, steps) in zip(sigmas(scale), plan)]
        try:
            epsilon = compute_epsilon(mechanisms, delta, accountant)
        except DPImgSynError:
            return math.inf  # accountants give up only on far too weak guarantees: this scale is too small
        return math.log(epsilon / target_epsilon) if epsilon > 0 else -math.inf

    low, high = _bracket(excess, target_epsilon, delta, accountant)
    return sigmas(_refine(excess, low, high)) if ratios is not None else _refine(excess, low, high)


def _bracket(excess, target_epsilon: float, delta: float, accountant: str) -> tuple[float, float]:
    """Scales ``(low, high)`` = (misses the target, meets it), a factor 2 apart, searched from 1."""
    low = high = 1.0
    if excess(high) <= 0:
        while excess(low) <= 0:
            high, low = low, low / 2
            if low < MIN_CALIBRATED_SIGMA:
                raise DPImgSynError(
                    f"target epsilon {target_epsilon} is met even with noise multiplier {high:.2g}; "
                    "choose a smaller target epsilon or set the noise multiplier directly"
                )
    else:
        while excess(high) > 0:
            low, high = high, high * 2
            if high > MAX_CALIBRATED_SIGMA:
                raise DPImgSynError(
                    f"target epsilon {target_epsilon} at delta {delta} is unreachable with accountant "
                    f"{accountant!r} even with noise multiplier {MAX_CALIBRATED_SIGMA:g}; choose a larger "
                    "target epsilon or delta, or fewer steps (fewer epochs or a smaller sample rate)"
                )
    return low, high


def _refine(excess, low: float, high: float) -> float:
    """Shrink the bracket to ``CALIBRATION_REL_TOL``; return its end that meets the target.

    log(epsilon) is nearly linear in log(sigma), so regula falsi in log-log space (Illinois
    variant) needs a handful of accountant calls where bisection needs ten; every step moves at
    least half the tolerance away from the bracket's ends so that the bracket itself closes.
    """
    f_low, f_high = excess(low), excess(high)
    min_step = math.log1p(CALIBRATION_REL_TOL) / 2
    kept = None
    while math.log(high / low) > math.log1p(CALIBRATION_REL_TOL):
        x_low, x_high = math.log(low), math.log(high)
        if math.isfinite(f_low) and math.isfinite(f_high) and f_low > f_high:
            x = x_low + f_low * (x_high - x_low) / (f_low - f_high)
        else:
            x = (x_low + x_high) / 2
        scale = math.exp(min(max(x, x_low + min_step), x_high - min_step))
        f = excess(scale)
        if f <= 0:
            high, f_high = scale, f
            f_low, kept = (f_low / 2 if kept == "low" else f_low), "low"
        else:
            low, f_low = scale, f
            f_high, kept = (f_high / 2 if kept == "high" else f_high), "high"
    return high  # exactly the value whose epsilon was checked


def poisson_plan(train_size: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """``(sample_rate, steps)`` of a Poisson-sampled stage: rate B/N, epochs * ceil(N/B) steps."""
    train_size = _check_int(train_size, "train size", 1)
    batch_size = _check_int(batch_size, "batch size", 1)
    epochs = _check_int(epochs, "epochs", 0)
    if batch_size > train_size:
        raise DPImgSynError(f"batch size {batch_size} exceeds the training set size {train_size}")
    return batch_size / train_size, epochs * steps_per_epoch(train_size, batch_size)
