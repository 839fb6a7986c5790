"""Paid tuning of the teacher: the best of a random number of DP-SGD runs over public candidates, paid in the ledger.

Papernot & Steinke's random stopping (``privacy/tuning.py``): the number of runs K and each run's candidate are
drawn before any private record is read; each run is stage 1 with its candidate's settings, scored on the
validation part (records disjoint from the training part) by a noisy count of correct predictions; only the best
run's teacher is kept, with a ledger whose one entry lists every candidate, so its epsilon is the selection's.
K, the other runs and every score stay local; the other runs' teachers are deleted.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path


import privacy
import registry
from common.cli import config_from_mapping, content_settings, fraction, option, positive_float
from common.errors import DPImgSynError
from common.files import atomic_write_text, read_yaml, with_suffix_once
from common.runtime import keyed_generator, keyed_seed, resolve_device
from privacy.checkpoint import completed_dppt
from privacy.ledger import TUNING_ACCOUNTANT
from privacy.sampling import private_seed
from privacy.split import split_by_content
from privacy.tuning import (DISTRIBUTIONS, TRUNCATED_NEGATIVE_BINOMIAL, RunCount, draw_candidate, draw_run_count,
                            noisy_count, score_mechanism)
from stages.teacher import TeacherConfig, default_output, statistics_sigma, train_teacher
from training.accuracy import evaluate

# Settings that are the selection's, not a candidate's: the data, the guarantee's terms, where and how it runs.
NOT_TUNABLE = ("dataset", "val_split", "delta", "accountant", "target_epsilon", "recipe", "seed", "secure_mode",
               "output", "suffix", "device", "data_root", "download", "progress", "image_size", "channels")


@dataclass(frozen=True, kw_only=True)
class TuningConfig(TeacherConfig):
    """Stage 1 with paid tuning: the teacher's flags are every candidate's defaults, which the list overrides."""

    candidates: str = option(help="YAML/JSON file {candidates: [settings, ...]}: each candidate a mapping of teacher "
                             "settings (lr, epochs, train_batch_size, max_norm, noise_multiplier, model, ...) that "
                             "override these flags. Public: chosen without the private data", run_only=True)
    mean_runs: float = option(5.0, "mean number of runs K (each a random candidate); the cost grows with log(mean)",
                              parse=positive_float)
    distribution: str = option(TRUNCATED_NEGATIVE_BINOMIAL, "distribution of K (Papernot & Steinke 2022)",
                               choices=DISTRIBUTIONS)
    shape: float = option(1.0, "eta > -1 of the truncated negative binomial (1: geometric, 0: logarithmic)")
    score_noise: float = option(5.0, "noise multiplier of each run's score: std of the Gaussian noise added to its "
                                "count of correct validation predictions (one record changes it by at most 1)",
                                parse=positive_float)
    val_split: float = option(0.1, "expected fraction of the private training records held out to score the runs "
                              "(a record's side is fixed by a hash of its content)", parse=fraction)
    accountant: str = option(TUNING_ACCOUNTANT, "privacy accountant (paid tuning has an RDP bound only)",
                             choices=(TUNING_ACCOUNTANT,))


def read_candidates(config: TuningConfig) -> list[TeacherConfig]:
    """The candidate list, each entry checked as teacher settings over the config's own."""
    if not Path(config.candidates).is_file():
        raise DPImgSynError(f"candidates file {config.candidates} not found; give --candidates a YAML or JSON file")
    raw = read_yaml(config.candidates).get("candidates")
    if not isinstance(raw, list) or not raw:
        raise DPImgSynError(f"{config.candidates} must hold 'candidates:', a non-empty list of teacher settings")
    base = {field.name: getattr(config, field.name) for field in dataclasses.fields(TeacherConfig)}
    candidates = []
    for index, settings in enumerate(raw):
        where = f"candidates[{index}]."
        if not isinstance(settings, dict):
            raise DPImgSynError(f"config: {where.rstrip('.')} must be a mapping of teacher settings")
        fixed = [key for key in NOT_TUNABLE if key in settings]
        if fixed:
            raise DPImgSynError(f"config: key '{where}{fixed[0]}' is the selection's, not a candidate's; set it "
                                "as a flag of the tuning")
        candidates.append(config_from_mapping(TeacherConfig, settings, where,
                                              fixed={key: value for key, value in base.items() if key not in settings}))
    return candidates


def _recorded(candidate: TeacherConfig) -> dict:
    """What a candidate is, as recorded: its content settings but the selection's (no dataset path)."""
    return {key: value for key, value in content_settings(candidate).items() if key not in NOT_TUNABLE}


def _sources(config: TuningConfig) -> tuple[privacy.RandomSource, privacy.RandomSource, int | None]:
    """Independent streams for the draws of K and candidates, and for the scores' noise, and the runs' seed key:
    the operating system's in secure mode, else keyed by the (secret) seed, fresh from the OS when none is given."""
    seed = private_seed(config.seed, config.secure_mode)
    if seed is None:
        return privacy.OS_RANDOM, privacy.OS_RANDOM, None
    return keyed_generator(seed, 0), keyed_generator(seed, 1), seed


def _candidate_entries(candidate: TeacherConfig, num_examples: int, score_noise: float) -> list[dict]:
    """One candidate's mechanisms as ledger entries: its DP-SGD plan on the N training records, its noisy score."""
    rate, steps = privacy.poisson_plan(num_examples, candidate.train_batch_size, candidate.epochs)
    return [privacy.mechanism_entry("dp_sgd", candidate.noise_multiplier, rate, steps, candidate.max_norm,
                                    epochs=candidate.epochs, batch_size=candidate.train_batch_size, stage="teacher"),
            privacy.mechanism_entry("noisy_score", *score_mechanism(score_noise), 1.0, stage="tuning")]


