"""Stage 1: the teacher `.dppt` and kill-and-resume of DP-SGD."""
from __future__ import annotations

import os
import stat

import pytest
import torch

import privacy
import privacy.sampling
import stages.teacher
import train_dp
from common.errors import DPImgSynError
from per_example import clipped_sum
from training.augment import random_crop_flip
from training.dp_sgd import DPSGDConfig, DPSGDTrainer



def flags(epochs: int = 2) -> list[str]:
    return ["--dataset", "mnist5k", "--model", "small_cnn", "--epochs", str(epochs), "--train_batch_size", "1000",
            "--lr", "1", "--noise_multiplier", "1.0", "--device", "cpu", "--no_progress", "--seed", "3"]



class Killed(Exception):
    pass


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_teacher_checkpoint_and_resume(tmp_path, monkeypatch, umask_022):
    clean = train_dp.run(flags() + ["--output", str(tmp_path / "clean")])
    assert clean.name == "clean.dppt"
    # The shareable checkpoint follows the umask; the local log and metrics are the owner's alone.
    assert [mode(tmp_path / name) for name in ("clean.dppt", "clean.log", "clean.metrics.csv")] == [0o644, 0o600, 0o600]
    payload = torch.load(clean, weights_only=True)
    ledger = payload["privacy"]["ledger"]
    assert ledger[0]["steps"] == 2 * 4 and ledger[0]["sample_rate"] == pytest.approx(1000 / 4000)
    assert payload["privacy"]["epsilon"] == pytest.approx(
        privacy.compute_epsilon(privacy.ledger_mechanisms(ledger), 1e-5), rel=1e-6)
    assert not any(key.startswith("_module.") for key in payload["model"])
    assert payload["test_acc"] > 0.3  # 8 noisy steps; chance is 0.1
    assert payload["class_names"] == [str(digit) for digit in range(10)]  # public schema, for releases and exports

    # Kill during the second epoch's evaluation: epoch 1 is checkpointed, epoch 2 is not.
    calls = {"n": 0}
    original = stages.teacher.evaluate

    def dying_evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed()
        return original(*args, **kwargs)

    monkeypatch.setattr(stages.teacher, "evaluate", dying_evaluate)
    with pytest.raises(Killed):
        train_dp.run(flags() + ["--output", str(tmp_path / "resumed.dppt")])
    assert (tmp_path / "resumed.dppt.resume").exists() and not (tmp_path / "resumed.dppt").exists()
    assert mode(tmp_path / "resumed.dppt.resume") == 0o600  # its generator states regenerate the remaining noise
    monkeypatch.setattr(stages.teacher, "evaluate", original)
    resumed = torch.load(train_dp.run(flags() + ["--output", str(tmp_path / "resumed.dppt")]), weights_only=True)
    assert resumed["privacy"]["ledger"][0]["steps"] == ledger[0]["steps"]
    assert resumed["privacy"]["epsilon"] == payload["privacy"]["epsilon"]
    for name, tensor in payload["model"].items():  # same seed: bit-identical to the uninterrupted run
        assert torch.equal(tensor, resumed["model"][name]), name
    assert not (tmp_path / "resumed.dppt.resume").exists()


@pytest.mark.parametrize("sigma, said", [("0.5", "planned total epsilon 15.6 "),
                                         ("1.0", "planned total epsilon 4.33 ")])
def test_without_a_target_the_planned_epsilon_is_said_before_training(tmp_path, monkeypatch, capsys, sigma, said):
    """The defaults can cost a large epsilon: a run without --target_epsilon says it, and warns above 10."""
    def no_training(*args, **kwargs):
        raise Killed()

    monkeypatch.setattr(stages.teacher, "DPSGDTrainer", no_training)
    with pytest.raises(Killed):
        train_dp.run(flags(1) + ["--noise_multiplier", sigma, "--output", str(tmp_path / "t")])
    out, err = capsys.readouterr()
    assert said in out
    warned = [line for line in err.splitlines() if "exceeds 10" in line]
    assert warned == ([f"WARNING: {said}exceeds 10, the paper's largest budget short of ImageNette: a weak guarantee; "
                       "give --target_epsilon to calibrate the noise to a budget"] if sigma == "0.5" else [])


