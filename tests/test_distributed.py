"""torchrun: every stage on 2 CPU processes (gloo) against the same stage in one process.

The stages run through ``stages.pipeline.run_stage`` (what ``run_pipeline.py --nproc`` uses), so
each is a real ``torchrun`` launch of the stage script. References run in this process, single
threaded like the workers, with the same seeds.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

import privacy
import save_dp_db_stats
import synthesize
import train_dp
import train_student
from common.batches import single_threaded
from common.distributed import Distributed
from common.errors import DPImgSynError
from privacy.moments import noisy_global_sum
from privacy.sampling import poisson_batch
from stages.pipeline import run_stage
from synthesizer import release as release_io
from training.dp_sgd import DPSGDConfig, DPSGDTrainer

NPROC = 2
QUIET = ["--device", "cpu", "--no_progress"]
TEACHER = ["--dataset", "mnist5k", "--model", "small_cnn", "--epochs", "1", "--train_batch_size", "500",
           "--lr", "1", "--noise_multiplier", "1", "--seed", "3", *QUIET]


def launch(script, argv: list[str], nproc: int = NPROC) -> None:
    """The stage of a CLI script, with the config its flags give, through the pipeline's torchrun launch."""
    stage = {train_dp: "teacher", save_dp_db_stats: "statistics", synthesize: "synthesis", train_student: "student"}
    run_stage(stage[script], script.parse_config(argv), nproc)


def statistics_flags(teacher: Path, *extra: str) -> list[str]:
    """1.5 epochs: one process runs the teacher once per record (a table of vectors), two on every sampled batch."""
    return ["--teacher", str(teacher), "--epochs", "1.5", "--train_batch_size", "400", "--noise_multiplier", "1",
            "--public_set", "photos", "--clip_quantile", "0.5", "--seed", "5", *extra, *QUIET]


