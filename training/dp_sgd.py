"""DP-SGD training of the teacher (stage 1), resumable at epoch boundaries.

Per-example clipping is our one-backward engine (:mod:`privacy.clipping`, mode ``fused``, the
default) or Opacus's per-sample gradients clipped by its ``DPOptimizer`` (modes ``hooks``,
``functorch``, ``ew``); Opacus's optimizer adds the noise in every mode, all parameters' in one
draw (:mod:`privacy.optimizers`). Sampling is our own Poisson sampler at rate B/N so that the
ledger records exactly the mechanism that ran. Large Poisson batches are split into physical
chunks whose clipped gradients are accumulated before the single noisy step, as Opacus's
BatchMemoryManager does.

Under torchrun every rank draws the same Poisson batch (shared seed) and takes its share;
Opacus's DPDDP keeps the replicas in sync and its DistributedDPOptimizer sums the ranks'
clipped gradients before rank 0 adds the noise, once. The ledger is the single-process one.

Recipes beyond the paper (off by default), after De et al. 2022: augmentation multiplicity
(``augmult`` K) feeds K random crops of every sampled example and clips the example's gradient
averaged over its views, so sampling, sensitivity C, noise and divisor are those of the plain
step; the K views of an example stay in one physical chunk and on one rank. An exponential moving
average of the weights (``ema_decay``) is post-processing of the noisy iterates: it is what
:attr:`DPSGDTrainer.released_model` returns, and what the teacher stage saves and measures.

Shape-stable steps (``pad_batches``, off by default, for GPUs): each physical chunk of a Poisson
batch is padded to one of a few fixed sizes (:func:`privacy.sampling.bucket_sizes`) with zero
images whose loss is ignored, so every gradient through them is exactly zero; the records drawn,
the clipped sum, the one noise draw and the divisor (the expected batch) are those of the unpadded step.

Randomness: by default the Poisson batches come from a generator seeded with ``seed`` and the noise
from one seeded with ``seed + 1``, so a run (and its resume) is reproducible and the seed must stay
secret. Secure mode (``DPSGDConfig.secure_mode``, no seed) draws both from the operating system
(:data:`privacy.noise.OS_RANDOM`): :mod:`privacy.optimizers` replaces Opacus's noise generator, whose
torch generator could be regenerated from its seed. Nothing random is saved then, and no run can be
repeated. Under torchrun rank 0 draws each Poisson batch and broadcasts it; the noise stays on rank 0
as in Opacus. Cost: 8 bytes of OS randomness per parameter per step, 8 per example per step.
"""
from __future__ import annotations

import copy
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.grad_sample.utils import prepare_module
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from common.batches import batches_by_index
from common.cli import fraction, nonnegative_float, nonnegative_int, option, positive_float, positive_int
from common.distributed import Distributed
from common.errors import DPImgSynError
from common.runtime import keyed_seed
from privacy.clipping import PerExampleClipper, refuse_batch_statistics
from privacy.noise import OS_RANDOM, RandomSource
from privacy.optimizers import dp_optimizer_class
from privacy.sampling import bucket_sizes, global_poisson_batch, physical_chunks, private_seed, steps_per_epoch
from training.augment import AUGMENT_FLIP, random_crop_flip

FUSED = "fused"
GRAD_SAMPLE_MODES = (FUSED, "hooks", "functorch", "ew")
POSTFIX_EVERY = 10  # steps between progress-bar loss updates: each one waits for the device
# The label of a padding row: the loss ignores it (its gradient is exactly zero) and no prediction matches it.
PAD_LABEL = -100

# The first layer's input never requires grad; Opacus's hooks are still correct, so the
# warning torch emits for it is noise on every run.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


