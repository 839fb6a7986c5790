"""How fast a release is read back: ``synthesizer.release.load`` versus one file per image.

The original research code kept one ``torch.save``d tensor per synthetic image and read it back with
one ``torch.load`` per file. This script builds a synthetic release of N images in a temporary
folder, writes the same images as per-image files, and times both ways of reading them, interleaved
over a few repeats (page cache warm for both). It prints per-image times, the ratio
``original / ours`` and the process's peak memory.

    python benchmarks/bench_release_load.py                      # 60,000 CIFAR-sized images
    python benchmarks/bench_release_load.py --num_images 2000 --repeats 1
"""
from __future__ import annotations

import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import ArgumentParser, main_guard, positive_int  # noqa: E402
from synthesizer.release import ReleaseWriter, load  # noqa: E402

IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
GOAL = 20.0


def build_release(root: Path, num_images: int, shard_size: int, seed: int = 0) -> None:
    """A release of random images, written through the same writer synthesis uses."""
    writer = ReleaseWriter(root, num_samples=num_images, shard_size=shard_size, image_shape=IMAGE_SHAPE,
                           num_classes=NUM_CLASSES, settings={"benchmark": "release_load", "seed": seed})
    rng = np.random.default_rng(seed)
    for index in writer.pending_shards():
        start, stop = writer.shard_range(index)
        images = rng.random((stop - start, *IMAGE_SHAPE), dtype=np.float32)
        writer.write_shard(index, images=images, initial_images=images,
                           soft_labels=rng.standard_normal((stop - start, NUM_CLASSES)).astype(np.float32),
                           targets=np.arange(start, stop) % NUM_CLASSES)
    writer.finalize({"benchmark": "release_load"})


def build_per_image_files(folder: Path, images: np.ndarray) -> list[Path]:
    """The original layout: one torch.save'd CxHxW tensor per image."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{index}.pt" for index in range(len(images))]
    for path, image in zip(paths, images):
        torch.save(torch.from_numpy(np.array(image)), path)
    return paths


def read_release_whole(root: Path) -> int:
    images, _, _ = load(root).tensors()
    return images.shape[0]


def read_release_batches(root: Path, batch_size: int) -> int:
    dataset = load(root)
    count = 0
    for start in range(0, len(dataset), batch_size):
        batch = torch.from_numpy(np.array(dataset.images[start:start + batch_size]))
        count += batch.shape[0]
    return count


def read_per_image_files(paths: list[Path]) -> int:
    images = torch.stack([torch.load(path, weights_only=True) for path in paths])
    return images.shape[0]


def per_image_seconds(read: Callable[[], int]) -> float:
    start = time.perf_counter()
    count = read()
    return (time.perf_counter() - start) / count


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=positive_int, default=60_000, help="images in the release")
    parser.add_argument("--num_original", type=positive_int, default=None,
                        help="per-image files for the original side (default: --num_images); "
                             "times are compared per image")
    parser.add_argument("--repeats", type=positive_int, default=3, help="interleaved timing rounds")
    parser.add_argument("--batch_size", type=positive_int, default=256, help="batch for batch-wise reading")
    parser.add_argument("--shard_size", type=positive_int, default=5_000, help="release shard size")
    parser.add_argument("--workdir", default=None, help="where the temporary folder goes (default: system temp)")
    args = parser.parse_args(argv)
    num_original = min(args.num_original or args.num_images, args.num_images)

    with tempfile.TemporaryDirectory(prefix="bench_release_", dir=args.workdir) as tmp:
        root = Path(tmp) / "release"
        build_release(root, args.num_images, args.shard_size)
        paths = build_per_image_files(Path(tmp) / "per_image", load(root).images[:num_original])

        sides: dict[str, Callable[[], int]] = {
            "original: torch.load per file": lambda: read_per_image_files(paths),
            "ours: load().tensors()": lambda: read_release_whole(root),
            f"ours: load() batches of {args.batch_size}": lambda: read_release_batches(root, args.batch_size),
        }
        timings: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, read in sides.items():
                timings[name].append(per_image_seconds(read))

    median = {name: statistics.median(values) for name, values in timings.items()}
    original, whole, batched = median.values()
    print(f"release_load: {args.num_images} images of {'x'.join(map(str, IMAGE_SHAPE))}, "
          f"{num_original} per-image files, {args.repeats} repeat(s), median per image")
    for name, seconds in median.items():
        print(f"  {name:<36} {seconds * 1e6:10.2f} us/image")
    print(f"release_load: batch-wise ratio {original / batched:.2f}")
    print(f"release_load: ratio {original / whole:.2f} (goal >= {GOAL:g})")
    print(f"release_load: peak memory {peak_rss_mib():.0f} MiB (whole process, ru_maxrss)")


if __name__ == "__main__":
    sys.exit(main_guard(main)())
