"""Shape-stable DP-SGD steps (``pad_batches``): padding rows change nothing the guarantee rests on.

A padded chunk carries zero images labelled ``PAD_LABEL`` up to a bucket size. The mechanism must be
the unpadded one: the same records drawn for the same seed, the same clipped sum (each padding row
adds exactly zero, whatever its content), one noise draw per logical step and the expected batch as
the divisor. The number of padding rows depends on how many records were drawn, so a padding row
that moved the sum at all would break the sensitivity bound.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.data import TensorDataset

import privacy.optimizers
import registry
import training.dp_sgd
from per_example import clipped_sum
from privacy.sampling import BUCKET_FACTORS, CHUNK_FRACTIONS, PAD_MULTIPLE, bucket_sizes, physical_chunks
from training.dp_sgd import PAD_LABEL, DPSGDConfig, DPSGDTrainer

pytestmark = pytest.mark.usefixtures("single_thread")

EXAMPLES = 20  # sample rate 1: the whole set, 20 rows, padded to the 24 bucket (or chunks of 7 to 7)


def data(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(EXAMPLES, 3, 16, 16, generator=generator, dtype=dtype),
            torch.randint(0, 10, (EXAMPLES,), generator=generator))


def model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(1)
    return registry.get_model("small_cnn", 10).to(dtype)


def one_step(pad: bool, mode: str = "fused", physical: int = 256, augmult: int = 0,
             noise: float = 0.0) -> list[torch.Tensor]:
    """Per parameter: -(clipped sum + noise) / B after one full-batch step in float64 (lr 1, no momentum)."""
    images, labels = data(torch.float64)
    network = model(torch.float64)
    before = [param.detach().clone() for param in network.parameters()]
    config = DPSGDConfig(epochs=1, train_batch_size=EXAMPLES, lr=1.0, max_norm=0.05, noise_multiplier=noise,
                         momentum=0.0, weight_decay=0.0, max_physical_batch_size=physical, grad_sample_mode=mode,
                         augmult=augmult, pad_batches=pad)
    DPSGDTrainer(network, TensorDataset(images, labels), config, torch.device("cpu"), seed=0).train_epoch(
        progress=False)
    return [param.detach() - start for param, start in zip(network.parameters(), before)]


def assert_same_step(left: list[torch.Tensor], right: list[torch.Tensor]) -> None:
    for a, b in zip(left, right, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


# --------------------------------------------------------------------------- the buckets
def test_buckets_are_a_few_multiples_of_8_and_every_chunk_fits_one():
    assert bucket_sizes(128, 256) == (32, 64, 128, 144, 160, 192, 256)
    assert bucket_sizes(128, 128) == (16, 32, 64, 128)  # 130 rows: a chunk of 128 and one of 2 padded to 16
    assert bucket_sizes(4096, 256) == (32, 64, 128, 256)  # big batches: full chunks, the rest padded
    assert bucket_sizes(20, 7) == (7,)
    buckets = bucket_sizes(100, 10_000)
    assert len(buckets) == len(BUCKET_FACTORS) + len(CHUNK_FRACTIONS)
    assert all(size % PAD_MULTIPLE == 0 for size in buckets) and buckets[0] >= 100
    for rows in range(0, 700):
        plan = physical_chunks(rows, 256, buckets)
        assert [row for start, stop, _ in plan for row in range(start, stop)] == list(range(rows))
        assert all(size in buckets and size >= stop - start for start, stop, size in plan)
    assert physical_chunks(10, 4) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]  # unpadded: as before


# --------------------------------------------------------------------------- the clipped sum
@pytest.mark.parametrize("mode, physical, augmult", [("fused", 256, 0), ("fused", 7, 0), ("hooks", 256, 0),
                                                     ("fused", 21, 3), ("hooks", 21, 3)])
def test_padding_leaves_the_clipped_sum_of_per_example_gradients_unchanged(mode, physical, augmult, monkeypatch):
    """The padded step equals the unpadded one to float64 rounding, and both are -mean_i clip_C(g_i)."""
    padded_shapes = []
    original = training.dp_sgd._padded

    def recorded(images, labels, rows):
        padded_shapes.append((len(labels), rows))
        return original(images, labels, rows)

    monkeypatch.setattr(training.dp_sgd, "_padded", recorded)
    padded = one_step(True, mode, physical, augmult)
    assert any(rows > real for real, rows in padded_shapes)  # padding rows were really added
    assert_same_step(padded, one_step(False, mode, physical, augmult))
    if not augmult:
        images, labels = data(torch.float64)
        _, expected = clipped_sum(model(torch.float64), images, labels, 0.05)
        for moved, total in zip(padded, expected):
            torch.testing.assert_close(moved, -total / EXAMPLES, rtol=1e-9, atol=1e-12)


def huge_padding(images: torch.Tensor, labels: torch.Tensor, rows: int, label: int = PAD_LABEL):
    """Padding rows of large random content instead of zeros; ``label`` is what they are labelled."""
    missing = rows - len(labels)
    generator = torch.Generator().manual_seed(3)
    filler = 1e3 * torch.randn(missing, *images.shape[1:], dtype=images.dtype, generator=generator)
    return torch.cat([images, filler]), torch.cat([labels, labels.new_full((missing,), label)])


@pytest.mark.parametrize("mode", ["fused", "hooks"])
def test_a_padding_row_with_a_huge_input_changes_nothing(mode, monkeypatch):
    unpadded = one_step(False, mode)
    monkeypatch.setattr(training.dp_sgd, "_padded", huge_padding)
    assert_same_step(one_step(True, mode), unpadded)
    # The same rows with the mask dropped (labelled as a real class) do move the step: the test has teeth.
    monkeypatch.setattr(training.dp_sgd, "_padded", lambda *args: huge_padding(*args, label=0))
    moved = one_step(True, mode)
    assert max(float((a - b).abs().max()) for a, b in zip(moved, unpadded)) > 1e-4


def test_padding_rows_count_in_neither_the_loss_nor_the_accuracy():
    images, labels = data()
    config = DPSGDConfig(epochs=1, train_batch_size=EXAMPLES, lr=1e-3, max_norm=1.0, noise_multiplier=1.0)
    sums = []
    for pad in (False, True):
        trainer = DPSGDTrainer(model(), TensorDataset(images, labels), replace(config, pad_batches=pad),
                               torch.device("cpu"), seed=0)
        sums.append(trainer._logical_step(images, labels, torch.arange(EXAMPLES)))
    torch.testing.assert_close(sums[1], sums[0], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- noise and sampling
def test_padded_steps_draw_the_noise_once_per_step_over_the_expected_batch(monkeypatch):
    """Noise dominating: the weights move by N(0, (sigma C / B)^2), B = 20 the expected batch (not the padded 24),
    from exactly one draw per logical step although each step runs in three padded chunks of 7."""
    draws = []
    original = privacy.optimizers.gaussian

    def counted(*args, **kwargs):
        draws.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(privacy.optimizers, "gaussian", counted)
    moved = torch.cat([change.flatten() for change in one_step(True, physical=7, noise=1e4)])
    assert len(draws) == 1 and draws[0] == (moved.numel(),)
    assert float(moved.std()) == pytest.approx(1e4 * 0.05 / EXAMPLES, rel=0.03)


def records_per_step(pad: bool, batch_size: int = 8, examples: int = 200, epochs: int = 2) -> list[tuple]:
    """Per step: the records fed to the model (example i is the input i + 1; padding rows are 0) and the row count."""
    torch.manual_seed(0)
    network = torch.nn.Linear(1, 2)
    steps: list[tuple] = []
    network.register_forward_pre_hook(lambda module, args: steps.append(
        (sorted(int(value) - 1 for value in args[0][:, 0] if value), len(args[0]))))
    inputs = torch.arange(1, examples + 1, dtype=torch.float32).view(-1, 1)
    config = DPSGDConfig(epochs=epochs, train_batch_size=batch_size, lr=1e-3, max_norm=1.0, noise_multiplier=1.0,
                         momentum=0.0, weight_decay=0.0, pad_batches=pad)
    trainer = DPSGDTrainer(network, TensorDataset(inputs, torch.zeros(examples, dtype=torch.long)), config,
                           torch.device("cpu"), seed=4)
    for _ in range(epochs):
        trainer.train_epoch(progress=False)
    return steps


def test_padding_draws_the_same_records_for_the_same_seed_in_a_few_shapes():
    plain, padded = records_per_step(False), records_per_step(True)
    assert [records for records, _ in padded] == [records for records, _ in plain]
    assert len({len(records) for records, _ in plain}) > 3  # Poisson sizes vary...
    assert {rows for _, rows in padded} <= set(bucket_sizes(8, 256))  # ...padded shapes do not