@dataclass(frozen=True, kw_only=True)
class DPSGDConfig:
    """The DP-SGD mechanism and its optimizer; the teacher stage's config extends it (paper defaults there)."""

    epochs: int = option(help="eta_train: DP-SGD epochs", parse=positive_int)
    train_batch_size: int = option(help="Omega_train: expected (logical) Poisson batch size", parse=positive_int)
    lr: float = option(help="gamma_train: SGD learning rate", parse=positive_float)
    max_norm: float = option(help="C: per-sample gradient clipping norm", parse=positive_float)
    noise_multiplier: float = option(help="sigma: noise std / C", parse=positive_float)
    momentum: float = option(0.9, "SGD momentum", parse=nonnegative_float)
    weight_decay: float = option(5e-4, "SGD weight decay", parse=nonnegative_float)
    max_physical_batch_size: int = option(256, "largest chunk processed at once; bigger Poisson batches are "
                                          "accumulated", parse=positive_int, run_only=True)  # a memory bound
    grad_sample_mode: str = option(FUSED, "per-example clipping: 'fused' computes norms and the clipped sum in one "
                                   "backward pass (fastest); 'hooks', 'functorch', 'ew' store Opacus's per-sample "
                                   "gradients (same guarantee, for layers 'fused' does not support)",
                                   choices=GRAD_SAMPLE_MODES)
    secure_mode: bool = option(False, "draw the Poisson sampling and the noise from the operating system's "
                               "randomness (not seedable: a seed is refused; nothing can regenerate the noise)")
    augmult: int = option(0, "augmentation multiplicity K: each sampled example enters as K random crops "
                          "(reflect padding of 1/8 of the side) whose mean gradient is clipped as one; 0: no "
                          "augmentation (the paper)", parse=nonnegative_int)
    augment_flip: bool = option(AUGMENT_FLIP, "with augmult: also flip the views horizontally at random (not for "
                                "digits or text)")
    ema_decay: float = option(0.0, "exponential moving average of the weights after each step (e.g. 0.999), "
                              "saved instead of the last iterate; 0: off (the paper)", parse=fraction)
    pad_batches: bool = option(False, "pad each physical chunk of a Poisson batch with zero images of weight zero to "
                               "one of a few fixed sizes (multiples of 8) so that a GPU sees static shapes; the "
                               "padding adds exactly zero, and sampling, noise and divisor are unchanged")


