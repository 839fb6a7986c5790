"""Stage 2: DP normalization statistics of a DP teacher -> the statistics `.dppt`."""
from __future__ import annotations

import statistics as pystats
from dataclasses import dataclass, replace
from pathlib import Path

import privacy
import registry
from common.batches import default_workers, stack_items
from common.cli import RunOptions, content_settings, option, positive_float, positive_int, probability
from common.errors import DPImgSynError
from common.files import resumed_state, sha256_file, with_suffix_once
from privacy.checkpoint import completed_dppt
from privacy.sampling import private_seed
from privacy.split import split_by_content
from registry import model_from_checkpoint
from stages.fetch import resolve_checkpoint
from stages.skeleton import StageRun
from stages.teacher import TeacherConfig
from synthesizer import overlap
from synthesizer.dp_stats import compute_dp_statistics, public_calibration, relative_errors
from synthesizer.stat_norm import attach_stat_layers

PUBLIC_SCALE_IMAGES = 2000  # public images for pre-scaling and the public clipping norm
NON_PRIVATE_SCOPE = "error figures: non-private diagnostic, local only"
# Keys of teachers written by earlier versions that held exact, non-private numbers (per-epoch losses and
# accuracies) or local paths: never copied into a statistics checkpoint.
NOT_SHAREABLE_KEYS = ("history", "args")
# The mechanism's settings when the teacher records no plan (imported or older teachers): the teacher
# stage's own plan defaults (Table 1's most common statistics row and the paper's shared sigma).
PLAN_KEYS = ("noise_multiplier", "epochs", "train_batch_size")
# The flags that name them alike in train_dp.py (the plan) and here.
PLAN_FLAGS = {"noise_multiplier": "noise_multiplier", "epochs": "stats_epochs", "train_batch_size": "stats_batch_size"}
UNPLANNED_DEFAULTS = {"noise_multiplier": TeacherConfig.noise_multiplier, "epochs": TeacherConfig.stats_epochs,
                      "train_batch_size": TeacherConfig.stats_batch_size}
DEFAULT_MAX_NORM = 1.0  # C unless clip_quantile derives it from public data


@dataclass(frozen=True, kw_only=True)
class StatisticsConfig(registry.FolderViewOptions, registry.SamplingOptions, RunOptions):
    """Stage 2's settings: sigma, epochs and batch size default to the plan stored in the teacher."""

    # The teacher is recorded by its sha256, the private set by the teacher's name of it.
    teacher: str = option(help="stage-1 .dppt written by train_dp.py (or imported): a local path or an "
                          "http(s)/file URL, downloaded to checkpoints/pretrained_DP_models/", run_only=True)
    sha256: str | None = option(None, "expected SHA-256 of --teacher (required for a URL without a known digest)",
                                run_only=True)
    dataset: str | None = option(None, "private dataset (default: the teacher's; must match it; required for a "
                                 "folder: set, which checkpoints record by its folder name only); "
                                 + registry.dataset_choices("private"), run_only=True)
    epochs: float | None = option(None, "eta_bn: passes over the data in expectation (default: the teacher's plan, "
                                  f"else {UNPLANNED_DEFAULTS['epochs']})", parse=positive_float,
                                  aliases=("stats_epochs",))
    train_batch_size: int | None = option(None, "Omega_bn: expected Poisson batch size (default: the teacher's "
                                          f"plan, else {UNPLANNED_DEFAULTS['train_batch_size']})", parse=positive_int,
                                          aliases=("stats_batch_size",))
    max_norm: float | None = option(None, "C: L2 clipping norm of each per-sample statistics vector; not with "
                                    f"--clip_quantile, which takes C from public data (default: {DEFAULT_MAX_NORM})",
                                    parse=positive_float)
    noise_multiplier: float | None = option(None, "sigma: noise std / C (default: the teacher's plan, i.e. the "
                                            "sigma train_dp.py calibrated for both stages, else "
                                            f"{UNPLANNED_DEFAULTS['noise_multiplier']})",
                                            parse=positive_float)
    public_set: str | None = option(None, "public set whose statistics pre-scale the coordinates before clipping "
                                    "(cuts clipping bias at no privacy cost); " + registry.dataset_choices("public"))
    clip_quantile: float | None = option(None, "with --public_set: take C as this quantile of the public "
                                         "per-sample norms (instead of --max_norm)", parse=probability)
    non_private: bool = option(False, "ablation only: exact statistics, no clipping or noise; the ledger records "
                               "epsilon = inf")
    report_bias: bool = option(False, "diagnostic: re-read the private data to print the DP statistics' error "
                               "(not private; local only)", run_only=True)
    seed: int | None = option(None, "seed of sampling and noise (default: fresh OS entropy). Anyone who knows it "
                              "can regenerate the noise: keep a fixed seed secret; it is never stored in artifacts",
                              run_only=True)  # whoever knows it can regenerate the noise (see private_seed)
    secure_mode: bool = option(False, "draw the Poisson sampling and the noise from the operating system's "
                               "randomness (not seedable: --seed is refused; nothing can regenerate the noise)")
    output: str = option(help="statistics .dppt path ('.dppt' appended when missing)", run_only=True)

    def __post_init__(self) -> None:
        if self.clip_quantile is not None and (self.max_norm is not None or not self.public_set):
            raise DPImgSynError("clip_quantile takes C from the public set's norms: give it with public_set and "
                                "without max_norm")


