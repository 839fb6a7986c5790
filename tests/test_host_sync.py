"""No step of a private stage or of synthesis waits for the device.

On a GPU each read of a device value (``.item()``, ``float()``, a data-dependent ``if``, ``.cpu()``,
``nonzero``) stalls the host until the queued kernels finish, so the next step cannot be queued
behind them. :class:`host_sync.HostReads` finds those reads on a CPU: a DP-SGD logical step must
have none, and the DP statistics pass and a synthesis batch read back a fixed number of values
however many steps they run (once at the end, not per step).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import registry
from host_sync import HostReads, model_tensors
from synthesizer.deepinversion import AlignmentConfig, optimize_batch
from synthesizer.dp_stats import compute_dp_statistics, statistic_dimension
from synthesizer.stat_norm import attach_stat_layers, load_dp_statistics, set_mode
from training.dp_sgd import DPSGDConfig, DPSGDTrainer

pytestmark = pytest.mark.usefixtures("single_thread")


def test_the_guard_sees_each_kind_of_host_read_of_a_device_value_and_lets_host_values_pass():
    device_value = torch.ones(3)
    host_value = torch.ones(3)
    reads = [lambda t: t.sum().item(), lambda t: float(t[0]), lambda t: bool((t > 0).all()), lambda t: t.tolist(),
             lambda t: t.cpu(), lambda t: t.nonzero(), lambda t: (t * 2).numpy()]
    for read in reads:
        with HostReads([device_value]) as guard:
            read(host_value)  # a host value: as free as on a GPU
            with pytest.raises(AssertionError, match="host read of a device value"):
                read(device_value)
        assert len(guard.reads) == 1
    assert device_value.tolist() == [1.0, 1.0, 1.0]  # the methods are restored afterwards


@pytest.mark.parametrize("mode, pad", [("fused", False), ("fused", True), ("hooks", False)])
def test_a_dp_sgd_logical_step_never_waits_for_the_device(mode, pad):
    """Three chunks and the noisy step, with the model, the images and the labels on the 'device'."""
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(20, 3, 16, 16, generator=generator), torch.randint(0, 10, (20,), generator=generator)
    torch.manual_seed(1)
    config = DPSGDConfig(epochs=1, train_batch_size=20, lr=0.1, max_norm=1.0, noise_multiplier=1.0,
                         max_physical_batch_size=7, grad_sample_mode=mode, pad_batches=pad)
    trainer = DPSGDTrainer(registry.get_model("small_cnn", 10), TensorDataset(images, labels), config,
                           torch.device("cpu"), seed=0)
    before = [param.detach().clone() for param in trainer.model.parameters()]
    for _ in range(2):  # the second step also reads the optimizer's momentum
        trainer.optimizer.zero_grad(set_to_none=True)
        with HostReads([*model_tensors(trainer.model), images, labels]):
            sums = trainer._logical_step(images, labels, torch.arange(20))
    assert sums.shape == (2,) and all(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def statistics_reads(epochs: int) -> list[str]:
    torch.manual_seed(0)
    model = registry.get_model("small_cnn", 10).eval()
    attach_stat_layers(model)
    data = TensorDataset(torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.zeros(40))
    with HostReads(model_tensors(model), strict=False) as guard:
        compute_dp_statistics(model, data, epochs=epochs, batch_size=10, max_norm=1.0, noise_multiplier=1.0, seed=0,
                              device="cpu", progress=False, scales=torch.ones(statistic_dimension(model)))
    return guard.reads


def test_the_dp_statistics_pass_reads_the_device_once_not_once_per_step():
    """4 steps: one read (the released sum, at the end). Beyond one epoch the records' vectors are computed once,
    into a table on the host: one more read per batch of that single pass (40 records: one batch), however many
    steps then read the table (12 or 20)."""
    assert len(statistics_reads(epochs=1)) == 1
    assert len(statistics_reads(epochs=3)) == len(statistics_reads(epochs=5)) == 2


def synthesis_reads(steps: int) -> list[str]:
    torch.manual_seed(0)
    teacher = registry.get_model("small_cnn", 10).eval()
    layers = attach_stat_layers(teacher)
    load_dp_statistics(teacher, {name: {"mean": torch.zeros(layer.num_channels), "var": torch.ones(layer.num_channels)}
                                 for name, layer in layers.items()})
    set_mode(teacher, "synthesis")
    start = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    low, high = torch.full((3,), -2.0), torch.full((3,), 2.0)
    with HostReads([*model_tensors(teacher), start], strict=False) as guard:
        result = optimize_batch(teacher, start, torch.arange(8) % 10, steps, AlignmentConfig(), low, high,
                                torch.Generator().manual_seed(2))
    assert set(result.losses) >= {"total"}
    return guard.reads


def test_a_synthesis_batch_reads_the_device_once_not_once_per_step():
    """1 step or 5: one read (the last step's loss terms, together, once the last forward pass is queued)."""
    assert len(synthesis_reads(1)) == len(synthesis_reads(5)) == 1