def test_rerun_of_finished_teacher_is_a_no_op(tmp_path):
    path = train_dp.run(flags(1) + ["--output", str(tmp_path / "t.dppt")])
    before = path.read_bytes()
    assert train_dp.run(flags(1) + ["--output", str(tmp_path / "t.dppt")]) == path
    assert path.read_bytes() == before


@pytest.mark.parametrize("ratio", [1.0, 2.5])  # the paper's one sigma; a recipe's budget split
def test_target_epsilon_calibrates_the_whole_pipeline(tmp_path, ratio):
    path = train_dp.run(flags(1) + ["--target_epsilon", "4", "--stats_epochs", "1", "--stats_noise_ratio", str(ratio),
                                    "--stats_batch_size", "250", "--output", str(tmp_path / "c")])
    payload = privacy.load_dppt(path)
    sigma = payload["settings"]["noise_multiplier"]
    assert payload["plan"]["statistics"]["noise_multiplier"] == pytest.approx(ratio * sigma)
    planned = [(sigma, 1000 / 4000, 4), (ratio * sigma, 250 / 4000, 16)]
    assert privacy.compute_epsilon(planned, 1e-5) <= 4.0 + 1e-6
    assert payload["plan"]["total_epsilon"] == pytest.approx(privacy.compute_epsilon(planned, 1e-5))
    assert privacy.compute_epsilon([(s * 0.99, q, n) for s, q, n in planned], 1e-5) > 4.0


@pytest.mark.parametrize("mode", ["fused", "hooks"])  # our engine (the default), and Opacus's
@pytest.mark.parametrize("max_norm", [0.05, 1e3])  # every example clipped; none (catches a wrong scale)
@pytest.mark.parametrize("physical_batch", [24, 7])  # one chunk, and four accumulated chunks
def test_dp_sgd_step_is_the_mean_of_per_example_clipped_gradients(physical_batch, max_norm, mode, single_thread):
    """With sample rate 1 and negligible noise, one step moves the weights by -lr * mean(clip_C(g_i)).

    This pins the sensitivity bound the accountant assumes: each example enters the update only
    through its own gradient clipped to C, whatever the chunking of the batch.
    """
    from torch.utils.data import TensorDataset

    import registry

    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(24, 3, 32, 32, generator=generator), torch.randint(0, 10, (24,), generator=generator)
    torch.manual_seed(1)
    model = registry.get_model("small_cnn", 10)
    reference = [param.detach().clone() for param in model.parameters()]
    norms, expected = clipped_sum(model, images, labels, max_norm)
    assert ((norms > max_norm) == (max_norm < 1)).all()
    config = DPSGDConfig(epochs=1, train_batch_size=24, lr=1.0, max_norm=max_norm, noise_multiplier=1e-9,
                         momentum=0.0, weight_decay=0.0, max_physical_batch_size=physical_batch,
                         grad_sample_mode=mode)
    DPSGDTrainer(model, TensorDataset(images, labels), config, torch.device("cpu"), seed=0).train_epoch(progress=False)
    for before, after, total in zip(reference, model.parameters(), expected):
        torch.testing.assert_close(after.detach() - before, -total / 24, rtol=1e-4, atol=1e-6)


def weights_moved_by_one_epoch(images: torch.Tensor, labels: torch.Tensor, **settings) -> torch.Tensor:
    """All of small_cnn's weights, flattened: after one DP-SGD epoch (lr 1, no momentum or decay) minus before."""
    from torch.utils.data import TensorDataset

    import registry

    torch.manual_seed(1)
    model = registry.get_model("small_cnn", 10)
    before = torch.cat([param.detach().flatten() for param in model.parameters()])
    config = DPSGDConfig(epochs=1, lr=1.0, momentum=0.0, weight_decay=0.0, **settings)
    DPSGDTrainer(model, TensorDataset(images, labels), config, torch.device("cpu"), seed=0).train_epoch(progress=False)
    return torch.cat([param.detach().flatten() for param in model.parameters()]) - before


