"""The privacy ledger: a plain, JSON-able record of every mechanism applied to the private data.

Every artifact carries a *privacy block* ``{"epsilon", "delta", "accountant", "ledger"}`` whose
epsilon is recomputed from the ledger whenever a stage consumes the artifact, so a block that
lost its ledger or whose epsilon was edited is refused ("privacy violation").

Four kinds of entries:

- a DP mechanism (:func:`mechanism_entry`): a Poisson-subsampled Gaussian mechanism; all of them
  are composed by one accountant call;
- a paid hyper-parameter selection (:func:`tuning_entry`): the best of a random number of runs over public
  candidates (``privacy.tuning``). Its bound exists in RDP only, so a ledger holding one is accounted with the
  RDP accountant (its curve plus the curves of the other mechanisms, converted once) and refuses any other;
- a non-private step (:func:`non_private_entry`), e.g. an ablation without noise: epsilon is inf;
- a guarantee claimed by the source of an imported artifact (:func:`claimed_entry`), which we
  cannot re-derive. Claims compose with the rest by basic composition: their epsilons and deltas
  are added to the accountant's, so the block's ``delta`` is the accountant's delta (when there
  are accountable mechanisms) plus the claimed deltas.
"""
from __future__ import annotations

import copy
import json
import math
import numbers

from common.errors import DPImgSynError
from privacy.accountant import (DEFAULT_ACCOUNTANT, DEFAULT_DELTA, Mechanism, compute_epsilon, epsilon_of_rdp,
                                rdp_curve, validate_mechanism)
from privacy.tuning import TRUNCATED_NEGATIVE_BINOMIAL, RunCount, run_rdp, selection_rdp

NON_PRIVATE = "non_private"
CLAIMED = "claimed_by_source"
TUNING = "paid_tuning"
TUNING_ACCOUNTANT = "rdp"
MECHANISM_FIELDS = ("noise_multiplier", "sample_rate", "steps", "max_norm")
RESERVED_EXTRA_KEYS = {NON_PRIVATE, CLAIMED, TUNING}
BLOCK_KEYS = ("epsilon", "delta", "accountant", "ledger")

# Stored and recomputed epsilon must agree this closely (recomputation is deterministic; the
# slack only absorbs accountant-version noise). Anything further apart is an altered block.
EPSILON_REL_TOL = 1e-3


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _json_checked(entry: dict) -> dict:
    try:
        json.dumps(entry)
    except (TypeError, ValueError) as error:
        raise DPImgSynError(f"ledger entry {entry.get('name')!r} is not JSON-able: {error}") from None
    return entry


def _check_extra(extra: dict) -> None:
    """Extras may say ``non_private=False`` but never set a marker that changes the entry's kind."""
    reserved = sorted(key for key in RESERVED_EXTRA_KEYS & extra.keys() if extra[key] is not False)
    if reserved:
        raise DPImgSynError(f"ledger entry extras may not set the markers {reserved}; use "
                            "non_private_entry or claimed_entry for those kinds of entry")


def _check_name(name) -> str:
    if not isinstance(name, str) or not name:
        raise DPImgSynError(f"a ledger entry needs a non-empty name, got {name!r}")
    return name


def mechanism_entry(name: str, noise_multiplier: float, sample_rate: float, steps: int, max_norm: float,
                    **extra) -> dict:
    """Ledger entry of a Poisson-subsampled Gaussian mechanism (DP-SGD, DP statistics)."""
    _check_extra(extra)
    if not _is_real(max_norm) or not math.isfinite(max_norm) or max_norm <= 0:
        raise DPImgSynError(f"ledger entry {name!r}: clipping norm must be a finite number > 0, got {max_norm!r}")
    sigma, rate, steps = validate_mechanism((noise_multiplier, sample_rate, steps), f"ledger entry {name!r}")
    return _json_checked({"name": _check_name(name), "noise_multiplier": sigma, "sample_rate": rate,
                          "steps": steps, "max_norm": float(max_norm), **extra})


def non_private_entry(name: str, **extra) -> dict:
    """Ledger entry of a step that touched private data without a DP guarantee (epsilon = inf)."""
    _check_extra(extra)
    return _json_checked({"name": _check_name(name), NON_PRIVATE: True, **extra})


def claimed_entry(name: str, epsilon: float, delta: float, **extra) -> dict:
    """Ledger entry of an (epsilon, delta) guarantee stated by an imported artifact's source."""
    _check_extra(extra)
    entry = {"name": _check_name(name), CLAIMED: True, "epsilon": epsilon, "delta": delta}
    _check_claim(entry, name)
    entry.update(epsilon=float(epsilon), delta=float(delta), **extra)
    return _json_checked(entry)