def synthesis_flags(statistics: Path) -> list[str]:
    return ["--teacher", str(statistics), "--public_set", "photos", "--num_samples", "150", "--g_steps", "2",
            "--batch_size", "25", "--batches_per_shard", "1", "--seed", "7", *QUIET]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Teacher, DP statistics and release, each once in one process and once on two (torchrun)."""
    root = tmp_path_factory.mktemp("distributed")
    paths = {name: root / name for name in (
        "teacher_1.dppt", "teacher_2.dppt", "stats_1.dppt", "stats_2.dppt", "exact_1.dppt", "exact_2.dppt",
        "release_1", "release_2")}
    with single_threaded():
        train_dp.run(TEACHER + ["--output", str(paths["teacher_1.dppt"])])
        save_dp_db_stats.run(statistics_flags(paths["teacher_1.dppt"], "--output", str(paths["stats_1.dppt"])))
        save_dp_db_stats.run(statistics_flags(paths["teacher_1.dppt"], "--non_private",
                                              "--output", str(paths["exact_1.dppt"])))
        synthesize.run(synthesis_flags(paths["stats_1.dppt"]) + ["--output", str(paths["release_1"])])
    launch(train_dp, TEACHER + ["--output", str(paths["teacher_2.dppt"])], NPROC)
    # The statistics and the release start from the same teacher, so that only the stage differs.
    launch(save_dp_db_stats, statistics_flags(paths["teacher_1.dppt"], "--output", str(paths["stats_2.dppt"])),
              NPROC)
    launch(save_dp_db_stats, statistics_flags(paths["teacher_1.dppt"], "--non_private",
                                                 "--output", str(paths["exact_2.dppt"])), NPROC)
    launch(synthesize, synthesis_flags(paths["stats_1.dppt"]) + ["--output", str(paths["release_2"])], NPROC)
    return paths


def test_distributed_teacher_has_the_single_process_ledger_and_weights(runs):
    single, multi = privacy.load_dppt(runs["teacher_1.dppt"]), privacy.load_dppt(runs["teacher_2.dppt"])
    assert multi["privacy"] == single["privacy"]  # same mechanism: sigma, global sample rate, steps
    # Same Poisson batches and the same single noise draw: only the summation order differs.
    for name, weights in single["model"].items():
        torch.testing.assert_close(multi["model"][name], weights, rtol=1e-4, atol=1e-5, msg=name)
    assert not list(runs["teacher_2.dppt"].parent.glob("teacher_2.dppt.resume"))


def test_distributed_statistics_equal_the_single_process_release(runs):
    """The single process reads its table of vectors, the two processes run the teacher on their shares of each
    batch: the same release."""
    single, multi = privacy.load_dppt(runs["stats_1.dppt"]), privacy.load_dppt(runs["stats_2.dppt"])
    assert multi["privacy"] == single["privacy"]
    for layer, stats in single["dp_statistics"].items():
        for key in ("mean", "var"):
            # Clipped parts summed in float64 before one shared noise draw: equal to float32 precision.
            torch.testing.assert_close(multi["dp_statistics"][layer][key], stats[key], rtol=1e-6, atol=1e-7)


def test_distributed_exact_statistics_equal_the_single_process_ones(runs):
    """The noise-free path (every example once, summed over ranks) reproduces the exact statistics."""
    single, multi = privacy.load_dppt(runs["exact_1.dppt"]), privacy.load_dppt(runs["exact_2.dppt"])
    for layer, stats in single["dp_statistics"].items():
        for key in ("mean", "var"):
            torch.testing.assert_close(multi["dp_statistics"][layer][key], stats[key], rtol=1e-6, atol=1e-7)


def test_distributed_release_is_byte_identical(runs):
    for name in release_io.ARRAY_FILES:
        assert (runs["release_1"] / name).read_bytes() == (runs["release_2"] / name).read_bytes(), name
    single = json.loads((runs["release_1"] / release_io.METADATA_FILE).read_text())
    multi = json.loads((runs["release_2"] / release_io.METADATA_FILE).read_text())
    assert multi == single
    assert not (runs["release_2"] / release_io.SHARDS_DIR).exists()


def test_distributed_student_trains_above_chance_and_writes_one_result(runs, tmp_path):
    output = tmp_path / "student"
    launch(train_student, ["--release", str(runs["release_1"]), "--model", "small_cnn", "--epochs", "3",
                              "--batch_size", "50", "--lr", "0.05", "--T", "4", "--seed", "1",
                              "--output", str(output), *QUIET], NPROC)
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["student_test_acc"] > 0.15  # ten classes: chance is 0.1 (the one-epoch teacher reaches ~0.4)
    assert metrics["epochs"] == len(metrics["history"]) == 3
    assert sorted(path.name for path in output.iterdir()) == ["metrics.csv", "metrics.json", "student.pt",
                                                              "train_student.log"]


def test_a_failing_distributed_stage_is_one_project_error(tmp_path):
    with pytest.raises(DPImgSynError, match="train_dp.py failed on 2 processes"):
        launch(train_dp, [*TEACHER, "--dataset", "nosuchset", "--output", str(tmp_path / "t.dppt")], NPROC)
    assert not (tmp_path / "t.dppt").exists()


# --------------------------------------------------------------------------- the noise, added once
DIMENSION = 20_000
SIGMA, CLIP = 1.5, 2.0


def _noise_of_one_release(rank: int, store: str, result: str) -> None:
    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=NPROC)
    try:
        generator = torch.Generator().manual_seed(123)  # the shared stage seed
        released = noisy_global_sum(torch.zeros(DIMENSION, dtype=torch.float64), CLIP, SIGMA, generator,
                                    Distributed(rank, NPROC))
        torch.save(released, f"{result}.{rank}")
    finally:
        torch_dist.destroy_process_group()


def test_two_ranks_release_one_noise_draw_of_scale_sigma_times_c(tmp_path):
    """Zero statistics on both ranks: the release is pure noise with std sigma*C, as in one process.

    Noise added per rank before the all-reduce would give std sqrt(2)*sigma*C (independent draws)
    or 2*sigma*C (the shared generator's equal draws).
    """
    mp.spawn(_noise_of_one_release, args=(str(tmp_path / "store"), str(tmp_path / "released")), nprocs=NPROC)
    releases = [torch.load(tmp_path / f"released.{rank}", weights_only=True) for rank in range(NPROC)]
    assert torch.equal(releases[0], releases[1])  # every rank holds the one release
    assert float(releases[0].std()) == pytest.approx(SIGMA * CLIP, rel=0.03)


def test_ranks_share_work_disjointly_and_completely():
    ranks = [Distributed(rank, 3) for rank in range(3)]
    batch = torch.arange(10)
    shares = [set(rank.share(batch).tolist()) for rank in ranks]
    assert set().union(*shares) == set(range(10)) and sum(map(len, shares)) == 10
    assert [[shard for shard in range(7) if rank.owns(shard)] for rank in ranks] == [[0, 3, 6], [1, 4], [2, 5]]
    assert Distributed().share(batch) is batch and Distributed().owns(5)


@pytest.fixture(autouse=True)
def _no_inherited_rank(monkeypatch):
    """A stray RANK/WORLD_SIZE in the test environment would turn the references distributed."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------- replicas stay identical
TINY_EXAMPLES = 16


def _tiny_teacher_steps(rank: int, store: str, result: str) -> None:
    """A few fused DP-SGD steps of a small conv net at an expected batch of one example."""
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=NPROC)
    try:
        torch.manual_seed(rank)  # different initial weights: DPDDP must copy rank 0's
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3), nn.Tanh(),
                              nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        data = torch.Generator().manual_seed(11)
        train_set = TensorDataset(torch.randn(TINY_EXAMPLES, 1, 8, 8, generator=data),
                                  torch.randint(0, 3, (TINY_EXAMPLES,), generator=data))
        config = DPSGDConfig(epochs=1, train_batch_size=1, lr=0.5, max_norm=1.0, noise_multiplier=0.5)
        trainer = DPSGDTrainer(model, train_set, config, torch.device("cpu"), seed=4, dist=Distributed(rank, NPROC))
        trainer.train_epoch(progress=False)
        torch.save(model.state_dict(), f"{result}.{rank}")
    finally:
        torch_dist.destroy_process_group()


def test_ranks_with_an_empty_share_keep_every_replica_identical(tmp_path):
    """A Poisson batch of one example leaves rank 1's share empty: its zeros must sum with rank 0's
    clipped gradients element by element, whatever memory layout the clipper produced."""
    sampler = torch.Generator().manual_seed(4)  # the trainer's sample generator: seed 4
    sizes = [len(poisson_batch(TINY_EXAMPLES, 1 / TINY_EXAMPLES, sampler)) for _ in range(TINY_EXAMPLES)]
    assert 1 in sizes  # some step gives rank 0 the only example and rank 1 nothing
    mp.spawn(_tiny_teacher_steps, args=(str(tmp_path / "store"), str(tmp_path / "weights")), nprocs=NPROC)
    replicas = [torch.load(tmp_path / f"weights.{rank}", weights_only=True) for rank in range(NPROC)]
    for name, weights in replicas[0].items():
        assert torch.equal(replicas[1][name], weights), name