@pytest.mark.parametrize("mode, augmult", [("fused", 0), ("hooks", 0), ("fused", 3)])
def test_dp_sgd_noise_is_sigma_c_over_the_expected_batch_once_per_step(mode, augmult, single_thread):
    """Noise dominating a step: the weights move by N(0, (sigma*C/B)^2) per coordinate, once for the
    four accumulated chunks (noise per chunk would be twice as large); B counts examples, not views."""
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(24, 3, 16, 16, generator=generator), torch.randint(0, 10, (24,), generator=generator)
    moved = weights_moved_by_one_epoch(images, labels, train_batch_size=24, max_norm=0.5, noise_multiplier=1e4,
                                       max_physical_batch_size=6, grad_sample_mode=mode, augmult=augmult)
    assert float(moved.std()) == pytest.approx(1e4 * 0.5 / 24, rel=0.03)
    assert abs(float(moved.mean())) < 0.03 * 1e4 * 0.5 / 24


@pytest.mark.parametrize("mode", ["fused", "hooks"])
def test_an_empty_poisson_batch_is_still_a_noisy_step(mode, monkeypatch, single_thread):
    """Each of the epoch's four steps draws an empty batch and still adds N(0, (sigma*C/B)^2)."""

    monkeypatch.setattr(privacy.sampling, "poisson_batch", lambda *args: torch.empty(0, dtype=torch.long))
    moved = weights_moved_by_one_epoch(torch.randn(40, 3, 8, 8), torch.zeros(40, dtype=torch.long), train_batch_size=10,
                                       max_norm=2.0, noise_multiplier=1.0, grad_sample_mode=mode)
    assert float(moved.std()) == pytest.approx(2.0 / 10 * 4 ** 0.5, rel=0.03)  # four steps' noise


def batches_seen_by_dp_sgd(num_examples: int, batch_size: int, epochs: int, seed: int = 0) -> list[list[int]]:
    """The example indices each DP-SGD step of ``DPSGDTrainer.train_epoch`` fed to the model (empty steps included).

    Example i is the one-feature input i, so a forward pre-hook on the model reads off which examples a step saw;
    ``on_step`` closes each step, so an empty Poisson batch (no forward pass) is recorded as an empty list.
    """
    from torch import nn
    from torch.utils.data import TensorDataset


    torch.manual_seed(0)
    model = nn.Linear(1, 2)
    current: list[int] = []
    steps: list[list[int]] = []
    model.register_forward_pre_hook(lambda module, args: current.extend(args[0][:, 0].round().long().tolist()))

    def close_step(_: int) -> None:
        steps.append(sorted(current))
        current.clear()

    inputs = torch.arange(num_examples, dtype=torch.float32).view(-1, 1)
    config = DPSGDConfig(epochs=epochs, train_batch_size=batch_size, lr=1e-3, max_norm=1.0, noise_multiplier=1.0,
                         momentum=0.0, weight_decay=0.0)
    trainer = DPSGDTrainer(model, TensorDataset(inputs, torch.zeros(num_examples, dtype=torch.long)), config,
                           torch.device("cpu"), seed=seed)
    for _ in range(epochs):
        trainer.train_epoch(progress=False, on_step=close_step)
    return steps