def tuning_entry(name: str, distribution: RunCount, candidates: list[list[dict]], **extra) -> dict:
    """Ledger entry of a paid selection: the best of K runs, K ~ ``distribution``, each run one candidate drawn
    uniformly from ``candidates``, each candidate the list of its mechanism entries (DP-SGD, the noisy score).

    Every candidate is listed, run or not: the guarantee covers the random choice, and the list is public.
    """
    _check_extra(extra)
    entry = {"name": _check_name(name), TUNING: True, "distribution": distribution.kind,
             "mean_runs": float(distribution.mean),
             **({"shape": float(distribution.shape)} if distribution.kind == TRUNCATED_NEGATIVE_BINOMIAL else {}),
             "candidates": [list(mechanisms) for mechanisms in candidates], **extra}
    _tuning_of(entry, f"ledger entry {name!r}")
    return _json_checked(copy.deepcopy(entry))


def _tuning_of(entry: dict, where: str) -> tuple[RunCount, list[list[Mechanism]]]:
    """The distribution of the number of runs and every candidate's mechanisms of a tuning entry (validated)."""
    distribution = RunCount(entry.get("distribution"), entry.get("mean_runs"), entry.get("shape", 1.0))
    candidates = entry.get("candidates")
    if not isinstance(candidates, list) or not candidates or not all(
            isinstance(mechanisms, list) and mechanisms for mechanisms in candidates):
        raise DPImgSynError(f"{where}: a tuning entry lists each candidate's mechanism entries (a non-empty list "
                            "of non-empty lists)")
    runs = []
    for number, mechanisms in enumerate(candidates):
        if not all(isinstance(item, dict) and not item.keys() & RESERVED_EXTRA_KEYS for item in mechanisms):
            raise DPImgSynError(f"{where}: candidate {number} may list only DP mechanism entries")
        runs.append([_mechanism_of(item, f"{where}, candidate {number}") for item in mechanisms])
    return distribution, runs


def _check_claim(entry: dict, where: str) -> None:
    epsilon, delta = entry.get("epsilon"), entry.get("delta")
    if not _is_real(epsilon) or math.isnan(epsilon) or epsilon < 0:
        raise DPImgSynError(f"{where}: claimed epsilon must be a number >= 0, got {epsilon!r}")
    if not _is_real(delta) or not 0 <= delta < 1:
        raise DPImgSynError(f"{where}: claimed delta must be a number in [0, 1), got {delta!r}")


def _mechanism_of(entry: dict, where: str) -> Mechanism:
    missing = [key for key in MECHANISM_FIELDS if key not in entry]
    if missing:
        raise DPImgSynError(f"{where}: DP mechanism entry lacks {missing}")
    return validate_mechanism((entry["noise_multiplier"], entry["sample_rate"], entry["steps"]), where)


def ledger_mechanisms(ledger: list[dict]) -> list[Mechanism]:
    """The accountable mechanisms of a ledger, in order (every entry is validated).

    A non-private entry becomes ``(0.0, 1.0, 1)`` (one noiseless step), so that
    ``compute_epsilon`` of the result is inf; claimed and tuning entries are not single mechanisms and
    are skipped (:func:`privacy_block` counts them).
    """
    if not isinstance(ledger, list):
        raise DPImgSynError(f"a privacy ledger must be a list of entries, got {type(ledger).__name__}")
    mechanisms = []
    for index, entry in enumerate(ledger):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise DPImgSynError(f"ledger entry {index} must be a dict with a name, got {entry!r}")
        where = f"ledger entry {index} ({entry['name']})"
        if entry.get(NON_PRIVATE) is True:
            mechanisms.append((0.0, 1.0, 1))
        elif entry.get(CLAIMED) is True:
            _check_claim(entry, where)
        elif entry.get(TUNING) is True:
            _tuning_of(entry, where)
        else:
            mechanisms.append(_mechanism_of(entry, where))
    return mechanisms


def _claims(ledger: list[dict]) -> list[dict]:
    return [entry for entry in ledger if entry.get(CLAIMED) is True]


def _tunings(ledger: list[dict]) -> list[dict]:
    return [entry for entry in ledger if entry.get(TUNING) is True]


def _tuned_epsilon(mechanisms: list[Mechanism], tunings: list[dict], delta: float, accountant: str) -> float:
    """Epsilon of mechanisms and paid selections together: every RDP curve summed, then converted once."""
    if accountant != TUNING_ACCOUNTANT:
        raise DPImgSynError(f"a ledger with paid tuning can only be accounted in RDP (its bound has no "
                            f"{accountant!r} form); use --accountant {TUNING_ACCOUNTANT}")
    curve = rdp_curve(mechanisms)
    for entry in tunings:
        distribution, candidates = _tuning_of(entry, f"ledger entry ({entry['name']})")
        curve = curve + selection_rdp(run_rdp(candidates), distribution)
    return epsilon_of_rdp(curve, delta)


