"""Secure mode: Poisson sampling and Gaussian noise come from the operating system, not a seedable generator.

``privacy.noise.os_random_bytes`` is the one place OS randomness enters. Patched to fixed bytes, every
secure draw (DP-SGD batches and noise, DP-statistics batches and noise) must become fixed -- so the
bytes really come from there; unpatched, two runs must differ whatever torch was seeded with; and
the mechanism must still be the one the ledger records (noise std sigma*C, Poisson rate q).
"""
from __future__ import annotations

import io
import math
import random
import statistics
import sys
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from opacus.optimizers import DistributedDPOptimizer, DistributedDPOptimizerFastGradientClipping
from torch import nn
from torch.utils.data import TensorDataset

import privacy.noise
import privacy.optimizers
import privacy.sampling
import save_dp_db_stats
import train_dp
from common.distributed import Distributed
from common.errors import DPImgSynError
from privacy.moments import add_gaussian_noise, noisy_global_sum
from privacy.noise import OS_RANDOM, gaussian
from privacy.sampling import poisson_batch
from synthesizer import dp_stats
from synthesizer.dp_stats import compute_dp_statistics
from training.dp_sgd import DPSGDConfig, DPSGDTrainer

pytestmark = pytest.mark.usefixtures("single_thread")

SIGMA, CLIP = 1.0, 2.0


def fixed_bytes(seed: int):
    """An OS byte source that returns the same bytes for the same request, every time."""
    return lambda count: random.Random(seed).randbytes(count)


def zero_gradient_model(features: int = 3 * 8 * 8, outputs: int = 100) -> nn.Module:
    """Bias-free linear layer fed zero images: every per-example gradient is exactly zero."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, outputs, bias=False))


def zero_images(count: int) -> TensorDataset:
    return TensorDataset(torch.zeros(count, 3, 8, 8), torch.zeros(count, dtype=torch.long))


def secure_config(batch_size: int, mode: str = "fused", **overrides) -> DPSGDConfig:
    settings = dict(epochs=1, train_batch_size=batch_size, lr=1.0, max_norm=CLIP, noise_multiplier=SIGMA, momentum=0.0,
                    weight_decay=0.0, grad_sample_mode=mode, secure_mode=True)
    settings.update(overrides)
    return DPSGDConfig(**settings)


def secure_epoch(examples: int, batch_size: int, mode: str = "fused", dist: Distributed = Distributed(),
                 **overrides) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One secure epoch of the zero-gradient model: (weights moved, i.e. -sum of step noises / B; the batches)."""
    model = zero_gradient_model()
    before = model[1].weight.detach().clone()
    batches: list[torch.Tensor] = []
    original = privacy.sampling.poisson_batch

    def spy(*args):
        batches.append(original(*args))
        return batches[-1]

    privacy.sampling.poisson_batch = spy
    try:
        trainer = DPSGDTrainer(model, zero_images(examples), secure_config(batch_size, mode, **overrides),
                               torch.device("cpu"), seed=None, dist=dist)
        trainer.train_epoch(progress=False)
    finally:
        privacy.sampling.poisson_batch = original
    return model[1].weight.detach() - before, batches


