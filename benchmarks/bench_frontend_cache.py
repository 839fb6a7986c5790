"""The front-end cache of scatter_cnn on a folder set and on a release, against training on the images.

- ``frontend_cache_dp_sgd_epoch``: a DP-SGD epoch (Poisson batches) on a ``folder:`` set of colour PNGs
  written to a temporary folder, on the features cached once (``training.frontend.training_inputs``)
  against the whole model reading and scattering the files at every step.
- ``frontend_cache_dp_sgd_first_epoch``: the same with the cache built within the epoch (reading and
  scattering every file once), against an epoch on the images.
- ``frontend_cache_student_warm``: a student's start and epoch on a release whose features an earlier
  student kept in the cache folder (warm) against one that computes them (cold: the kept file removed).
- ``frontend_cache_fixed_layers``: a student epoch on cached features that hold the head's parameter-free
  GroupNorm, with the identity pool skipped, against the whole head on the scattering coefficients.

    python benchmarks/bench_frontend_cache.py
    python benchmarks/bench_frontend_cache.py --num_images 500 --repeats 1
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# harness first: it puts the repository on sys.path
from harness import Goal, benchmark_parser, make_model, report, set_up, time_sides
import registry
from common.cli import main_guard, positive_int
from common.files import CACHE_ENV, cache_root
from training.distill import DistillationConfig, StudentTrainer
from training.dp_sgd import DPSGDConfig, DPSGDTrainer
from training.frontend import CACHE_FOLDER, training_inputs

DP_SGD_GOAL, FIRST_EPOCH_GOAL, STUDENT_GOAL = Goal("<=", 0.25), Goal("<=", 1.2), Goal("<=", 0.5)
FIXED_LAYERS_GOAL = Goal("<=", 0.9)


def write_folder(root: Path, count: int, side: int, classes: int, seed: int) -> Path:
    """``root/{train,test}/<class>/<i>.png``: ``count`` colour training images, a few test ones."""
    rng = np.random.default_rng(seed)
    for split, total in (("train", count), ("test", classes)):
        for index in range(total):
            folder = root / split / f"class{index % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, repeats=2)
    parser.set_defaults(warmup=0)  # an epoch takes seconds: one-time costs do not count
    parser.add_argument("--num_images", type=positive_int, default=2000, help="training images of the folder")
    parser.add_argument("--batch_size", type=positive_int, default=256, help="expected DP-SGD batch size")
    parser.add_argument("--student_images", type=positive_int, default=2000, help="images of the release")
    args = parser.parse_args(argv)
    args.model = "scatter_cnn"  # the front end under test, whatever --model says (run_all.py forwards it)
    device = set_up(args)

    with tempfile.TemporaryDirectory() as temp:
        os.environ[CACHE_ENV] = str(Path(temp) / "cache")  # the benchmark's own cache folder
        root = write_folder(Path(temp) / "tree", args.num_images, args.image_size, args.num_classes, args.seed)
        _, folder_set, _ = registry.get_dataset(f"folder:{root}", image_size=args.image_size, channels=3)
        print(f"# folder set: {len(folder_set)} colour {args.image_size} x {args.image_size} PNG files")
        config = DPSGDConfig(epochs=1000, train_batch_size=min(args.batch_size, args.num_images), lr=0.5,
                             max_norm=1.0, noise_multiplier=1.0)
        whole = DPSGDTrainer(make_model(args, device), folder_set, config, device, seed=args.seed)
        trained, features = training_inputs(make_model(args, device), folder_set, device=device)
        cached = DPSGDTrainer(trained, features, config, device, seed=args.seed)

        def epoch(trainer: DPSGDTrainer) -> int:
            trainer.train_epoch(progress=False)
            return trainer.num_examples

        def first_epoch() -> int:
            head, data = training_inputs(make_model(args, device), folder_set, device=device)
            return epoch(DPSGDTrainer(head, data, config, device, seed=args.seed))

        timings = time_sides({"images": lambda: epoch(whole), "cached": lambda: epoch(cached),
                              "first": first_epoch}, args.repeats, args.warmup, device)
        report("frontend_cache_dp_sgd_epoch", timings["cached"], timings["images"], DP_SGD_GOAL, unit="image")
        report("frontend_cache_dp_sgd_first_epoch", timings["first"], timings["images"], FIRST_EPOCH_GOAL,
               unit="image")

        generator = torch.Generator().manual_seed(args.seed)
        images = torch.rand(args.student_images, 3, args.image_size, args.image_size, generator=generator)
        soft_labels = torch.randn(args.student_images, args.num_classes, generator=generator)
        labels = soft_labels.argmax(1)
        student = DistillationConfig(epochs=1000, batch_size=256, lr=0.05, temperature=100.0)
        kept = cache_root() / CACHE_FOLDER

        def student_epoch() -> int:
            head, data = training_inputs(make_model(args, device), torch.utils.data.TensorDataset(images, labels),
                                         device=device, public=True)
            StudentTrainer(head, data.tensors[0], soft_labels, labels, student, device, args.seed).train_epoch(False)
            return len(images)

        def cold() -> int:
            for path in kept.glob("release-*.pt"):
                path.unlink()
            return student_epoch()

        print(f"# release: {args.student_images} images; a student's start (features) and one epoch")
        timings = time_sides({"cold": cold, "warm": student_epoch}, args.repeats, args.warmup, device)
        report("frontend_cache_student_warm", timings["warm"], timings["cold"], STUDENT_GOAL, unit="image")

        model = make_model(args, device)
        trained, data = training_inputs(model, torch.utils.data.TensorDataset(images, labels), device=device)
        with torch.no_grad():
            scattering = torch.cat([model.frontend(batch.to(device)).cpu() for batch in images.split(256)])
        epochs = {"fixed": StudentTrainer(trained, data.tensors[0], soft_labels, labels, student, device, args.seed),
                  "head": StudentTrainer(model.head, scattering, soft_labels, labels, student, device, args.seed)}
        print("# a student epoch on features: the head's fixed norm cached and its identity pool skipped, or the "
              "whole head on the scattering")
        timings = time_sides({name: (lambda trainer=trainer: trainer.train_epoch(False) and len(images))
                              for name, trainer in epochs.items()}, args.repeats, args.warmup, device)
        report("frontend_cache_fixed_layers", timings["fixed"], timings["head"], FIXED_LAYERS_GOAL, unit="image")


if __name__ == "__main__":
    sys.exit(main_guard(main)())