def _guarantee(ledger: list[dict], accountant_delta: float, accountant: str) -> tuple[float, float]:
    """(epsilon, delta) of the whole ledger: accountant composition plus basic composition of claims."""
    mechanisms = ledger_mechanisms(ledger)
    claims, tunings = _claims(ledger), _tunings(ledger)
    if tunings:
        epsilon = _tuned_epsilon(mechanisms, tunings, accountant_delta, accountant)
    else:
        epsilon = compute_epsilon(mechanisms, accountant_delta, accountant)
    epsilon += sum(float(claim["epsilon"]) for claim in claims)
    delta = (accountant_delta if mechanisms or tunings else 0.0) + sum(float(claim["delta"]) for claim in claims)
    return epsilon, delta


def privacy_block(ledger: list[dict], delta: float, accountant: str = DEFAULT_ACCOUNTANT) -> dict:
    """The block every artifact carries: epsilon and delta of the whole ledger, plus its entries."""
    if not isinstance(ledger, list) or not ledger:
        raise DPImgSynError("a privacy ledger must list every mechanism applied to the private data; it is empty")
    entries = copy.deepcopy(ledger)
    for entry in entries:
        _json_checked(entry)
    epsilon, total_delta = _guarantee(entries, delta, accountant)
    return {"epsilon": epsilon, "delta": total_delta, "accountant": accountant, "ledger": entries}


def _violation(what: str, problem: str) -> DPImgSynError:
    return DPImgSynError(f"privacy violation: {what} {problem}")


def _recomputed(block: dict, what: str) -> tuple[float, float]:
    """Recompute the block's (epsilon, delta) from its ledger; structural problems are violations."""
    ledger, accountant, delta = block["ledger"], block["accountant"], block["delta"]
    try:
        has_mechanisms = bool(ledger_mechanisms(ledger) or _tunings(ledger))  # validates every entry first
        claims_delta = sum(float(claim["delta"]) for claim in _claims(ledger))
        accountant_delta = delta - claims_delta if has_mechanisms else DEFAULT_DELTA
        return _guarantee(ledger, accountant_delta, accountant)
    except (DPImgSynError, KeyError, TypeError) as error:
        raise _violation(what, f"has a malformed privacy ledger ({error}); refusing it") from None


def require_privacy_block(checkpoint: dict, what: str, allow_non_private: bool = False) -> dict:
    """The privacy block of a consumed artifact, after checking it can be trusted.

    Refuses (``DPImgSynError``, "privacy violation") a missing or malformed block, a stored epsilon
    or delta that its ledger does not reproduce, and an infinite epsilon unless
    ``allow_non_private``. With ``allow_non_private`` a missing block is replaced by a
    non-private one, so downstream artifacts record epsilon = inf.
    """
    block = checkpoint.get("privacy") if isinstance(checkpoint, dict) else None
    if block is None:
        if allow_non_private:
            return privacy_block([non_private_entry(f"{what} (no privacy ledger)")], DEFAULT_DELTA)
        raise _violation(what, "has no privacy ledger, so its privacy cost is unknown; use an artifact written "
                               "by the DP stages, or allow non-private inputs explicitly (epsilon is then "
                               "recorded as infinite)")
    if not isinstance(block, dict) or any(key not in block for key in BLOCK_KEYS):
        raise _violation(what, f"has a malformed privacy block (needs the keys {list(BLOCK_KEYS)}); refusing it")
    epsilon, delta = block["epsilon"], block["delta"]
    if not _is_real(epsilon) or math.isnan(epsilon) or not _is_real(delta) or not isinstance(block["ledger"], list):
        raise _violation(what, "has a malformed privacy block (epsilon, delta must be numbers, ledger a list)")
    if not block["ledger"]:
        raise _violation(what, "has an empty privacy ledger; refusing it")
    expected_epsilon, expected_delta = _recomputed(block, what)
    epsilon_matches = (epsilon == expected_epsilon
                       or math.isclose(epsilon, expected_epsilon, rel_tol=EPSILON_REL_TOL, abs_tol=1e-9))
    if not epsilon_matches or not math.isclose(delta, expected_delta, rel_tol=1e-9, abs_tol=1e-15):
        raise _violation(what, f"states (epsilon {epsilon}, delta {delta}) but its ledger gives (epsilon "
                               f"{expected_epsilon:.6g}, delta {expected_delta:.3g}); the block was altered, "
                               "refusing it")
    if math.isinf(epsilon) and not allow_non_private:
        names = [entry["name"] for entry in block["ledger"] if entry.get(NON_PRIVATE) is True]
        raise _violation(what, f"is not differentially private (epsilon = inf; non-private steps: {names}); "
                               "allow non-private inputs explicitly to use it anyway")
    return copy.deepcopy(block)