def zero_statistics_model(channels: int = 2048) -> nn.Module:
    """Bias-free conv: zero images give zero normalization inputs, so every per-sample statistic is 0."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, channels, 1, bias=False), nn.GroupNorm(8, channels)).eval()


def secure_statistics(model: nn.Module, examples: int = 100, **overrides) -> dp_stats.StatsResult:
    settings = dict(epochs=1, batch_size=10, max_norm=CLIP, noise_multiplier=SIGMA, seed=None, device="cpu",
                    progress=False, secure_mode=True)
    settings.update(overrides)
    data = TensorDataset(torch.zeros(examples, 3, 2, 2), torch.zeros(examples))
    return compute_dp_statistics(model, data, **settings)


# --------------------------------------------------------------------------- the bytes come from the OS hook
def test_gaussian_and_uniform_are_box_muller_of_53_bit_words_of_the_os_bytes(monkeypatch):
    monkeypatch.setattr(privacy.noise, "os_random_bytes", fixed_bytes(1))
    data = random.Random(1).randbytes(8 * 6)
    words = [int.from_bytes(data[8 * i:8 * i + 8], "little") & (2 ** 53 - 1) for i in range(6)]
    uniforms = [word / 2 ** 53 for word in words]
    torch.testing.assert_close(OS_RANDOM.uniform(6), torch.tensor(uniforms, dtype=torch.float64), rtol=0, atol=0)
    radius = [math.sqrt(-2 * math.log(1 - u)) for u in uniforms[:3]]
    angle = [2 * math.pi * u for u in uniforms[3:]]
    expected = [r * math.cos(a) for r, a in zip(radius, angle)] + [r * math.sin(a) for r, a in zip(radius, angle)]
    drawn = gaussian((2, 3), 1.5, OS_RANDOM)
    torch.testing.assert_close(drawn, 1.5 * torch.tensor(expected, dtype=torch.float64).reshape(2, 3),
                               rtol=1e-12, atol=0)
    assert gaussian((5,), 1.0, OS_RANDOM, dtype=torch.float32).dtype == torch.float32


def test_patched_os_bytes_fix_the_secure_poisson_batch_and_the_dp_statistics_noise(monkeypatch):
    monkeypatch.setattr(privacy.noise, "os_random_bytes", fixed_bytes(2))
    data = random.Random(2).randbytes(8 * 1000)
    expected = [i for i in range(1000) if (int.from_bytes(data[8 * i:8 * i + 8], "little") & (2 ** 53 - 1))
                < 0.3 * 2 ** 53]
    assert poisson_batch(1000, 0.3, OS_RANDOM).tolist() == expected

    noise = add_gaussian_noise(torch.zeros(50), CLIP, SIGMA, OS_RANDOM)
    torch.testing.assert_close(noise, gaussian((50,), SIGMA * CLIP, OS_RANDOM), rtol=0, atol=0)
    first = secure_statistics(zero_statistics_model(8), epochs=3)
    torch.manual_seed(123)  # torch's generators play no part
    assert torch.equal(secure_statistics(zero_statistics_model(8), epochs=3).moments, first.moments)
    monkeypatch.setattr(privacy.noise, "os_random_bytes", fixed_bytes(3))
    assert not torch.equal(secure_statistics(zero_statistics_model(8), epochs=3).moments, first.moments)


@pytest.mark.parametrize("mode", ["fused", "hooks"])  # our clipper's optimizer, and Opacus's DPOptimizer
def test_patched_os_bytes_fix_the_secure_dp_sgd_batch_and_noise(mode, monkeypatch):
    """One step of the zero-gradient model moves the weights by exactly -noise / B, noise read from the hook."""
    monkeypatch.setattr(privacy.noise, "os_random_bytes", fixed_bytes(4))
    moved, batches = secure_epoch(examples=20, batch_size=20, mode=mode)  # sample rate 1: one step
    noise = gaussian(moved.shape, SIGMA * CLIP, OS_RANDOM, dtype=torch.float32)
    torch.testing.assert_close(moved, -noise / 20, rtol=1e-5, atol=1e-7)
    assert [batch.tolist() for batch in batches] == [list(range(20))]

    _, sampled = secure_epoch(examples=40, batch_size=10, mode=mode)
    expected = poisson_batch(40, 0.25, OS_RANDOM)
    assert len(sampled) == 4 and all(torch.equal(batch, expected) for batch in sampled)


# --------------------------------------------------------------------------- unpatched: fresh every time
def test_unpatched_secure_draws_differ_even_after_torch_manual_seed():
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        draws.append((poisson_batch(1000, 0.5, OS_RANDOM), add_gaussian_noise(torch.zeros(100), CLIP, SIGMA, OS_RANDOM),
                      secure_statistics(zero_statistics_model(8)).moments, *secure_epoch(examples=40, batch_size=20)))
    (batch_a, noise_a, stats_a, moved_a, batches_a), (batch_b, noise_b, stats_b, moved_b, batches_b) = draws
    assert not torch.equal(batch_a, batch_b)
    assert not torch.equal(noise_a, noise_b)
    assert not torch.equal(stats_a, stats_b)
    assert not torch.equal(moved_a, moved_b)
    assert [batch.tolist() for batch in batches_a] != [batch.tolist() for batch in batches_b]


# --------------------------------------------------------------------------- still the recorded mechanism
@pytest.mark.parametrize("mode", ["fused", "hooks"])
def test_secure_dp_sgd_noise_is_sigma_c_over_the_expected_batch_once_per_step(mode):
    """Four steps at q = 0.25, each batch in physical chunks of 3: one noise draw per step, not per chunk."""
    moved, batches = secure_epoch(examples=40, batch_size=10, mode=mode, max_physical_batch_size=3)
    assert len(batches) == 4 and max(map(len, batches)) > 3
    expected = math.sqrt(4) * SIGMA * CLIP / 10
    assert float(moved.std()) == pytest.approx(expected, rel=0.03)
    assert abs(float(moved.mean())) < 5 * expected / math.sqrt(moved.numel())


def test_secure_dp_statistics_noise_has_the_documented_scale():
    assert float(add_gaussian_noise(torch.zeros(50_000), CLIP, SIGMA, OS_RANDOM).std()) == pytest.approx(
        SIGMA * CLIP, rel=0.02)
    result = secure_statistics(zero_statistics_model(), epochs=2)  # q = 0.1, N = 100, 20 steps
    expected = SIGMA * CLIP / (0.1 * 100 * math.sqrt(result.mechanism["steps"]))
    assert result.mechanism["steps"] == 20
    assert float(result.moments.double().std()) == pytest.approx(expected, rel=0.05)


def test_secure_poisson_batches_have_binomial_sizes():
    sizes = [len(poisson_batch(1000, 0.1, OS_RANDOM)) for _ in range(300)]
    assert statistics.mean(sizes) == pytest.approx(100, abs=3)  # Binomial(1000, 0.1): std 9.5 per batch
    assert 7.5 < statistics.pstdev(sizes) < 11.5
    assert poisson_batch(10, 1.0, OS_RANDOM).tolist() == list(range(10))


# --------------------------------------------------------------------------- no seed, no generator state
def test_secure_mode_refuses_a_seed():
    with pytest.raises(DPImgSynError, match="secure mode"):
        secure_statistics(zero_statistics_model(8), seed=0)
    with pytest.raises(DPImgSynError, match="secure mode"):
        DPSGDTrainer(zero_gradient_model(), zero_images(10), secure_config(5), torch.device("cpu"), seed=0)


def _weights_only_copy(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)


def test_secure_resume_states_hold_no_generator_and_resume():
    saved = []
    secure_statistics(zero_statistics_model(8), epochs=3, checkpoint_fn=saved.append, checkpoint_every=10)
    state = _weights_only_copy(saved[-1])
    assert state["step"] == 20 and "generator" not in state
    resumed = secure_statistics(zero_statistics_model(8), epochs=3, state=state)
    assert resumed.mechanism["steps"] == 30 and bool(torch.isfinite(resumed.moments).all())
    with pytest.raises(DPImgSynError, match="secure mode"):
        secure_statistics(zero_statistics_model(8), epochs=3, state=state, secure_mode=False, seed=0)
    seeded = []
    secure_statistics(zero_statistics_model(8), epochs=3, checkpoint_fn=seeded.append, checkpoint_every=10,
                      secure_mode=False, seed=0)
    with pytest.raises(DPImgSynError, match="secure mode"):
        secure_statistics(zero_statistics_model(8), epochs=3, state=seeded[-1])

    trainer = DPSGDTrainer(zero_gradient_model(), zero_images(10), secure_config(5), torch.device("cpu"), seed=None)
    trainer.train_epoch(progress=False)
    trainer_state = _weights_only_copy(trainer.state_dict())
    assert not {"sample_generator", "noise_generator"} & trainer_state.keys()
    again = DPSGDTrainer(zero_gradient_model(), zero_images(10), secure_config(5), torch.device("cpu"), seed=None)
    again.load_state_dict(trainer_state)
    assert again.steps_done == 2 and torch.equal(again.model[1].weight, trainer.model[1].weight)
    seeded_trainer = DPSGDTrainer(zero_gradient_model(), zero_images(10), secure_config(5, secure_mode=False),
                                  torch.device("cpu"), seed=0)
    with pytest.raises(DPImgSynError, match="secure mode"):
        seeded_trainer.load_state_dict(trainer_state)


# --------------------------------------------------------------------------- torchrun: rank 0 draws for all
def test_distributed_secure_optimizers_keep_the_rank_0_noise_gate():
    assert privacy.optimizers.OneDrawDistributedDPOptimizer.add_noise is DistributedDPOptimizer.add_noise
    assert (privacy.optimizers.OneDrawDistributedDPOptimizerFastGradientClipping.add_noise
            is DistributedDPOptimizerFastGradientClipping.add_noise)
    for secure in (privacy.optimizers.OneDrawDistributedDPOptimizer,
                   privacy.optimizers.OneDrawDistributedDPOptimizerFastGradientClipping):
        assert privacy.optimizers._OneDrawNoise in secure.__mro__  # behind the gate, the OS noise


NPROC = 2
# Forked children reuse this process's imports (spawned ones spend seconds importing torch and opacus
# again). Fork is safe only where autograd runs no device threads (no accelerator) and on Linux.
START_METHOD = "fork" if sys.platform.startswith("linux") and not torch.cuda.is_available() else "spawn"


@dataclass(frozen=True)
class RecordingDistributed(Distributed):
    """Records every global batch a rank splits into shares."""

    batches: list = field(default_factory=list, compare=False)

    def share(self, items):
        self.batches.append(items.tolist())
        return super().share(items)


def _secure_rank(rank: int, store: str, result: str) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=NPROC)
    try:
        released = noisy_global_sum(torch.zeros(20_000, dtype=torch.float64), CLIP, SIGMA, OS_RANDOM,
                                    Distributed(rank, NPROC))
        teacher = RecordingDistributed(rank, NPROC)
        moved, _ = secure_epoch(examples=40, batch_size=20, dist=teacher)  # two steps at q = 0.5
        statistics_dist = RecordingDistributed(rank, NPROC)
        stats = secure_statistics(zero_statistics_model(8), examples=30, dist=statistics_dist).moments
        torch.save({"released": released, "moved": moved, "teacher_batches": teacher.batches,
                    "stats": stats, "stats_batches": statistics_dist.batches}, f"{result}.{rank}")
    finally:
        torch_dist.destroy_process_group()


def test_two_secure_ranks_agree_on_every_batch_and_add_one_noise_draw(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    mp.start_processes(_secure_rank, args=(str(tmp_path / "store"), str(tmp_path / "result")), nprocs=NPROC,
                       start_method=START_METHOD)
    first, second = (torch.load(tmp_path / f"result.{rank}", weights_only=True) for rank in range(NPROC))
    assert torch.equal(first["released"], second["released"])
    assert float(first["released"].std()) == pytest.approx(SIGMA * CLIP, rel=0.03)  # one draw, not two
    assert len(first["teacher_batches"]) == 2 and first["teacher_batches"] == second["teacher_batches"]
    assert first["stats_batches"] == second["stats_batches"] and len(first["stats_batches"]) == 3
    assert torch.equal(first["moved"], second["moved"])
    assert float(first["moved"].std()) == pytest.approx(math.sqrt(2) * SIGMA * CLIP / 20, rel=0.03)
    assert torch.equal(first["stats"], second["stats"])


def test_both_private_stages_run_secure_from_the_command_line_and_refuse_a_seed(tmp_path, capsys):
    quiet = ["--device", "cpu", "--no_progress"]
    teacher_flags = ["--dataset", "mnist5k", "--model", "small_cnn", "--epochs", "1", "--train_batch_size", "1000",
                     "--lr", "1", "--noise_multiplier", "1", "--secure_mode", *quiet]
    stats_flags = ["--epochs", "1", "--train_batch_size", "1000", "--secure_mode", *quiet]
    with pytest.raises(SystemExit) as exit_info:
        train_dp.main(teacher_flags + ["--seed", "1", "--output", str(tmp_path / "seeded.dppt")])
    assert exit_info.value.code == 2 and "takes no --seed" in capsys.readouterr().err
    teacher = train_dp.run(teacher_flags + ["--output", str(tmp_path / "teacher.dppt")])
    with pytest.raises(SystemExit) as exit_info:
        save_dp_db_stats.main(["--teacher", str(teacher), "--seed", "1", "--output", str(tmp_path / "s1"),
                               *stats_flags])
    assert exit_info.value.code == 2 and "takes no --seed" in capsys.readouterr().err
    assert not (tmp_path / "seeded.dppt").exists() and not (tmp_path / "s1.dppt").exists()
    payload = torch.load(save_dp_db_stats.run(["--teacher", str(teacher), "--output", str(tmp_path / "stats"),
                                                *stats_flags]), weights_only=True)
    assert [entry["stage"] for entry in payload["privacy"]["ledger"]] == ["teacher", "statistics"]
    assert payload["settings"]["secure_mode"] and payload["statistics_settings"]["secure_mode"]