class DPSGDTrainer:
    """Owns the model wrapper, optimizer, scheduler and the randomness sources of a DP-SGD run.

    ``seed`` seeds the sampling (``seed``) and noise (``seed + 1``) generators; secure mode takes no
    seed (``None``) and raises :class:`DPImgSynError` if one is given.
    """

    def __init__(self, model: nn.Module, train_set: Dataset, config: DPSGDConfig,
                 device: torch.device, seed: int | None, num_workers: int = 0,
                 dist: Distributed = Distributed()) -> None:
        if config.secure_mode and seed is not None:
            raise DPImgSynError("secure mode draws sampling and noise from the operating system and takes no seed; "
                                "drop the seed, or drop secure mode for a reproducible run")
        if not config.secure_mode and seed is None:
            raise DPImgSynError("DP-SGD needs a seed outside secure mode (privacy.sampling.private_seed draws one)")
        self.model = model.to(device)
        # Copied before any hook is attached: the average is a plain model of the same architecture.
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if config.ema_decay else None
        self.dist = dist
        self.train_set = train_set
        self.config = config
        self.device = device
        self.num_workers = num_workers
        self.num_examples = len(train_set)
        self.sample_rate = config.train_batch_size / self.num_examples
        self.steps_per_epoch = steps_per_epoch(self.num_examples, config.train_batch_size)
        # Whole examples per physical chunk, and with padding the few sizes a chunk is padded to (per rank).
        self.chunk = max(1, config.max_physical_batch_size // self.views)
        self.buckets = (bucket_sizes(config.train_batch_size / dist.world_size, self.chunk)
                        if config.pad_batches else None)
        replicated = DPDDP(self.model) if dist.enabled else self.model  # DPDDP copies rank 0's weights
        # Per-sample gradients of a summed loss are the gradients of each example's own loss: no
        # rescaling of every layer's backprops, as a mean loss would need. The optimizer still
        # divides the noisy sum of clipped gradients by the expected batch size.
        self.clipper: PerExampleClipper | None = None
        if config.grad_sample_mode == FUSED:
            # The clipper leaves the clipped sum in param.grad; the optimizer only adds the noise.
            self.clipper = PerExampleClipper(self.model, config.max_norm)
            self.wrapped = replicated
        else:
            refuse_batch_statistics(self.model.named_modules())  # Opacus's validator lets affine-free ones pass
            self.wrapped = prepare_module(replicated, config.grad_sample_mode, batch_first=True,
                                          loss_reduction="sum")
        optimizer_class = dp_optimizer_class(self.clipper is not None, dist.enabled)
        base = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
        self.noise_generator = None  # secure mode: the optimizer reads the OS instead
        if not config.secure_mode:
            self.noise_generator = torch.Generator(device=device)
            self.noise_generator.manual_seed(seed + 1)
        # Each rank scales its share by B / world_size; the optimizer then averages over ranks.
        self.optimizer = optimizer_class(base, noise_multiplier=config.noise_multiplier,
                                         max_grad_norm=config.max_norm,
                                         expected_batch_size=config.train_batch_size / dist.world_size,
                                         generator=self.noise_generator, secure_mode=config.secure_mode)
        # A milestone at epoch 0 would cut the learning rate before the first step (epochs == 1),
        # and on short runs both milestones can fall on one epoch (a 100x cut): keep distinct ones.
        milestones = sorted({m for m in (int(0.6 * config.epochs), int(0.8 * config.epochs)) if m > 0})
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(base, milestones=milestones, gamma=0.1)
        self.sample_generator: RandomSource = OS_RANDOM
        if not config.secure_mode:
            self.sample_generator = torch.Generator()
            self.sample_generator.manual_seed(seed)
        # Augmentation draws are keyed by (this seed, step, record), so no record's views depend on which
        # others are in the batch or the dataset; a resume redraws them from the step count alone.
        self.augment_seed = private_seed(None) if seed is None else seed + 2
        self.epoch = 0
        self.steps_done = 0

    @property
    def views(self) -> int:
        """Rows per sampled example in a physical chunk (augmentation multiplicity, or 1)."""
        return max(1, self.config.augmult)

    @property
    def released_model(self) -> nn.Module:
        """What DP-SGD outputs: the moving average of the weights when configured, else the last iterate."""
        return self.model if self.ema is None else self.ema

    def _update_ema(self) -> None:
        """Post-processing of the noisy iterates; the decay warms up as in De et al. so early steps count less."""
        if self.ema is None:
            return
        decay = min(self.config.ema_decay, (1 + self.steps_done) / (10 + self.steps_done))
        with torch.no_grad():
            for averaged, current in zip(self.ema.parameters(), self.model.parameters()):
                averaged.lerp_(current, 1 - decay)
            for averaged, current in zip(self.ema.buffers(), self.model.buffers()):
                averaged.copy_(current)

    def _views_of(self, images: torch.Tensor, labels: torch.Tensor, records: torch.Tensor,
                  key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K random crops of each example (``records``: their dataset indices), an example's views consecutive
        (one chunk, one rank)."""
        if not self.config.augmult:
            return images, labels
        views = random_crop_flip(images, records, key, views=self.views, padding=max(1, images.shape[-1] // 8),
                                 flip=self.config.augment_flip)
        return views, labels.repeat_interleave(self.views, 0)

    def _noise_only_step(self) -> None:
        """An empty Poisson batch still costs a step and still gets its noise."""
        for param in self.optimizer.params:
            if self.clipper is None:
                param.grad_sample = torch.zeros((0, *param.shape), device=param.device, dtype=param.dtype)
            else:
                param.grad = torch.zeros_like(param)
        self.optimizer.step()

    def _group_grad_samples(self) -> None:
        """Opacus's per-row gradients summed over each example's views: what its optimizer then clips."""
        if self.views == 1:
            return
        for param in self.optimizer.params:
            if param.grad_sample is not None:
                param.grad_sample = param.grad_sample.view(-1, self.views, *param.shape).sum(1)

    def _logical_step(self, images: torch.Tensor, labels: torch.Tensor, records: torch.Tensor) -> torch.Tensor:
        """Clip and accumulate every physical chunk, then one noisy step; returns (loss sum, correct).

        An example's loss is the mean over its views, so its gradient is their mean. The log-only
        sums stay on the device, so that no chunk waits for a device-to-host copy. Padding rows
        (``pad_batches``) are zero images labelled :data:`PAD_LABEL`: their loss term and hence
        every gradient through them is exactly zero, so they add nothing to the clipped sum, the
        loss or the accuracy.
        """
        key = keyed_seed(self.augment_seed, self.steps_done)
        sums = torch.zeros(2, device=self.device)
        chunks = physical_chunks(len(labels), self.chunk, self.buckets)
        for position, (start, stop, size) in enumerate(chunks):
            x, y = self._views_of(images[start:stop].to(self.device, non_blocking=True),
                                  labels[start:stop].to(self.device, non_blocking=True), records[start:stop], key)
            x, y = _padded(x, y, size * self.views)
            with self.clipper.recording(self.views) if self.clipper else nullcontext():
                logits = self.wrapped(x)
            loss = F.cross_entropy(logits, y, reduction="sum", ignore_index=PAD_LABEL) / self.views
            if self.clipper is None:
                loss.backward()  # Opacus's hooks store per-sample gradients; its optimizer clips them
                self._group_grad_samples()
            else:
                self.clipper.clipped_backward(loss)  # leaves the clipped sum in param.grad
            if position < len(chunks) - 1:
                self.optimizer.signal_skip_step(do_skip=True)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            sums += torch.stack([loss.detach().float(), (logits.argmax(1) == y).sum().float() / self.views])
        return sums

    def train_epoch(self, progress: bool = True, on_step: Callable[[int], None] | None = None) -> dict:
        """One epoch of ceil(N/B) Poisson steps; returns mean loss and train accuracy (non-private, log only)."""
        self.wrapped.train()
        index_batches = [self.dist.share(global_poisson_batch(self.num_examples, self.sample_rate,
                                                            self.sample_generator, self.dist))
                         for _ in range(self.steps_per_epoch)]
        seen = 0
        sums = torch.zeros(2, device=self.device)
        bar = tqdm(batches_by_index(self.train_set, index_batches, self.num_workers),
                   total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
                   disable=not (progress and self.dist.is_main), leave=False, dynamic_ncols=True)
        for step, (batch, records) in enumerate(zip(bar, index_batches), start=1):
            self.optimizer.zero_grad(set_to_none=True)
            if batch is None:
                self._noise_only_step()
            else:
                sums += self._logical_step(*batch, records)
                seen += len(batch[1])
            self.steps_done += 1
            self._update_ema()
            if on_step is not None:
                on_step(self.steps_done)
            if progress and (step % POSTFIX_EVERY == 0 or step == self.steps_per_epoch):
                loss_sum, correct = sums.tolist()
                bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.3f}", acc=f"{correct / max(seen, 1):.3f}")
        self.scheduler.step()
        self.epoch += 1
        totals = self.dist.all_reduce_sum(torch.cat([sums, torch.tensor([float(seen)], device=self.device)]))
        loss_sum, correct, seen = totals.tolist()
        return {"loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1)}

    def state_dict(self) -> dict:
        """Everything needed to continue after a kill (loads with weights_only=True).

        Bit-for-bit with seeded generators; secure mode has no generator state to save (each step's
        randomness is fresh and independent, so resuming with new OS draws is the same mechanism).
        """
        state = {
            "epoch": self.epoch,
            "steps_done": self.steps_done,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.original_optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": asdict(self.config),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.config.augmult:
            state["augment_seed"] = self.augment_seed
        if not self.config.secure_mode:
            state["sample_generator"] = self.sample_generator.get_state()
        if self.noise_generator is not None:
            state["noise_generator"] = self.noise_generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        saved_secure = bool(state.get("config", {}).get("secure_mode", False))
        if saved_secure != self.config.secure_mode:
            raise DPImgSynError(f"the resume state was written {'with' if saved_secure else 'without'} secure mode; "
                                "rerun with the same setting or delete the resume file")
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.augment_seed = int(state.get("augment_seed", self.augment_seed))
        self.optimizer.original_optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if not self.config.secure_mode:
            self.sample_generator.set_state(state["sample_generator"])
        if self.noise_generator is not None and "noise_generator" in state:
            self.noise_generator.set_state(state["noise_generator"])
        self.epoch = int(state["epoch"])
        self.steps_done = int(state["steps_done"])


def _padded(images: torch.Tensor, labels: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` and ``labels`` followed by zero images labelled :data:`PAD_LABEL` up to ``rows`` rows."""
    missing = rows - len(labels)
    if missing <= 0:
        return images, labels
    return (torch.cat([images, images.new_zeros(missing, *images.shape[1:])]),
            torch.cat([labels, labels.new_full((missing,), PAD_LABEL)]))