def test_dp_sgd_batches_are_poisson_samples_binomial_sizes_and_independent_membership(single_thread):
    """The real DP-SGD path samples each example independently at rate q = B/N in every step.

    Guards against shuffled fixed-size batches (``torch.randperm(N)[:B]``: batch-size variance 0), a shuffled epoch
    split into chunks (every example exactly once per epoch: per-example count variance 0) and index-correlated
    batches (a random contiguous window: adjacent examples together with probability ~q, not q^2).

    400 steps at N = 400, q = 0.02. Each tolerance is >= 4.4 standard errors of its statistic under Poisson
    sampling; with the fixed seed the test is deterministic, and a random seed would fail it with probability
    below 1e-4 in all.
    """
    import math

    num_examples, batch_size, epochs = 400, 8, 8
    q = batch_size / num_examples
    steps = batches_seen_by_dp_sgd(num_examples, batch_size, epochs)
    assert len(steps) == epochs * math.ceil(num_examples / batch_size) == 400
    membership = torch.zeros(len(steps), num_examples, dtype=torch.float64)
    for step, indices in enumerate(steps):
        assert len(set(indices)) == len(indices), "an example was drawn twice in one batch"
        membership[step, indices] = 1.0

    sizes = membership.sum(1)
    # Binomial(N, q): mean 8 (standard error 0.14 over 400 steps), variance 7.84 (standard error ~7%).
    assert float(sizes.mean()) == pytest.approx(num_examples * q, abs=0.7)
    assert float(sizes.var()) == pytest.approx(num_examples * q * (1 - q), rel=0.35)
    # Independent over steps: each example's count is Binomial(steps, q), variance 7.84 (standard error ~7%).
    counts = membership.sum(0)
    assert float(counts.var()) == pytest.approx(len(steps) * q * (1 - q), rel=0.35)
    # Independent within a step: two examples meet with probability q^2, averaged over all pairs (standard
    # error ~3.4%) and over the pairs of nearby indices i, i + d for d <= 4 (~255 expected meetings, standard
    # deviation ~6%).
    all_pairs = float((sizes * (sizes - 1)).mean()) / (num_examples * (num_examples - 1))
    assert all_pairs == pytest.approx(q * q, rel=0.15)
    meetings = sum(float((membership[:, d:] * membership[:, :-d]).sum()) for d in range(1, 5))
    nearby = meetings / (len(steps) * sum(num_examples - d for d in range(1, 5)))
    assert nearby == pytest.approx(q * q, rel=0.3)