def _drawn_runs(distribution: RunCount, count: int, source: privacy.RandomSource, state_file: Path,
                settings: dict) -> list[int]:
    """Each run's candidate, drawn before any private record is read, or read back from a killed selection's state
    (owner-only: who reads it learns K; a rerun continues the same selection rather than drawing a new one)."""
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if state.get("settings") == json.loads(json.dumps(settings)):
            return state["runs"]
    runs = [draw_candidate(count, source) for _ in range(draw_run_count(distribution, source))]
    atomic_write_text(state_file, json.dumps({"settings": settings, "runs": runs}), private=True)
    return runs


def tune_teacher(config: TuningConfig) -> Path:
    """Run (or resume) the paid selection; return the path of the best run's teacher, with the selection's ledger."""
    if not config.dataset:
        raise DPImgSynError("--dataset is required")
    if not config.val_split:
        raise DPImgSynError("paid tuning scores its runs on a validation part: give --val_split (e.g. 0.1)")
    if config.target_epsilon is not None or config.recipe is not None:
        raise DPImgSynError("paid tuning lists every candidate's noise in its ledger: give noise_multiplier (flag or "
                            "candidates), not --target_epsilon or --recipe; the total is printed before training")
    distribution = RunCount(config.distribution, config.mean_runs, config.shape)
    candidates = read_candidates(config)
    output = with_suffix_once(config.output or default_output(replace(config, suffix=config.suffix + "tuned")), ".dppt")
    settings = {**content_settings(config), "dataset": registry.artifact_name(config.dataset),
                "candidates": [_recorded(candidate) for candidate in candidates]}
    if completed_dppt(output, "tuning_settings", settings):
        return output
    view, _ = registry.folder_view(config.dataset, config.image_size, config.channels)
    _, train_set, _ = registry.get_dataset(config.dataset, config.data_root, config.download, **view)
    train_set, val_set = split_by_content(train_set, config.val_split)
    ledger = [privacy.tuning_entry("paid_tuning", distribution,
                                   [_candidate_entries(candidate, len(train_set), config.score_noise)
                                    for candidate in candidates], candidates_file=Path(config.candidates).name)]
    block = privacy.privacy_block(ledger, config.delta, TUNING_ACCOUNTANT)
    print(f"paid tuning: {len(candidates)} candidates, K ~ {config.distribution} of mean {config.mean_runs:g}: "
          f"epsilon {block['epsilon']:.3f} at delta {config.delta:g} ({TUNING_ACCOUNTANT}) before the DP statistics")
    draws, noise, seed = _sources(config)
    runs_dir = with_suffix_once(output, ".runs")  # the runs' teachers, logs and draws: local, deleted at the end
    runs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    runs = _drawn_runs(distribution, len(candidates), draws, runs_dir / "draws.json", settings)
    if not runs:
        raise DPImgSynError("K = 0 runs were drawn (Poisson, probability exp(-mean)): the selection trains and "
                            f"releases nothing; {runs_dir} keeps that draw, so a rerun does the same")
    print(f"{len(runs)} runs drawn [local only: K and the runs' scores never enter an artifact]")
    device = resolve_device(config.device)
    scores = []
    for number, index in enumerate(runs):
        run_config = replace(candidates[index], output=str(runs_dir / f"run_{number}.dppt"),
                             seed=None if seed is None else keyed_seed(seed, 2, number) >> 1,
                             secure_mode=config.secure_mode, device=config.device, progress=config.progress)
        checkpoint = privacy.load_dppt(train_teacher(run_config))
        ran, planned = checkpoint["privacy"]["ledger"][0], ledger[0]["candidates"][index][0]
        if any(ran.get(key) != planned[key] for key in ("noise_multiplier", "sample_rate", "steps", "max_norm")):
            raise DPImgSynError(f"run {number} (candidate {index}) did not run its planned DP-SGD; refusing it")
        model = registry.model_from_checkpoint(checkpoint, f"run {number}").to(device)
        correct = round(evaluate(model, val_set, device) * len(val_set))
        scores.append(noisy_count(correct, config.score_noise, noise))
    best = max(range(len(runs)), key=scores.__getitem__)
    chosen = candidates[runs[best]]
    statistics = privacy.mechanism_entry("dp_statistics", statistics_sigma(chosen), *privacy.poisson_plan(
        len(train_set), chosen.stats_batch_size, chosen.stats_epochs), 1.0)
    checkpoint = privacy.load_dppt(runs_dir / f"run_{best}.dppt")
    total = privacy.privacy_block(ledger + [statistics], config.delta, TUNING_ACCOUNTANT)["epsilon"]
    plan = dict(checkpoint["plan"], target_epsilon=None, accountant=TUNING_ACCOUNTANT, total_epsilon=total)
    privacy.save_dppt(output, {**checkpoint, "privacy": block, "plan": plan, "tuning_settings": settings})
    shutil.rmtree(runs_dir)
    print(f"tuned teacher written to {output}: candidate {runs[best]} of {len(candidates)}, epsilon "
          f"{block['epsilon']:.3f} at delta {config.delta:g} ({TUNING_ACCOUNTANT}; every candidate run counted)")
    return output