def load_teacher(path: str | Path, non_private: bool) -> tuple[dict, dict]:
    """A stage-1 checkpoint and its privacy block; refuses ledger-less or other-stage files."""
    checkpoint = privacy.load_dppt(path)
    block = privacy.require_privacy_block(checkpoint, f"teacher checkpoint {path}", allow_non_private=non_private)
    privacy.check_dppt(checkpoint, stage="teacher")
    return checkpoint, block


def apply_plan(config: StatisticsConfig, checkpoint: dict) -> tuple[StatisticsConfig, dict | None]:
    """The config with the mechanism settings left unset taken from the teacher's plan (else the
    unplanned defaults), and the plan (``None`` for a teacher without one) to compare the result with.

    An unset C is its default, unless clip_quantile derives it from public data (then it stays unset).
    """
    plan = checkpoint.get("plan") if isinstance(checkpoint.get("plan"), dict) else None
    planned = {**(plan["statistics"] if plan else UNPLANNED_DEFAULTS),
               "max_norm": DEFAULT_MAX_NORM if config.clip_quantile is None else None}
    unset = [key for key in (*PLAN_KEYS, "max_norm") if getattr(config, key) is None]
    return replace(config, **{key: planned[key] for key in unset}), plan


def plan_report(plan: dict | None, config: StatisticsConfig, total_epsilon: float) -> str | None:
    """Why the total epsilon differs from what stage 1 planned (``None`` when the run follows the plan)."""
    if plan is None:
        return ("the teacher records no plan for this stage (imported or older checkpoint): "
                f"total epsilon {total_epsilon:.3f}")
    deviations = [f"--{PLAN_FLAGS[key]} {getattr(config, key):g} instead of the planned {plan['statistics'][key]:g}"
                  for key in PLAN_KEYS if getattr(config, key) != plan["statistics"][key]]
    if not deviations:
        return None
    target = plan.get("target_epsilon")
    wanted = f"target {target:g}" if target is not None else f"planned {plan['total_epsilon']:.3f}"
    return f"total epsilon {total_epsilon:.3f} differs from stage 1's {wanted}: " + "; ".join(deviations)


def capture_statistics(config: StatisticsConfig) -> Path:
    """Run (or resume) stage 2; return the path of the statistics `.dppt` (written by rank 0 alone)."""
    with StageRun(config.device) as run:
        seed = private_seed(config.seed, config.secure_mode)  # None in secure mode, which refuses a seed
        with run.dist.main_first():  # a URL is downloaded once
            config = replace(config, teacher=str(resolve_checkpoint(config.teacher, config.sha256,
                                                                      progress=config.progress)))
        checkpoint, block = load_teacher(config.teacher, config.non_private)
        dataset = registry.local_dataset(checkpoint["dataset"], config.dataset, f"teacher {config.teacher}")
        view = registry.recorded_view(checkpoint["dataset"], checkpoint.get(registry.VIEW_KEY), config.image_size,
                                      config.channels, f"teacher {config.teacher}")
        config, plan = apply_plan(config, checkpoint)
        output = with_suffix_once(config.output, ".dppt")
        settings = {"teacher_sha256": sha256_file(config.teacher), **content_settings(config),
                    "dataset": checkpoint["dataset"],
                    "public_set": config.public_set and registry.artifact_name(config.public_set)}
        run.open_log(with_suffix_once(output.with_suffix(""), ".log"), "stage 2 (DP statistics)", settings,
                     with_suffix_once(output, ".resume"))
        if completed_dppt(output, "statistics_settings", settings):
            return output
        model = model_from_checkpoint(checkpoint, config.teacher).to(run.device).eval().requires_grad_(False)
        attach_stat_layers(model)
        scales, max_norm = _public_scaling(config, model, dataset, view, run)
        with run.dist.main_first():
            _, train_set, _ = registry.get_dataset(dataset, config.data_root, config.download, **view)
        # Exactly the records stage 1 trained on: the same content-keyed split (see privacy.split).
        train_set, _ = split_by_content(train_set, checkpoint.get("settings", {}).get("val_split", 0.0))
        state = (resumed_state(run.resume_file, settings) or {}).get("state")
        if state is not None:
            run.say(f"resuming DP statistics at step {state['step']}")
        result = compute_dp_statistics(
            model, train_set, epochs=config.epochs, batch_size=config.train_batch_size, max_norm=max_norm,
            noise_multiplier=config.noise_multiplier, seed=None if seed is None else run.dist.broadcast_int(seed),
            secure_mode=config.secure_mode, device=run.device, scales=scales, non_private=config.non_private,
            progress=config.progress, state=state, checkpoint_fn=lambda loop_state: run.save_state(state=loop_state),
            num_workers=default_workers(run.device), dist=run.dist, say=run.say)
        if not run.is_main:
            return output
        new_block = privacy.privacy_block(list(block["ledger"]) + [_statistics_entry(result.mechanism, config)],
                                          block["delta"], block["accountant"])
        kept = {key: value for key, value in checkpoint.items() if key not in NOT_SHAREABLE_KEYS}
        privacy.save_dppt(output, {**kept, "stage": "statistics", "dp_statistics": result.stats,
                                   "privacy": new_block, "statistics_settings": settings})
        run.finish(f"DP statistics written to {output}: total epsilon {new_block['epsilon']:.3f} at delta "
                   f"{new_block['delta']:g} (teacher + statistics, {new_block['accountant']}); "
                   f"teacher accuracy {checkpoint.get('test_acc', float('nan')):.4f} "
                   f"({checkpoint.get('test_acc_note', 'private test split')})")
        deviation = None if config.non_private else plan_report(plan, config, new_block["epsilon"])
        if deviation:
            run.say(f"note: {deviation}")
        row = {**result.mechanism, "total_epsilon": new_block["epsilon"], "delta": new_block["delta"]}
        if config.report_bias:
            row.update(report_bias(model, train_set, result.stats, run, config.progress))
        run.write_metrics(with_suffix_once(output.with_suffix(""), ".metrics.csv"), [row])
        return output