@pytest.mark.parametrize("mode", ["hooks", "fused"])
def test_a_layer_that_mixes_the_examples_of_a_batch_is_refused_in_every_mode(mode):
    """Opacus's validator passes an affine-free BatchNorm; its batch statistics no clipping bounds."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2, affine=False), torch.nn.Flatten(),
                                torch.nn.Linear(2 * 6 * 6, 3))
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))
    config = DPSGDConfig(epochs=1, train_batch_size=4, lr=0.1, max_norm=1.0, noise_multiplier=1.0,
                         grad_sample_mode=mode)
    with pytest.raises(DPImgSynError, match="BatchNorm2d normalizes by batch statistics"):
        DPSGDTrainer(model, data, config, torch.device("cpu"), seed=0).train_epoch(progress=False)


@pytest.mark.parametrize("mode", ["fused", "hooks"])
@pytest.mark.parametrize("physical_batch", [72, 7])  # one chunk; chunks of two whole examples (six views)
def test_augmentation_multiplicity_clips_each_examples_mean_over_its_views(physical_batch, mode, monkeypatch,
                                                                            single_thread):
    """K = 3 random crops per example: the step is -lr * mean_i clip_C(mean_k g_ik) over the 24 examples (not the
    72 views), whatever the chunking; the crops are the ones the trainer drew."""
    from torch.utils.data import TensorDataset

    import registry
    import training.dp_sgd

    drawn = []

    def recorded(*args, **kwargs):
        views = random_crop_flip(*args, **kwargs)
        drawn.append(views)
        return views

    monkeypatch.setattr(training.dp_sgd, "random_crop_flip", recorded)
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(24, 3, 16, 16, generator=generator), torch.randint(0, 10, (24,), generator=generator)
    torch.manual_seed(1)
    model = registry.get_model("small_cnn", 10)
    reference = [param.detach().clone() for param in model.parameters()]
    config = DPSGDConfig(epochs=1, train_batch_size=24, lr=1.0, max_norm=0.05, noise_multiplier=1e-9, momentum=0.0,
                         weight_decay=0.0, max_physical_batch_size=physical_batch, grad_sample_mode=mode, augmult=3)
    trainer = DPSGDTrainer(model, TensorDataset(images, labels), config, torch.device("cpu"), seed=0)
    trainer.train_epoch(progress=False)
    views = torch.cat(drawn)
    assert len(views) == 72 and not torch.equal(views[0], views[1])  # three different crops of example 0
    moved = [param.detach().clone() for param in model.parameters()]
    with torch.no_grad():
        for param, before in zip(model.parameters(), reference):
            param.copy_(before)
    norms, expected = clipped_sum(model, views, labels.repeat_interleave(3), 0.05, views=3)
    assert norms.shape == (24,) and (norms > 0.05).all()
    for before, after, total in zip(reference, moved, expected):
        torch.testing.assert_close(after - before, -total / 24, rtol=1e-4, atol=1e-6)


def augmented_views(monkeypatch, records: list[int], flip: bool) -> dict[int, torch.Tensor]:
    """The K = 3 views DP-SGD's first step draws of each record when the Poisson batch is ``records`` (of 8)."""
    from torch.utils.data import TensorDataset

    import registry
    import training.dp_sgd

    drawn = []

    def recorded(*args, **kwargs):
        drawn.append(random_crop_flip(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(training.dp_sgd, "random_crop_flip", recorded)
    monkeypatch.setattr(training.dp_sgd, "global_poisson_batch", lambda *args: torch.tensor(records))
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    config = DPSGDConfig(epochs=1, train_batch_size=8, lr=0.1, max_norm=1.0, noise_multiplier=1.0, augmult=3,
                         augment_flip=flip, max_physical_batch_size=6)  # chunks of two examples
    trainer = DPSGDTrainer(registry.get_model("small_cnn", 10), TensorDataset(images, torch.zeros(8, dtype=torch.long)),
                           config, torch.device("cpu"), seed=5)
    trainer.train_epoch(progress=False)
    views = torch.cat(drawn)
    return {record: views[3 * row:3 * row + 3] for row, record in enumerate(records)}


@pytest.mark.parametrize("flip", [False, True])
def test_augmentation_of_a_record_does_not_depend_on_the_other_records(monkeypatch, flip):
    """Record 2 is left out of the batch (as if removed from the dataset, the others keeping their indices): every
    other record's crops at that step are the same, although it now sits in another row and another chunk."""
    with_all = augmented_views(monkeypatch, list(range(8)), flip)
    without = augmented_views(monkeypatch, [0, 1, 3, 4, 5, 6, 7], flip)
    assert not torch.equal(with_all[0][0], with_all[0][1])  # different crops of one record
    for record, views in without.items():
        assert torch.equal(views, with_all[record]), record


def test_the_released_weights_are_the_moving_average_of_the_iterates(single_thread):
    """EMA with the warm-up decay min(d, (1 + t) / (10 + t)) after step t: post-processing of the noisy iterates."""
    from torch.utils.data import TensorDataset

    import registry

    torch.manual_seed(1)
    model = registry.get_model("small_cnn", 10)
    config = DPSGDConfig(epochs=1, train_batch_size=8, lr=0.5, max_norm=1.0, noise_multiplier=1.0, ema_decay=0.6)
    trainer = DPSGDTrainer(model, TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))), config,
                           torch.device("cpu"), seed=0)
    average = [param.detach().clone() for param in model.parameters()]

    def follow(step: int) -> None:
        decay = min(0.6, (1 + step) / (10 + step))
        for kept, param in zip(average, model.parameters()):
            kept.mul_(decay).add_(param.detach(), alpha=1 - decay)

    trainer.train_epoch(progress=False, on_step=follow)
    assert trainer.released_model is not model
    for kept, released, last in zip(average, trainer.released_model.parameters(), model.parameters()):
        torch.testing.assert_close(released, kept)
        assert not torch.equal(released, last)
