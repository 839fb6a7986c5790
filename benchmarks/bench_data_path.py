"""Data path of the embedded sets versus the same loop over pre-loaded tensors.

Each figure runs one loop twice, identical but for where its batches come from: our data path,
or slicing tensors prepared before timing. The loop body is one supervised step of the model
on the batch, the work any stage does per batch.

- ``mnist5k`` (private, in memory): Poisson batches through ``common.batches.batches_by_index``,
  as DP-SGD reads them.
- ``photos`` aligned to mnist5k (public, generated per item): consecutive batches through
  ``common.batches.stack_items``, as synthesis reads them: the first read of the indices in a
  process (converted items forgotten before every run), and a re-read (converted items kept,
  as for the second synthesis of a pipeline). The pre-loaded side is the original per-item
  conversion, stacked before timing; both read sides are checked to equal it.

    python benchmarks/bench_data_path.py
    python benchmarks/bench_data_path.py --batches 4 --repeats 1
"""
from __future__ import annotations

import sys
from typing import Callable, Iterable

import torch

# harness first: it puts the repository on sys.path
from harness import Goal, benchmark_parser, make_model, report, set_up, time_sides, training_step
import registry
from common.batches import batches_by_index, stack_items
from common.cli import main_guard, positive_int
from privacy.sampling import poisson_batch
from sources.convert import RawSource
from sources.embedded import forget_converted

GOAL = Goal("<=", 1.1)
PRIVATE, PUBLIC = "mnist5k", "photos"


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--batch_size", type=positive_int, default=256, help="(expected) images per batch")
    parser.add_argument("--batches", type=positive_int, default=8, help="batches per timed loop")
    args = parser.parse_args(argv)
    device = set_up(args)

    num_classes, private, _ = registry.get_dataset(PRIVATE)
    public = registry.aligned(PUBLIC, PRIVATE)
    if args.num_classes != num_classes:
        parser.error(f"--num_classes must be {num_classes} for {PRIVATE}")
    model = make_model(args, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def loop(batches: Iterable[tuple[torch.Tensor, torch.Tensor] | None]) -> int:
        seen = 0
        for batch in batches:
            if batch is not None:
                images, labels = batch
                training_step(model, optimizer, images.to(device), labels.to(device))
                seen += len(labels)
        return seen

    sampler = torch.Generator().manual_seed(args.seed)
    rate = args.batch_size / len(private)
    index_batches = [poisson_batch(len(private), rate, sampler) for _ in range(args.batches)]
    private_images, private_labels = private.tensors

    public_indices = [torch.arange(start, start + args.batch_size)
                      for start in range(0, args.batches * args.batch_size, args.batch_size)]
    public_labels = torch.arange(args.batch_size) % num_classes  # the consumer needs some labels
    preloaded_public = RawSource.viewed(public.source, torch.cat(public_indices).tolist(), public.view)[0]

    def first_read() -> int:
        forget_converted()
        return reread()

    def reread() -> int:
        return loop((stack_items(public, indices.tolist()), public_labels) for indices in public_indices)

    forget_converted()
    for read in ("first read", "re-read"):  # the first pass converts the items, the second finds them kept
        ours = torch.cat([stack_items(public, indices.tolist()) for indices in public_indices])
        if not torch.equal(ours, preloaded_public):
            raise AssertionError(f"the {read} of {PUBLIC} differs from the per-item conversion")
    print(f"# {PUBLIC}: first read and re-read equal the per-item conversion")

    figures: dict[str, dict[str, Callable[[], int]]] = {
        PRIVATE: {
            "ours": lambda: loop(batches_by_index(private, index_batches)),
            "preloaded": lambda: loop((private_images[i], private_labels[i]) for i in index_batches),
        },
        PUBLIC: {
            "ours": first_read,
            "reread": reread,
            "preloaded": lambda: loop((preloaded_public[indices], public_labels) for indices in public_indices),
        },
    }
    for name, sides in figures.items():
        timings = time_sides(sides, args.repeats, args.warmup, device)
        print(f"# {name}: {args.batches} batches of (expected) {args.batch_size} images")
        report(f"data_path_{name}", timings["ours"], timings["preloaded"], GOAL, unit="image")
        if "reread" in timings:
            report(f"data_path_{name}_reread", timings["reread"], timings["preloaded"], GOAL, unit="image")


if __name__ == "__main__":
    sys.exit(main_guard(main)())