def _public_scaling(config: StatisticsConfig, model, dataset: str, view: dict,
                   run: StageRun) -> tuple[dict | None, float]:
    """The public pre-scaling of the coordinates (``None`` without a public set) and the clipping norm C."""
    if not config.public_set:
        return None, config.max_norm
    with run.dist.main_first():
        public = registry.aligned(config.public_set, dataset, config.data_root, config.download, **view)
    chosen = registry.sampling_list(config.public_set, min(PUBLIC_SCALE_IMAGES, len(public)), 0, len(public),
                                    config.sampling_dir)
    overlap.check_public_items(config.public_set, public, chosen, dataset, config.data_root, view,
                               f"public set {config.public_set}")
    public = stack_items(public, chosen)
    scales, max_norm = public_calibration(model, public, config.clip_quantile, device=run.device)
    if max_norm is None:
        return scales, config.max_norm
    run.say(f"clipping norm {max_norm:.4g} from the public set ({config.clip_quantile:g} quantile)")
    return scales, max_norm


def _statistics_entry(mechanism: dict, config: StatisticsConfig) -> dict:
    """The ledger entry of the mechanism that ran (a non-private run's records epsilon = inf)."""
    mechanism = dict(mechanism)
    if mechanism.get("non_private"):
        return privacy.non_private_entry(mechanism.pop("name"), stage="statistics")
    return privacy.mechanism_entry(mechanism.pop("name"), mechanism.pop("noise_multiplier"),
                                   mechanism.pop("sample_rate"), mechanism.pop("steps"), mechanism.pop("max_norm"),
                                   stage="statistics", epochs=config.epochs, batch_size=config.train_batch_size,
                                   **mechanism)


def report_bias(model, train_set, dp_stats: dict, run: StageRun, progress: bool) -> dict:
    """Local diagnostic: relative L2 error of the DP statistics against the exact ones.

    It re-reads the private training set without any privacy protection, so its figures go to
    the terminal, the local log and metrics.csv (labelled non-private) only, never into an artifact.
    """
    run.say("--report_bias: re-reading the private training set for a NON-PRIVATE diagnostic (do not publish)")
    exact = compute_dp_statistics(model, train_set, epochs=1, batch_size=1, max_norm=1.0, noise_multiplier=1.0,
                                  seed=0, device=run.device, non_private=True, progress=progress).stats
    errors = relative_errors(dp_stats, exact)
    errors_row = {}
    for key in ("mean", "var"):
        values = [layer[key] for layer in errors.values()]
        run.say(f"clipping+noise error of DP {key}s (relative L2 per layer): median {pystats.median(values):.3f}, "
                f"max {max(values):.3f} over {len(values)} layers [non-private diagnostic]")
        errors_row[f"{key}_error_median"] = pystats.median(values)
    return {**errors_row, "scope": NON_PRIVATE_SCOPE}
